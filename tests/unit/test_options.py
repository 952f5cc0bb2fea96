"""One command-line grammar (issue 16): flags from dataclass fields, key=value words for every
subcommand, strict keys with did-you-mean, the flags users already type kept as aliases."""

from __future__ import annotations

import argparse
import contextlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from rlp import cli, options


@dataclass
class Demo:
    """Options of a demo command."""

    count: int = 3
    """How many."""
    name: str | None = None
    """A name."""
    mode: Literal["fast", "slow"] = "fast"
    """Which way."""
    verbose: bool = False
    """Say more."""
    progress: bool = True
    """Show progress."""
    tags: list[str] = field(default_factory=list)
    """Tags."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlp demo")
    options.add_fields(parser, Demo, aliases={"name": ["-n"]})
    parser.add_argument("--input", nargs="+", default=[])
    parser.add_argument("--out", required=True)
    return parser


def _demo(argv: list[str]) -> Demo:
    return options.build(Demo, options.parse(_parser(), argv))


def test_flags_come_from_fields_and_docstrings() -> None:
    text = _parser().format_help()
    for flag, doc in (("--count", "How many"), ("--mode", "Which way"), ("-n", "A name")):
        assert flag in text and doc in text
    assert "--no-progress" in text and "--verbose" in text


def test_flags_and_words_set_the_same_options() -> None:
    by_flags = _demo(["--out", "o", "--count", "5", "-n", "x", "--mode", "slow", "--no-progress"])
    by_words = _demo(["out=o", "count=5", "name=x", "mode=slow", "progress=false"])
    assert by_flags == by_words == Demo(5, "x", "slow", False, False, [])
    assert _demo(["--out=o", "demo.count=7", "no_progress=true"]) == Demo(count=7, progress=False)
    assert _demo(["--out=o", "verbose=true", "--tags", "a", "tags=b"]).tags == ["a", "b"]


def test_list_flag_gives_back_words_it_swallowed() -> None:
    ns = options.parse(_parser(), ["--input", "a", "b", "count=2", "out=o"])
    assert ns.input == ["a", "b"] and ns.count == 2 and ns.out == "o"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--out=o", "cont=2"], "unknown option 'cont' for rlp demo (did you mean 'count'?)"),
        (["--out=o", "count=x"], "count: invalid value 'x'"),
        (["--out=o", "mode=medium"], "mode: 'medium' is not one of fast, slow"),
        (["--out=o", "verbose=maybe"], "verbose: expected true or false"),
        (["--out=o", "rollout.num_thoughts=2"], "takes no run-config keys"),
        (["--out=o", "stray"], "unexpected argument 'stray'"),
        (["count=2"], "the following arguments are required: --out"),
    ],
)
def test_bad_words_are_one_line_usage_errors(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        options.parse(_parser(), argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_run_config_words_are_returned_as_overrides() -> None:
    parser = options.config_parser("rlp thing", "")
    parser.add_argument("--dry-run", action="store_true")
    ns = options.parse(
        parser, ["rollout.num_thoughts=8", "dry_run=true", "optim.lr=1e-3"], run_config=True
    )
    assert ns.overrides == ["rollout.num_thoughts=8", "optim.lr=1e-3"] and ns.dry_run
    assert ns.config == options.DEFAULT_CONFIG


def _cli(argv: list[str]) -> tuple[int | str, str]:
    out = io.StringIO()
    try:
        with (
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(out),
            options.check_only(),
        ):
            code: int | str = cli.main(argv)
    except options.ArgsChecked:
        code = "parsed"
    except SystemExit as exc:
        code = exc.code
    return code, out.getvalue()


SUBCOMMANDS = [
    (["train", "--dry-run"], "dry_run=true"),
    (["config"], "reference=true"),
    (["submit", "--config", "tiny_cpu", "--cpu"], "ntasks=2"),
    (["status", "runs/x"], "json=true"),
    (["eval", "--checkpoint", "CKPT"], "max_new_tokens=64"),
    (["data", "build", "--input", "docs/", "--out", "O"], "tokenizer=T"),
    (["data", "demo"], "num_docs=100"),
    (["convert", "hf-to-mcore", "HF_DIR", "CKPT"], "tp=2"),
]


@pytest.mark.parametrize(("argv", "word"), SUBCOMMANDS, ids=lambda a: " ".join(a)[:30])
def test_every_subcommand_takes_key_value_and_refuses_unknown_keys(argv, word) -> None:
    assert _cli([*argv, word]) == ("parsed", "")
    key, _, value = word.partition("=")
    code, output = _cli([*argv, f"{key}x={value}"])
    assert code == 2 and f"did you mean '{key}'" in output, output


def test_check_only_stops_a_plain_argparse_command() -> None:
    parser = argparse.ArgumentParser(prog="plain")
    parser.add_argument("--n", type=int)
    with pytest.raises(options.ArgsChecked), options.check_only():
        parser.parse_args(["--n", "2"])
    assert parser.parse_args(["--n", "3"]).n == 3  # restored afterwards


def test_add_fields_refuses_an_unknown_annotation() -> None:
    @dataclass
    class Odd:
        where: dict = field(default_factory=dict)
        """A mapping."""

    with pytest.raises(TypeError, match="Odd.where"):
        options.add_fields(argparse.ArgumentParser(), Odd)


def test_path_fields_become_paths() -> None:
    @dataclass
    class WithPath:
        out: Path = Path("x")
        """Where."""

    parser = argparse.ArgumentParser(prog="p")
    options.add_fields(parser, WithPath)
    assert options.parse(parser, ["out=y"]).out == Path("y")
