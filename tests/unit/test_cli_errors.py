"""User mistakes in any subcommand end in one line naming the problem, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlp.cli import main


@pytest.mark.parametrize(
    "argv",
    [
        ["data", "demo", "--quiet", "--tokenizer", "{missing}"],
        ["data", "build", "--input", "{docs}", "--tokenizer", "{missing}", "--out", "{out}"],
    ],
    ids=["demo", "build"],
)
def test_bad_tokenizer_is_one_line(argv, tmp_path: Path, capsys) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("hello world\n")
    fill = {"missing": tmp_path / "no_tokenizer", "docs": tmp_path / "docs", "out": tmp_path / "o"}
    argv = [a.format(**fill) for a in argv]
    if argv[1] == "demo":
        argv += ["--out", str(tmp_path / "demo")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not load tokenizer" in err[0], err
    assert err[0].startswith("rlp data")


def test_programming_errors_still_raise(monkeypatch) -> None:
    import rlp.cli as cli

    def boom(argv):
        raise ZeroDivisionError("a bug")

    monkeypatch.setitem(cli.COMMANDS, "config", boom)
    with pytest.raises(ZeroDivisionError):
        main(["config"])
