"""Tests for rlp.eval.probes and rlp.eval.reasoning: the truncate / filler / paraphrase probes on
a tiny real model, their summary numbers, and the reasoning phase of ``evaluate`` (journals,
resume, reports)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rlp.eval.benchmarks import BenchmarkItem
from rlp.eval.chains import (
    Completion,
    filler_text,
    filler_unit,
    forced_prompt,
    parse_forced_answer,
    truncation_points,
)
from rlp.eval.probes import (
    FORCED_STOPS,
    ProbeSettings,
    area_over_curve,
    probe_completions,
    summarize_probes,
)
from rlp.eval.prompts import build_prompt

pytestmark = pytest.mark.usefixtures("one_thread")

MATH = BenchmarkItem("g0", "Sam has 3 apples and buys 4 more. How many?", None, "7", "gsm8k")
MC = BenchmarkItem(
    "astronomy/0", "Which planet is largest?", ("Mars", "Jupiter", "Venus", "Earth"), "B", "mmlu"
)
MATH_TEXT = " Sam has 3 apples.\nHe buys 4 more, so 3 + 4 = 7.\nThe final answer is $\\boxed{7}$."
MC_TEXT = " Jupiter is a gas giant. It is the largest planet. The answer is (B)."


def _completion(item: BenchmarkItem, text: str, run: str, sample: int = 0) -> Completion:
    kind = "mc" if item.choices else "math"
    return Completion(
        run=run,
        benchmark=item.benchmark,
        kind=kind,  # type: ignore[arg-type]
        index=0,
        item_id=item.id,
        sample=sample,
        prompt=build_prompt(item),
        text=text,
        gold=item.answer,
        correct=True,
        extracted="7" if kind == "math" else "B",
        valid_letters=item.valid_letters,
        choices=item.choices,
    )


# ------------------------------------------------------------------------------ summary maths


def test_area_over_curve() -> None:
    fr = (0.0, 0.25, 0.5, 0.75)
    # Trapezoids: (100+50)/2*.25 + 50*.25 + (50+0)/2*.25 + (0+0)/2*.25
    assert area_over_curve(fr, [100.0, 50.0, 50.0, 0.0]) == pytest.approx(37.5)
    assert area_over_curve(fr, [0.0] * 4) == 0.0
    # Changing at every cut: the curve only drops to 0 at the full chain.
    assert area_over_curve(fr, [100.0] * 4) == pytest.approx(87.5)
    # A first fraction above 0 is held flat back to 0.
    assert area_over_curve((0.5,), [40.0]) == pytest.approx(0.5 * 40 + 0.5 * 20)
    with pytest.raises(ValueError):
        area_over_curve(fr, [1.0])


def test_summarize_probes() -> None:
    def entry(same: bool | None, correct: bool) -> dict[str, Any]:
        return {"answer": "x", "same": same, "correct": correct}

    def rec(same: list[bool], correct: list[bool], ref: str | None, **kw: Any) -> dict[str, Any]:
        return {
            "eligible": True,
            "reasoning_tokens": 10,
            "reference": ref,
            "reference_correct": kw.get("ref_correct", True),
            "reference_agrees": kw.get("agrees", True),
            "truncate": {
                k: entry(s if ref else None, c)
                for k, s, c in zip(("0", "0.25", "0.5", "0.75"), same, correct)
            },
            "filler": entry(same[0] if ref else None, correct[0]),
        }

    records = [
        rec([False, False, True, True], [False, False, True, True], "7"),
        rec([True, True, True, True], [True, True, True, True], "7", agrees=False),
        rec([False] * 4, [False] * 4, None, ref_correct=False),  # no readable reference
        {"eligible": False, "skip": "no_answer"},
    ]
    s = summarize_probes(records, ProbeSettings(probes=("truncate", "filler")))
    assert (s["completions"], s["probed"], s["with_reference"]) == (4, 3, 2)
    assert s["skipped"] == {"no_answer": 1}
    t = s["truncate"]
    assert t["fractions"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert t["change_rate"] == [50.0, 50.0, 0.0, 0.0, 0.0]  # over the 2 with a reference
    assert t["accuracy"][:4] == pytest.approx([100 / 3, 100 / 3, 200 / 3, 200 / 3])  # over 3
    assert t["accuracy"][4] == pytest.approx(200 / 3) == s["reference_accuracy"]
    assert t["aoc"] == pytest.approx(area_over_curve((0, 0.25, 0.5, 0.75), [50, 50, 0, 0]))
    assert s["reference_agrees_with_completion"] == pytest.approx(200 / 3)
    assert s["filler"] == {"change_rate": 50.0, "accuracy": pytest.approx(100 / 3)}


# ------------------------------------------------------------------------------ tiny model


@pytest.fixture(scope="module")
def model_dir(peaked_llama_dir: Path) -> Path:
    return peaked_llama_dir


@pytest.fixture(scope="module")
def verifier() -> Iterator[Any]:
    pytest.importorskip("math_verify")
    from rlp.eval.grading import MathVerifier

    with MathVerifier(num_workers=1, timeout_s=20) as v:
        yield v


class Recorder:
    """The model, with every generate call's prompts and arguments kept."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.calls: list[tuple[list[str], tuple, dict]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __call__(self, prompts: list[str], *args: Any, **kwargs: Any) -> list[list[str]]:
        self.calls.append((list(prompts), args, kwargs))
        return self.model(prompts, *args, **kwargs)


def test_probes_on_a_tiny_model(meg, hf, verifier) -> None:
    model = Recorder(meg)
    math_c = _completion(MATH, MATH_TEXT, "gsm8k:sampled")
    mc_c = _completion(MC, MC_TEXT, "mmlu:sampled")
    no_answer = _completion(MATH, " I do not know", "gsm8k:sampled", sample=1)
    settings = ProbeSettings(probes=("truncate", "filler", "paraphrase"))
    para = Recorder(hf)
    recs = probe_completions(
        model, [math_c, mc_c, no_answer], settings, verifier=verifier, paraphraser=para
    )
    assert recs[2]["eligible"] is False and recs[2]["skip"] == "no_answer"
    unit = filler_unit(meg.encode)
    for rec, c in zip(recs[:2], (math_c, mc_c)):
        reasoning = c.reasoning()
        assert reasoning and rec["eligible"]
        ids = meg.encode(reasoning)
        assert rec["reasoning_tokens"] == len(ids)
        prompts = {p for call in model.calls for p in call[0]}
        # Truncation points and the forced-answer prompts in the benchmark's format.
        for f, k in zip(settings.fractions, truncation_points(len(ids), settings.fractions)):
            prompt = forced_prompt(c.prompt, meg.decode(ids[:k]), c.kind)
            assert prompt in prompts
            answer = parse_forced_answer(
                meg([prompt], 1, 0.0, 24 if c.kind == "math" else 3, 0, stop_strings=FORCED_STOPS)[
                    0
                ][0],
                c.kind,
                c.valid_letters,
            )
            entry = rec["truncate"][f"{f:g}"]
            assert entry["answer"] == answer
            if c.kind == "mc":
                assert entry["correct"] == (answer == "B")
                assert entry["same"] == (
                    None if rec["reference"] is None else answer == rec["reference"]
                )
        assert forced_prompt(c.prompt, reasoning, c.kind) in prompts  # the reference
        filler = filler_text(unit, len(ids))
        assert len(meg.encode(filler)) == len(ids)
        assert forced_prompt(c.prompt, filler, c.kind) in prompts
        assert set(rec) >= {"reference", "reference_correct", "reference_agrees", "filler"}
        assert "paraphrase_text" in rec and "paraphrase" in rec
        assert any(reasoning.strip() in p for call in para.calls for p in call[0])
    # Forced answers are greedy, short and end at the line.
    for _, args, kwargs in model.calls:
        n, temperature, max_new = args[:3]
        assert (n, temperature) == (1, 0.0) and max_new in (24, 3)
        assert kwargs["stop_strings"] == FORCED_STOPS
    with pytest.raises(ValueError, match="paraphraser"):
        probe_completions(meg, [math_c], settings, verifier=verifier)


# ------------------------------------------------------------------------------ evaluate()


class Scripted:
    """The real model, except that the main generations are fixed chains (a random tiny model
    writes no reasoning); forced answers, scoring and tokens come from the model."""

    def __init__(self, model: Any, texts: dict[str, list[str]]) -> None:
        self.model = model
        self.texts = texts
        self.generations = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __call__(self, prompts, num_samples, temperature, max_new_tokens, seed, **kw):
        if "stop_strings" in kw:
            return self.model(prompts, num_samples, temperature, max_new_tokens, seed, **kw)
        self.generations += 1
        return [
            [self.texts[p][j % len(self.texts[p])] for j in range(num_samples)] for p in prompts
        ]


def _data(root: Path) -> tuple[Path, dict[str, list[str]]]:
    rows = {
        "gsm8k": [
            {"id": f"g{i}", "question": f"Sam has {i} apples and buys 4 more. How many?",
             "answer": str(i + 4)}
            for i in range(3)
        ],
        "mmlu": [
            {"id": f"astronomy/{i}", "question": f"Which planet is largest ({i})?",
             "choices": ["Mars", "Jupiter", "Venus", "Earth"], "answer": "B"}
            for i in range(2)
        ],
    }  # fmt: skip
    from rlp.eval.benchmarks import load_benchmark

    texts: dict[str, list[str]] = {}
    for name, rs in rows.items():
        (root / name).mkdir(parents=True)
        (root / name / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
        for item in load_benchmark(name, root):
            if name == "gsm8k":
                i = int(item.id[1:])
                texts[build_prompt(item)] = [
                    f" Sam has {i} apples.\nHe buys 4 more, so {i} + 4 = {i + 4}.\n"
                    f"The final answer is $\\boxed{{{i + 4}}}$.",
                    " I am not sure about this one",
                ]
            else:
                texts[build_prompt(item)] = [MC_TEXT, " Mars is red. The answer is (A)."]
    return root, texts


def test_evaluate_with_probes_and_step_gain(meg, tmp_path: Path) -> None:
    from rlp.eval.journal import ResumeMismatchError
    from rlp.eval.reasoning import ReasoningSettings
    from rlp.eval.runner import EvalSettings, evaluate

    data, texts = _data(tmp_path / "bench")
    model = Scripted(meg, texts)
    settings = EvalSettings(
        data_dir=str(data), num_samples=2, max_new_tokens=16, batch_size=2, verify_workers=1
    )
    reasoning = ReasoningSettings(
        probes=ProbeSettings(probes=("truncate", "filler")),
        step_info_gain=True,
        completions_per_batch=3,
    )
    out = tmp_path / "out"
    res = evaluate(model, ["gsm8k", "mmlu"], settings, out, progress=False, reasoning=reasoning)
    probes, gains = res["probes"], res["step_info_gain"]
    assert set(probes) == {"gsm8k", "mmlu"} and set(gains) == {"gsm8k"}
    assert probes["gsm8k"]["run"] == "gsm8k:sampled" and probes["mmlu"]["run"] == "mmlu:sampled"
    g = probes["gsm8k"]
    assert g["completions"] == 6 and len(g["items"]) == 6
    assert [(r["index"], r["sample"]) for r in g["items"]] == [
        (i, j) for i in range(3) for j in (0, 1)
    ]
    assert g["probed"] == 3  # the boxed chains; the others state no answer
    assert g["skipped"] == {"no_answer": 3}
    change = [
        100 * sum(not r["truncate"]["0"]["same"] for r in g["items"] if r.get("reference"))
        / g["with_reference"]
    ] if g["with_reference"] else [None]  # fmt: skip
    assert g["truncate"]["change_rate"][0] == change[0]
    ig = gains["gsm8k"]
    # Step gain also scores chains without an answer (the whole text is the chain).
    assert ig["completions"] == 6 and ig["correct"]["chains"] == ig["incorrect"]["chains"] == 3
    for r in ig["items"]:
        if r.get("eligible"):
            assert sum(r["step_gain"]) == r["total_gain"]
    assert (out / "probes.jsonl").is_file() and (out / "step_gain.jsonl").is_file()
    summary = (out / "summary.md").read_text()
    assert "Faithfulness probes" in summary and "Step information gain" in summary
    assert "pass@2" in summary
    assert (out / "reasoning.png").is_file() and (out / "pass_at_k.png").is_file()
    stored = json.loads((out / "results.json").read_text())
    assert stored["probes"]["gsm8k"]["truncate"] == g["truncate"]

    # Resume: nothing is generated or probed again, and the results are the same.
    lines = {f: (out / f).read_text().count("\n") for f in ("probes.jsonl", "step_gain.jsonl")}
    model.generations = 0
    again = evaluate(model, ["gsm8k", "mmlu"], settings, out, progress=False, reasoning=reasoning)
    assert model.generations == 0
    assert {f: (out / f).read_text().count("\n") for f in lines} == lines
    for key in ("probes", "step_info_gain", "runs"):
        assert again[key] == res[key]
    # Other probe settings on the same --out are refused.
    other = ReasoningSettings(probes=ProbeSettings(probes=("truncate",)))
    with pytest.raises(ResumeMismatchError, match="probes"):
        evaluate(model, ["gsm8k"], settings, out, progress=False, reasoning=other)


def test_reasoning_needs_a_scoring_model(tmp_path: Path) -> None:
    from rlp.eval.reasoning import ReasoningSettings
    from rlp.eval.runner import EvalSettings, evaluate

    data, texts = _data(tmp_path / "bench")

    def plain(prompts, n, t, m, s):
        return [[texts[p][0]] * n for p in prompts]

    with pytest.raises(TypeError, match="load_generate_fn"):
        evaluate(
            plain,
            ["mmlu"],
            EvalSettings(data_dir=str(data), num_samples=1, verify_workers=1),
            tmp_path / "o",
            progress=False,
            reasoning=ReasoningSettings(probes=ProbeSettings(probes=("filler",))),
        )


def test_forced_prompts_are_batched_by_token_length(meg) -> None:
    from rlp.eval.probes import _Forced, _length_buckets

    prompts = ["a" * n for n in (3, 40, 5, 41, 4, 80, 6, 7, 8, 9, 10)]
    reqs = [_Forced(i, "x", p) for i, p in enumerate(prompts)]
    buckets = _length_buckets(meg, reqs, 3, 4)
    assert sorted(r.owner for b in buckets for r in b) == list(range(len(prompts)))
    for b in buckets:
        lengths = [len(meg.encode(r.prompt, special=True)) for r in b]
        assert len(b) <= 3 and max(lengths) - min(lengths) <= 4 and lengths == sorted(lengths)
    assert len(_length_buckets(meg, reqs, 100, 10_000)) == 1
