"""Tests for rlp.eval.benchmarks: registry, loaders (fixtures; real sets via $RLP_BENCHMARK_DIR)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from rlp.eval.benchmarks import (
    DATA_DIR_ENV,
    LETTERS,
    PAPER_BENCHMARKS,
    REGISTRY,
    BenchmarkDataError,
    BenchmarkItem,
    FewShotExample,
    FewShotPool,
    default_data_dir,
    get_spec,
    load_benchmark,
    load_mmlu_dev,
    parse_benchmark_list,
    resolve_data_dir,
    subsample,
)

REAL_COUNTS = {
    "aime25": 30,
    "math500": 500,
    "gsm8k": 1319,
    "amc23": 40,
    "minerva_math": 272,
    "mmlu": 14042,
    "mmlu_pro": 12032,
    "gpqa_diamond": 198,
    "aime24": 30,
}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    root = tmp_path / "bench"
    _write_jsonl(
        root / "gsm8k" / "test.jsonl",
        [
            {"id": f"g{i}", "question": f"What is {i} + {i}?", "answer": str(2 * i)}
            for i in range(6)
        ],
    )
    _write_jsonl(
        root / "mmlu" / "test.jsonl",
        [
            {
                "id": f"astronomy/{i}",
                "question": f"Q{i}\u2028with a line separator",
                "choices": ["w", "x", "y", "z"],
                "answer": "ABCD"[i % 4],
            }
            for i in range(5)
        ],
    )
    _write_jsonl(
        root / "gpqa_diamond" / "test.jsonl",
        [{"id": "rec1", "question": "Which?", "choices": ["a", "b", "c", "d"], "answer": "C"}],
    )
    dev = root / "mmlu" / "raw" / "data" / "mmlu" / "dev"
    dev.mkdir(parents=True)
    (dev / "astronomy_dev.csv").write_text(
        "question,choice0,choice1,choice2,choice3,answer\n"
        'What orbits Earth?,Moon,Sun,Mars,Venus,0\n"A, B",1,2,3,4,3\n',
        encoding="utf-8",
    )
    return root


# ------------------------------------------------------------------------------ registry


def test_registry_has_paper_benchmarks_and_kinds() -> None:
    assert set(PAPER_BENCHMARKS) | {"aime24"} == set(REGISTRY)
    for name in ("aime25", "math500", "gsm8k", "amc23", "minerva_math"):
        spec = get_spec(name)
        assert spec.kind == "math" and spec.group == "math"
        assert [(p.mode, p.num_samples) for p in spec.protocols] == [("sampled", 8)]
    for name in ("mmlu", "mmlu_pro", "gpqa_diamond"):
        spec = get_spec(name)
        assert spec.kind == "mc" and spec.group == "science"
        assert [(p.mode, p.num_samples) for p in spec.protocols] == [("greedy", 1), ("sampled", 4)]
    assert get_spec("aime24").group == "extra"


def test_unknown_benchmark_lists_valid_names() -> None:
    with pytest.raises(KeyError) as info:
        get_spec("mmlu-redux")
    msg = str(info.value)
    for name in REGISTRY:
        assert name in msg


def test_parse_benchmark_list() -> None:
    assert parse_benchmark_list("all") == list(PAPER_BENCHMARKS)
    assert "aime24" not in parse_benchmark_list("all")
    assert parse_benchmark_list("all+extra")[-1] == "aime24"
    assert parse_benchmark_list("gsm8k, MMLU-Pro,gsm8k") == ["gsm8k", "mmlu_pro"]
    assert parse_benchmark_list(["aime24"]) == ["aime24"]
    with pytest.raises(KeyError, match="valid names"):
        parse_benchmark_list("gsm8k,nope")
    with pytest.raises(ValueError):
        parse_benchmark_list(" , ")


# ------------------------------------------------------------------------------ data dir


def test_resolve_data_dir_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_dir = tmp_path / "env"
    env_dir.mkdir()
    monkeypatch.setenv(DATA_DIR_ENV, str(env_dir))
    assert resolve_data_dir() == env_dir.resolve()
    assert resolve_data_dir(tmp_path) == tmp_path.resolve()


def test_default_data_dir_is_the_user_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_data_dir() == tmp_path / "cache" / "rlp" / "benchmarks"
    with pytest.raises(BenchmarkDataError, match="the default"):
        resolve_data_dir()
    (tmp_path / "cache" / "rlp" / "benchmarks").mkdir(parents=True)
    assert resolve_data_dir() == (tmp_path / "cache" / "rlp" / "benchmarks").resolve()
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_data_dir() == Path.home() / ".cache" / "rlp" / "benchmarks"


def test_missing_data_dir_says_where_and_how(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(BenchmarkDataError) as info:
        resolve_data_dir(missing)
    assert str(missing) in str(info.value) and "--data-dir" in str(info.value)
    monkeypatch.setenv(DATA_DIR_ENV, str(missing))
    with pytest.raises(BenchmarkDataError, match=DATA_DIR_ENV):
        resolve_data_dir()


def test_missing_benchmark_file(data_dir: Path) -> None:
    with pytest.raises(BenchmarkDataError, match=r"math500.*test.jsonl"):
        load_benchmark("math500", data_dir)


# ------------------------------------------------------------------------------ fixtures


def test_fixture_loaders_produce_schema(data_dir: Path) -> None:
    gsm = load_benchmark("gsm8k", data_dir)
    assert len(gsm) == 6
    assert gsm[3] == BenchmarkItem("g3", "What is 3 + 3?", None, "6", "gsm8k", None)
    mmlu = load_benchmark("mmlu", data_dir)
    assert [it.answer for it in mmlu] == ["A", "B", "C", "D", "A"]
    assert mmlu[0].choices == ("w", "x", "y", "z") and mmlu[0].valid_letters == "ABCD"
    assert mmlu[0].subject == "astronomy"
    assert "\u2028" in mmlu[0].question  # split on \n only, not str.splitlines()
    gpqa = load_benchmark("gpqa_diamond", data_dir)
    assert gpqa[0].answer == "C" and gpqa[0].benchmark == "gpqa_diamond"


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        (
            [
                {"id": "1", "question": "q", "answer": "1"},
                {"id": "1", "question": "q", "answer": "2"},
            ],
            "duplicate id",
        ),
        ([{"id": "1", "question": "q"}], "missing key"),
        ([{"id": "1", "question": " ", "answer": "2"}], "empty question"),
        ([{"id": "1", "question": "q", "answer": "2", "choices": ["a", "b"]}], "must not have"),
    ],
)
def test_math_loader_validation(tmp_path: Path, rows: list[dict], match: str) -> None:
    _write_jsonl(tmp_path / "gsm8k" / "test.jsonl", rows)
    with pytest.raises(BenchmarkDataError, match=match):
        load_benchmark("gsm8k", tmp_path)


@pytest.mark.parametrize(
    ("row", "match"),
    [
        (
            {"id": "1", "question": "q", "answer": "E", "choices": ["a", "b", "c", "d"]},
            "not one of",
        ),
        ({"id": "1", "question": "q", "answer": "A"}, "choices"),
        ({"id": "1", "question": "q", "answer": "A", "choices": ["only"]}, "at least two"),
    ],
)
def test_mc_loader_validation(tmp_path: Path, row: dict, match: str) -> None:
    _write_jsonl(tmp_path / "mmlu" / "test.jsonl", [row])
    with pytest.raises(BenchmarkDataError, match=match):
        load_benchmark("mmlu", tmp_path)


def test_bad_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "gsm8k" / "test.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text('{"id": "1", "question": "q", "answer": "1"}\n{oops\n', encoding="utf-8")
    with pytest.raises(BenchmarkDataError, match=r"test.jsonl:2"):
        load_benchmark("gsm8k", tmp_path)


def test_gpqa_from_password_zip(tmp_path: Path) -> None:
    if shutil.which("zip") is None:
        pytest.skip("the zip command is needed to build an encrypted fixture")
    src = tmp_path / "src"
    _write_jsonl(
        src / "test.jsonl",
        [{"id": "r1", "question": "Which?", "choices": ["a", "b", "c", "d"], "answer": "B"}],
    )
    folder = tmp_path / "root" / "gpqa_diamond"
    folder.mkdir(parents=True)
    subprocess.run(
        [
            "zip",
            "-q",
            "-P",
            "deserted-untie-orchid",
            str(folder / "gpqa_diamond.zip"),
            "test.jsonl",
        ],
        cwd=src,
        check=True,
    )
    items = load_benchmark("gpqa_diamond", tmp_path / "root")
    assert [(it.id, it.answer) for it in items] == [("r1", "B")]
    assert not (folder / "test.jsonl").exists()  # read in memory, never extracted


def test_subsample_is_deterministic_and_ordered(data_dir: Path) -> None:
    items = load_benchmark("gsm8k", data_dir)
    a = subsample(items, 3)
    assert a == subsample(items, 3) == load_benchmark("gsm8k", data_dir, limit=3)
    assert len(a) == 3 and [items.index(x) for x in a] == sorted(items.index(x) for x in a)
    assert subsample(items, 100) == items
    with pytest.raises(ValueError):
        subsample(items, 0)


def test_fewshot_pool_from_fixture_dev(data_dir: Path) -> None:
    pool = load_mmlu_dev(data_dir)
    shots = pool.select("astronomy", 2)
    assert [s.answer for s in shots] == ["A", "D"]
    assert shots[1].question == "A, B" and shots[0].choices == ("Moon", "Sun", "Mars", "Venus")
    assert pool.select("astronomy", 0) == []


def test_fewshot_pool_tops_up_from_other_subjects() -> None:
    ex = [FewShotExample(f"q{i}", ("a", "b"), "A", subject=s) for i, s in enumerate("xxy")]
    pool = FewShotPool({"x": ex[:2], "y": ex[2:]})
    assert pool.select("y", 3) == [ex[2], ex[0], ex[1]]
    assert pool.select(None, 1) == [ex[0]]


def test_missing_dev_split_error(tmp_path: Path) -> None:
    with pytest.raises(BenchmarkDataError, match="--few-shot 0"):
        load_mmlu_dev(tmp_path)


# ------------------------------------------------------------------------------ real files

# The real test sets (layout in docs/evaluation.md), only where $RLP_BENCHMARK_DIR names them.
REAL_DIR = Path(os.environ.get(DATA_DIR_ENV) or "/nonexistent-rlp-benchmarks")
real = pytest.mark.skipif(
    not (REAL_DIR / "gsm8k" / "test.jsonl").is_file(),
    reason=f"real benchmark data not present (set {DATA_DIR_ENV})",
)


@real
@pytest.mark.parametrize("name", list(REAL_COUNTS))
def test_real_benchmark_files(name: str) -> None:
    items = load_benchmark(name, REAL_DIR)
    assert len(items) == REAL_COUNTS[name]
    assert len({it.id for it in items}) == len(items)
    spec = get_spec(name)
    for it in items:
        assert it.benchmark == name and it.question.strip() and it.answer
        if spec.kind == "mc":
            assert it.choices is not None and it.answer in LETTERS[: len(it.choices)]
        else:
            assert it.choices is None


@real
def test_real_known_items() -> None:
    gsm = load_benchmark("gsm8k", REAL_DIR)
    assert gsm[0].id == "gsm8k-test-0" and gsm[0].answer == "18"
    mmlu = load_benchmark("mmlu", REAL_DIR)
    assert mmlu[0].subject == "abstract_algebra" and mmlu[0].answer == "B"
    assert len({it.subject for it in mmlu}) == 57
    pro = load_benchmark("mmlu_pro", REAL_DIR)
    assert {len(it.choices or ()) for it in pro} == set(range(3, 11))
    assert next(it for it in pro if it.id == "3983").answer == "C"  # README caveat


@real
def test_real_mmlu_dev_pool() -> None:
    pool = load_mmlu_dev(REAL_DIR)
    assert len(pool.by_subject) == 57
    assert all(len(v) == 5 for v in pool.by_subject.values())


@real
def test_real_mmlu_pro_validation_pool() -> None:
    pytest.importorskip("pyarrow")
    from rlp.eval.benchmarks import load_mmlu_pro_categories, load_mmlu_pro_validation

    pool = load_mmlu_pro_validation(REAL_DIR)
    assert sum(len(v) for v in pool.by_subject.values()) == 70
    ex = pool.select("math", 1)[0]
    assert ex.rationale and "The answer is" not in ex.rationale
    assert len(load_mmlu_pro_categories(REAL_DIR)) == 12032
