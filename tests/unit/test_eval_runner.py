"""Tests for rlp.eval.runner: run planning, the loop with a fake generator, resume."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rlp.eval.benchmarks import BenchmarkItem, load_benchmark
from rlp.eval.grading import MathVerifier
from rlp.eval.runner import (
    EvalSettings,
    GenerateFnError,
    ResumeMismatchError,
    batch_seed,
    evaluate,
    plan_runs,
)

pytest.importorskip("math_verify")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    root = tmp_path / "bench"
    _write_jsonl(
        root / "gsm8k" / "test.jsonl",
        [
            {
                "id": f"g{i}",
                "question": f"Sam has {i} apples and buys {i + 3} more. How many?",
                "answer": str(2 * i + 3),
            }
            for i in range(7)
        ],
    )
    _write_jsonl(
        root / "mmlu" / "test.jsonl",
        [
            {
                "id": f"astronomy/{i}",
                "question": f"Astronomy question number {i}?",
                "choices": ["one", "two", "three", "four"],
                "answer": "ABCD"[i % 4],
            }
            for i in range(5)
        ],
    )
    return root


@pytest.fixture(scope="module")
def verifier() -> Iterator[MathVerifier]:
    with MathVerifier(num_workers=2, timeout_s=20.0) as v:
        yield v


class Interrupted(RuntimeError):
    pass


class FakeGenerator:
    """Deterministic stand-in for a model: output depends on (seed, item, sample, T) only.

    It records, per (item id, n, T), how many of its samples it made correct (``truth``), so
    the tests know the exact expected accuracy of every run.
    """

    def __init__(self, items: list[BenchmarkItem], fail_after: int | None = None) -> None:
        self.by_question = {it.question: it for it in items}
        self.fail_after = fail_after
        self.calls = 0
        self.truth: dict[tuple[str, int, float], int] = {}

    def _item(self, prompt: str) -> BenchmarkItem:
        m = re.search(r"Problem: (.*)\n\nSolution:$", prompt, re.S)
        if m is None:
            m = re.search(r".*Question: (.*?)\nA\. ", prompt, re.S)
        assert m is not None, prompt
        return self.by_question[m.group(1)]

    def __call__(
        self, prompts: list[str], n: int, temperature: float, max_new_tokens: int, seed: int
    ) -> list[list[str]]:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise Interrupted(f"simulated crash in call {self.calls}")
        out = []
        for prompt in prompts:
            it = self._item(prompt)
            row, correct = [], 0
            for j in range(n):
                h = int(
                    hashlib.sha256(f"{seed}|{it.id}|{j}|{temperature}".encode()).hexdigest(), 16
                )
                kind = h % 5
                row.append(self._text(it, kind))
                correct += kind in (0, 3)
            self.truth[(it.id, n, temperature)] = correct
            out.append(row)
        return out

    @staticmethod
    def _text(it: BenchmarkItem, kind: int) -> str:
        if it.choices is None:
            gold = int(it.answer)
            return [
                f"Add them.\nSo the answer is \\boxed{{{gold}}}.",
                f"Add them wrongly: \\boxed{{{gold + 1}}}",
                "I give up.",
                # Equivalent form + a continuation the stop string must cut off.
                f"The answer is {gold}.0\n\nProblem: next \\boxed{{999}}",
                f"So {gold} - 1 = {gold - 1}, giving \\boxed{{{gold - 1}}}",
            ][kind]
        wrong = "A" if it.answer != "A" else "B"
        return [
            f"Thinking. The answer is ({it.answer}).",
            f"The answer is ({wrong}).",
            "Hmm.",
            f"**{it.answer}**\n\nQuestion: The answer is ({wrong})",
            f"Answer: {wrong}",
        ][kind]


def _all_items(data_dir: Path) -> list[BenchmarkItem]:
    return load_benchmark("gsm8k", data_dir) + load_benchmark("mmlu", data_dir)


def _settings(data_dir: Path, **kw: Any) -> EvalSettings:
    base: dict[str, Any] = {"data_dir": str(data_dir), "batch_size": 3, "max_new_tokens": 16}
    base.update(kw)
    return EvalSettings(**base)


def _strip_timing(results: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in results.items() if k != "timing"}


# ------------------------------------------------------------------------------ planning


def test_plan_runs_paper_protocol() -> None:
    runs = plan_runs(["gsm8k", "mmlu"], EvalSettings())
    assert [(r.key, r.num_samples, r.temperature) for r in runs] == [
        ("gsm8k:sampled", 8, 0.6),
        ("mmlu:greedy", 1, 0.0),
        ("mmlu:sampled", 4, 0.6),
    ]
    assert [r.score_label for r in runs] == ["GSM8K", "MMLU", "MMLU@1[4]"]


def test_plan_runs_overrides_and_greedy_everywhere() -> None:
    runs = plan_runs(["aime25", "gpqa_diamond"], EvalSettings(num_samples=2, temperature=1.0))
    assert [(r.key, r.num_samples, r.temperature) for r in runs] == [
        ("aime25:sampled", 2, 1.0),
        ("gpqa_diamond:greedy", 1, 0.0),
        ("gpqa_diamond:sampled", 2, 1.0),
    ]
    greedy = plan_runs(["aime25", "gpqa_diamond"], EvalSettings(temperature=0.0))
    assert [(r.key, r.num_samples) for r in greedy] == [
        ("aime25:greedy", 1),
        ("gpqa_diamond:greedy", 1),
    ]


def test_settings_validation() -> None:
    for kw in (
        {"num_samples": 0},
        {"temperature": -1.0},
        {"batch_size": 0},
        {"max_new_tokens": 0},
        {"few_shot": -1},
        {"limit": 0},
    ):
        with pytest.raises(ValueError):
            EvalSettings(**kw)


def test_batch_seed_deterministic_and_distinct() -> None:
    assert batch_seed(0, "gsm8k:sampled", 3) == batch_seed(0, "gsm8k:sampled", 3)
    seeds = {
        batch_seed(s, r, b) for s in (0, 1) for r in ("a:greedy", "a:sampled") for b in range(50)
    }
    assert len(seeds) == 200
    assert all(0 <= s < 2**31 for s in seeds)


# ------------------------------------------------------------------------------ the loop


def test_evaluate_scores_match_ground_truth(
    data_dir: Path, tmp_path: Path, verifier: MathVerifier
) -> None:
    fake = FakeGenerator(_all_items(data_dir))
    settings = _settings(data_dir, num_samples=3)
    out = tmp_path / "out"
    res = evaluate(
        fake, ["gsm8k", "mmlu"], settings, out, label="fake", progress=False, verifier=verifier
    )
    assert set(res["runs"]) == {"gsm8k:sampled", "mmlu:greedy", "mmlu:sampled"}
    for key, run in res["runs"].items():
        items = load_benchmark(run["benchmark"], data_dir)
        truth = [fake.truth[(it.id, run["num_samples"], run["temperature"])] for it in items]
        expected = 100 * sum(truth) / (len(items) * run["num_samples"])
        assert run["accuracy"] == pytest.approx(expected), key
        counts = run["status_counts"]
        assert sum(counts.values()) == len(items) * run["num_samples"]
        assert counts["timeout"] == counts["error"] == 0
        assert run["ci"][0] <= run["accuracy"] <= run["ci"][1]
    assert res["scores"]["GSM8K"] == res["runs"]["gsm8k:sampled"]["accuracy"]
    assert res["scores"]["MMLU@1[3]"] == res["runs"]["mmlu:sampled"]["accuracy"]
    # 7 gsm8k items in batches of 3 -> 3 calls; mmlu 5 items -> 2 calls per run.
    assert fake.calls == 3 + 2 + 2
    lines = (out / "items.jsonl").read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0])["type"] == "meta"
    assert len(lines) == 1 + 7 + 5 + 5
    rec = json.loads(lines[1])
    assert rec["run"] == "gsm8k:sampled" and len(rec["samples"]) == 3
    assert all("\n\nProblem:" not in s["text"] for s in rec["samples"])  # stop string applied
    for name in ("results.json", "summary.md", "accuracy.png"):
        assert (out / name).is_file()
    on_disk = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert _strip_timing(on_disk) == _strip_timing(res)
    assert len(res["items"]) == 17


def test_resume_after_interruption_gives_identical_results(
    data_dir: Path, tmp_path: Path, verifier: MathVerifier
) -> None:
    items = _all_items(data_dir)
    settings = _settings(data_dir, num_samples=2, seed=7)
    full = evaluate(
        FakeGenerator(items),
        ["gsm8k", "mmlu"],
        settings,
        tmp_path / "full",
        progress=False,
        verifier=verifier,
        write_reports=False,
    )

    out = tmp_path / "resumed"
    crashing = FakeGenerator(items, fail_after=4)
    with pytest.raises(Interrupted):
        evaluate(crashing, ["gsm8k", "mmlu"], settings, out, progress=False, verifier=verifier)
    written = (out / "items.jsonl").read_text(encoding="utf-8").splitlines()
    # gsm8k: 3 batches (7 items), then 1 mmlu:greedy batch (3 items) before the 5th call fails.
    assert len(written) == 1 + 7 + 3
    assert not (out / "results.json").exists()

    again = FakeGenerator(items)
    resumed = evaluate(
        again,
        ["gsm8k", "mmlu"],
        settings,
        out,
        progress=False,
        verifier=verifier,
        write_reports=False,
    )
    assert again.calls == 7 - 4  # only the unfinished batches are generated
    assert _strip_timing(resumed) == _strip_timing(full)

    # A third run regenerates nothing and still reports the same.
    idle = FakeGenerator(items)
    assert _strip_timing(
        evaluate(
            idle,
            ["gsm8k", "mmlu"],
            settings,
            out,
            progress=False,
            verifier=verifier,
            write_reports=False,
        )
    ) == _strip_timing(full)
    assert idle.calls == 0


def test_torn_last_line_is_dropped_and_regenerated(
    data_dir: Path, tmp_path: Path, verifier: MathVerifier
) -> None:
    items = _all_items(data_dir)
    settings = _settings(data_dir, num_samples=2)
    out = tmp_path / "torn"
    full = evaluate(
        FakeGenerator(items),
        ["mmlu"],
        settings,
        out,
        progress=False,
        verifier=verifier,
        write_reports=False,
    )
    path = out / "items.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 25])  # crash in the middle of the last record
    gen = FakeGenerator(items)
    again = evaluate(
        gen, ["mmlu"], settings, out, progress=False, verifier=verifier, write_reports=False
    )
    assert gen.calls == 1
    assert _strip_timing(again) == _strip_timing(full)
    assert all(json.loads(line) for line in path.read_text(encoding="utf-8").splitlines())


def test_resume_with_different_settings_is_refused(
    data_dir: Path, tmp_path: Path, verifier: MathVerifier
) -> None:
    items = _all_items(data_dir)
    out = tmp_path / "o"
    evaluate(
        FakeGenerator(items),
        ["mmlu"],
        _settings(data_dir, seed=1),
        out,
        progress=False,
        verifier=verifier,
        write_reports=False,
    )
    with pytest.raises(ResumeMismatchError, match=r"seed: 1 -> 2.*new --out"):
        evaluate(
            FakeGenerator(items),
            ["mmlu"],
            _settings(data_dir, seed=2),
            out,
            progress=False,
            verifier=verifier,
        )


def test_resume_detects_changed_data(
    data_dir: Path, tmp_path: Path, verifier: MathVerifier
) -> None:
    items = _all_items(data_dir)
    out = tmp_path / "o"
    evaluate(
        FakeGenerator(items),
        ["mmlu"],
        _settings(data_dir),
        out,
        progress=False,
        verifier=verifier,
        write_reports=False,
    )
    rows = [json.loads(x) for x in (data_dir / "mmlu" / "test.jsonl").read_text().splitlines()]
    rows[0]["id"] = "renamed/0"
    _write_jsonl(data_dir / "mmlu" / "test.jsonl", rows)
    with pytest.raises(ResumeMismatchError, match="benchmark files changed"):
        evaluate(
            FakeGenerator(_all_items(data_dir)),
            ["mmlu"],
            _settings(data_dir),
            out,
            progress=False,
            verifier=verifier,
        )


@pytest.mark.parametrize(
    "bad",
    [
        lambda prompts, n, t, m, s: [["x"] * n],  # too few rows
        lambda prompts, n, t, m, s: [["x"] * (n + 1) for _ in prompts],  # too many samples
        lambda prompts, n, t, m, s: [[1] * n for _ in prompts],  # not strings
        lambda prompts, n, t, m, s: "x",
    ],
)
def test_generate_fn_shape_is_checked(data_dir: Path, tmp_path: Path, bad: Any) -> None:
    with pytest.raises(GenerateFnError, match="generate_fn"):
        evaluate(
            bad,
            ["mmlu"],
            _settings(data_dir, batch_size=2),
            tmp_path / "bad",
            progress=False,
            write_reports=False,
        )


def test_limit_and_few_shot_reach_prompts(
    data_dir: Path, tmp_path: Path, verifier: MathVerifier
) -> None:
    seen: list[str] = []

    def gen(prompts: list[str], n: int, t: float, m: int, s: int) -> list[list[str]]:
        seen.extend(prompts)
        return [["\\boxed{0}"] * n for _ in prompts]

    res = evaluate(
        gen,
        ["gsm8k"],
        _settings(data_dir, limit=4, few_shot=2, temperature=0.0),
        tmp_path / "lim",
        progress=False,
        verifier=verifier,
        write_reports=False,
    )
    run = res["runs"]["gsm8k:greedy"]
    assert run["num_items"] == 4 and run["accuracy"] == 0.0
    assert len(seen) == 4 and all(p.count("Problem:") == 3 for p in seen)
    assert res["aggregates"]["math_avg"] == {}  # other math sets missing
