"""The repository stands on its own: one meaning per module name, the README's layout is the tree,
and nothing in code or docs points outside the repository."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "rlp"


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")


def test_no_two_modules_share_a_base_name() -> None:
    by_name: dict[str, list[str]] = defaultdict(list)
    for path in _modules():
        by_name[path.stem].append(str(path.relative_to(REPO)))
    clashes = {name: paths for name, paths in by_name.items() if len(paths) > 1}
    assert not clashes, f"module base names with several meanings: {clashes}"


def readme_layout_modules(text: str) -> set[str]:
    """``rlp/...py`` paths listed in the README's Layout code block (indentation = nesting)."""
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    listed: set[str] = set()
    stack: list[tuple[int, str]] = []  # (indent, directory)
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        token = line.split()[0]
        if indent >= 24 and not token.endswith((".py", "/")):
            continue  # a description continued on the next line
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if token.endswith("/"):
            stack.append((indent, token.rstrip("/")))
        elif token.endswith(".py"):
            listed.add("/".join([d for _, d in stack] + [token]))
    return {p for p in listed if p.startswith("rlp/")}


def test_readme_layout_matches_the_package() -> None:
    listed = readme_layout_modules((REPO / "README.md").read_text())
    actual = {str(p.relative_to(REPO)) for p in _modules()}
    assert not actual - listed, f"modules missing from the README layout: {sorted(actual - listed)}"
    assert not listed - actual, f"README layout names files that do not exist: {listed - actual}"


def test_layout_parser_sees_nesting() -> None:
    text = "## Layout\n\n```\nrlp/\n  a.py  x\n  sub/\n    b.py  y\n  c.py  z\n```\n"
    assert readme_layout_modules(text) == {"rlp/a.py", "rlp/sub/b.py", "rlp/c.py"}


OUTSIDE = re.compile(r"\.\./shared|rlp-method\.md|megatron-core-notes|design-anchors\.md")


def test_nothing_points_outside_the_repository() -> None:
    files = [REPO / "README.md", *PACKAGE.rglob("*"), *(REPO / "docs").rglob("*.md")]
    hits = []
    for path in files:
        if path.is_file() and path.suffix in {".py", ".md", ".yaml", ".sh", ".sbatch"}:
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if OUTSIDE.search(line):
                    hits.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not hits, "references to files outside the repository:\n" + "\n".join(hits)


def test_docs_cited_by_the_code_exist() -> None:
    cited = set()
    for path in [*PACKAGE.rglob("*.py"), *(REPO / "docs").rglob("*.md"), REPO / "README.md"]:
        cited |= set(re.findall(r"docs/[\w-]+\.md", path.read_text()))
    missing = sorted(c for c in cited if not (REPO / c).is_file())
    assert not missing, f"cited docs that do not exist: {missing}"
