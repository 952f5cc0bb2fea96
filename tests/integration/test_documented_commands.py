"""Every command in README.md and docs/*.md runs as written (issue 15, item 11).

Commands come from the fenced ``bash``/``sh``/``shell``/``console`` blocks and from inline code
spans that start with ``rlp <command> ...`` or ``python <script>``. Each is checked in the
cheapest form that still proves it is right:

* ``rlp train`` / ``rlp submit``: run in-process with ``--dry-run`` (the config loads and
  validates, the job script renders); ``rlp config``: run as written;
* any ``rlp`` command with placeholders (``DIR``, ``CKPT``, ``RUN_DIR``...) or that needs a model,
  data, a GPU or the network (``eval``, ``convert``, ``data``, ``status``): its command line is
  parsed by the command's own parser and stopped before it does anything
  (:func:`rlp.options.check_only`): flags, ``key=value`` words and choices must all be accepted;
* ``torchrun ... -m rlp.cli ...`` and ``python benchmarks/evaluate.py ...``: the same, for the
  ``rlp`` command they launch; other ``python SCRIPT`` / ``python -m MODULE``: ``--help`` runs;
* ``sbatch TEMPLATE``: the template exists and passes ``bash -n``; ``bash SCRIPT``: it exists;
* set-up and test-tier commands (bootstrap, pytest, pip, the local SLURM cluster) are listed in
  ``NOT_RUN`` with the reason; any other command fails this test until it is taught how to
  check it.

The unmarked tests are fast (no training). ``test_readme_main_job_runs`` runs the README's main job
for real (``integration``) and checks that its summary names its files with absolute paths.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from rlp import cli, options

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
NOT_RUN = {
    "scripts/bootstrap.sh": "builds the virtualenv (network); run by .ci/run",
    "scripts/test.sh": "the test gate itself",
    ".ci/run": "the CI entry point (the test gate on a clean clone)",
    "scripts/ci/local_slurm.sh": "starts a SLURM cluster (root, apt); run by the slurm tier",
    "pytest": "a test tier",
    "pip": "installs packages (network)",
}
PLACEHOLDER = re.compile(r"^(?:[A-Z][A-Z0-9_]*(?:\.[a-z]+)?|/path/to/.*|<[^>]+>)$")
RLP_COMMANDS = set(cli.COMMANDS)


@dataclass(frozen=True)
class Documented:
    where: str  # file:line
    text: str

    def __str__(self) -> str:
        return f"{self.where}: {self.text}"


def _blocks(path: Path) -> list[Documented]:
    found, lang, start, lines = [], None, 0, []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fence = re.match(r"^\s*```(\w*)", line)
        if fence and lang is None:
            lang, start, lines = fence.group(1) or "-", number, []
        elif fence:
            if lang in SHELL_LANGS:
                found += _commands_of_block(path, start, lines)
            lang = None
        elif lang is not None:
            lines.append(line)
        else:
            for span in re.findall(r"`([^`]+)`", line):
                if _inline_command(span):
                    found.append(Documented(f"{path.name}:{number}", span))
    return found


def _commands_of_block(path: Path, start: int, lines: list[str]) -> list[Documented]:
    out, pending, first = [], "", 0
    for offset, line in enumerate(lines, 1):
        if not pending:
            first = start + offset
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        text = pending.strip().removeprefix("$ ")
        pending = ""
        if text and not text.startswith("#"):
            out.append(Documented(f"{path.name}:{first}", text))
    return out


def _inline_command(span: str) -> bool:
    """Inline spans that are complete commands (not metasyntax such as `rlp train|config`)."""
    words = span.split()
    if len(words) < 3 or "..." in span or "|" in span:
        return False
    if not any(w.startswith("-") or "=" in w for w in words[2:]):
        return False  # a name in prose (`rlp convert mcore-to-hf`), not a command line
    if words[0] == "rlp":
        return words[1] in RLP_COMMANDS
    return words[0] == "python" and (words[1].endswith(".py") or words[1] == "-m")


DOCUMENTED = [cmd for doc in DOCS for cmd in _blocks(doc)]


def _split(text: str) -> list[list[str]]:
    """Simple commands of a documented line: comments dropped, ``&&``/``;``/``|`` split,
    optional ``[...]`` groups of a usage line left out."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars="&;|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands, current, depth = [], [], 0
    for token in lexer:
        if token in ("&&", ";", "|", "||", "&"):
            commands.append(current)
            current = []
            continue
        if token.startswith("[") or depth:
            depth += token.count("[") - token.count("]")
            continue
        current.append(token)
    commands.append(current)
    return [c for c in commands if c]


def _strip_env(words: list[str]) -> tuple[dict[str, str], list[str]]:
    env = {}
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        key, _, value = words[0].partition("=")
        env[key] = value
        words = words[1:]
    return env, words


def _launched(words: list[str]) -> list[str] | None:
    """The ``rlp`` argv of a command line that runs the rlp CLI, else None."""
    if words[0] in ("rlp", ".venv/bin/rlp"):
        return words[1:]
    if words[0] in ("torchrun", "python", "python3") or words[:3] == [
        "python",
        "-m",
        "torch.distributed.run",
    ]:
        if "-m" in words and words[words.index("-m") + 1 : words.index("-m") + 2] == ["rlp.cli"]:
            return words[words.index("-m") + 2 :]
        script = next((w for w in words[1:] if w.endswith(".py")), None)
        if script == "benchmarks/evaluate.py":
            return ["eval", *words[words.index(script) + 1 :]]
    return None


def _run_rlp(argv: list[str], check_only: bool) -> tuple[int | str, str]:
    """Run ``rlp ARGV`` in-process; (exit code or "checked", captured output)."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            if check_only:
                with options.check_only():
                    code: int | str = cli.main(argv)
            else:
                code = cli.main(argv)
    except options.ArgsChecked:
        code = "checked"
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue()


def _needs_only_parsing(argv: list[str]) -> bool:
    if argv[0] in ("eval", "convert", "data", "status"):
        return True
    return any(PLACEHOLDER.match(word) for word in argv[1:])


def _check(cmd: Documented, tmp_path: Path) -> None:
    for words in _split(cmd.text):
        env, words = _strip_env(words)
        skipped = next((r for k, r in NOT_RUN.items() if any(k in w for w in words[:4])), None)
        if skipped:
            script = next((w for w in words if w.endswith(".sh") or w == ".ci/run"), None)
            if script is not None:
                assert (REPO / script).is_file(), f"{cmd}: {script} does not exist"
            continue
        argv = _launched(words)
        if argv is not None:
            _check_rlp(cmd, argv)
        elif words[0] == "sbatch":
            template = REPO / next(w for w in words[1:] if not w.startswith("-"))
            assert template.is_file(), f"{cmd}: {template} does not exist"
            proc = subprocess.run(["bash", "-n", str(template)], capture_output=True, text=True)
            assert proc.returncode == 0, f"{cmd}: {proc.stderr}"
        elif words[0] == "bash":
            assert (REPO / words[1]).is_file(), f"{cmd}: {words[1]} does not exist"
        elif words[0] in ("python", "python3"):
            target = words[1:3] if words[1] == "-m" else words[1:2]
            if target[0] != "-m":
                assert (REPO / target[0]).is_file(), f"{cmd}: {target[0]} does not exist"
            proc = subprocess.run(
                [sys.executable, *target, "--help"],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=300,
                env=dict(os.environ, OMP_NUM_THREADS="1"),
            )
            assert proc.returncode == 0, f"{cmd}: --help failed\n{proc.stderr[-2000:]}"
        else:
            pytest.fail(f"{cmd}: no rule checks this command; teach {Path(__file__).name}")


def _check_rlp(cmd: Documented, argv: list[str]) -> None:
    assert argv and argv[0] in RLP_COMMANDS, f"{cmd}: not an rlp command: {argv}"
    if _needs_only_parsing(argv):
        code, output = _run_rlp(argv, check_only=True)
        assert code == "checked", f"{cmd}: the command line does not parse:\n{output}"
        return
    if argv[0] in ("train", "submit") and "--dry-run" not in argv:
        argv = [*argv, "--dry-run"]
    code, output = _run_rlp(argv, check_only=False)
    assert code == 0, f"{cmd}: exit {code}\n{output[-3000:]}"


def test_commands_were_found() -> None:
    texts = [c.text for c in DOCUMENTED]
    assert any(t.startswith("rlp train") for t in texts), texts
    assert any("rlp submit" in t for t in texts) and any(
        "benchmarks/evaluate.py" in t for t in texts
    )


@pytest.mark.parametrize("cmd", DOCUMENTED, ids=lambda c: c.where)
def test_documented_command_runs(cmd: Documented, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    _check(cmd, tmp_path)


def test_the_check_catches_a_broken_command(tmp_path: Path, monkeypatch) -> None:
    """The checks can fail: a misspelt flag, a bad choice and an unknown key are all caught."""
    monkeypatch.chdir(REPO)
    for text in (
        "rlp convert hf-to-mcore DIR OUT --tpp 2",
        "rlp eval --checkpoint DIR --backend vllm",
        "rlp data build --input X --tokenizer T --out O workerz=2",
        "rlp train rollout.num_thought=8",
        "rlp submit --config qwen3_1p7b_32xh100 --nodes 4 --gpus-per-node 3",
    ):
        with pytest.raises(AssertionError):
            _check(Documented("test", text), tmp_path)


@pytest.mark.integration
def test_readme_main_job_runs(tmp_path: Path) -> None:
    """The README's main job on a clean working directory: trains, and its final lines name the
    checkpoint, metrics and samples files with absolute paths that exist; then `rlp status`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO)

    def rlp(*argv: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "rlp.cli", *argv]
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)

    main_job = next(c for c in DOCUMENTED if ".venv/bin/rlp train" in c.text)
    proc = rlp(*_launched(_split(main_job.text)[-1]))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    done = proc.stdout[proc.stdout.index("[rlp] done:") :]
    files = dict(re.findall(r"^  (\w+) +(/\S+)$", done, re.MULTILINE))
    for name in ("checkpoint", "metrics", "samples", "summary", "config"):
        path = Path(files[name])
        assert path.is_absolute() and path.exists(), (name, path)
    summary = json.loads(Path(files["summary"]).read_text())
    assert summary["files"]["checkpoint"] == files["checkpoint"]
    assert Path(files["checkpoint"]).name == f"step_{summary['steps']:07d}"
    status = rlp("status", "runs/tiny_cpu")
    assert status.returncode == 0 and "finished: summary.json" in status.stdout, status.stdout
