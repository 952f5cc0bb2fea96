"""Tests for rlp.eval.lm_harness: the lm-evaluation-harness model ``rlp`` on a tiny model.

Log-likelihoods, greedy flags and rolling log-likelihoods are checked against a plain
transformers forward on the same weights; ``rlp eval lm-eval`` runs three local tasks
(multiple choice, rolling perplexity, generation) built here from JSON-lines files, offline.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("megatron.core")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from rlp.eval import lm_harness  # noqa: E402
from rlp.eval.lm_harness import RLPHarnessLM  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXTS = ["Question: What is 2 + 3?\nAnswer:", "Problem: Sam has 3 apples.", "Question: x"]


@pytest.fixture(scope="module")
def model_dir(peaked_llama_dir: Path) -> Path:
    return peaked_llama_dir


@pytest.fixture(scope="module")
def lm(model_dir: Path) -> Iterator[RLPHarnessLM]:
    model = RLPHarnessLM(checkpoint=str(model_dir), device="cpu", batch_size=4)
    yield model
    lm_harness._LIVE.remove(model)


@pytest.fixture(scope="module")
def hf(model_dir: Path) -> Any:
    from rlp.eval.generation import load_generate_fn

    return load_generate_fn(model_dir, backend="hf", device="cpu")


def _direct(hf: Any, ids: list[int]) -> tuple[list[float], list[int]]:
    """Per-token log-probs and argmax tokens of ``ids`` by one transformers forward."""
    with torch.no_grad():
        logits = hf.model(torch.tensor([ids])).logits[0, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return logp.tolist(), logits.argmax(-1).tolist()


def _instance(kind: str, args: tuple) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_loglikelihood_and_greedy_flags(lm: RLPHarnessLM, hf: Any) -> None:
    pairs = [(c, " 5") for c in CONTEXTS] + [(CONTEXTS[0], " Sam"), ("", "Question")]
    got = lm.loglikelihood([_instance("loglikelihood", p) for p in pairs], disable_tqdm=True)
    for (ctx, cont), (logp, greedy) in zip(pairs, got):
        if ctx:
            ctx_ids = hf.tokenizer(ctx)["input_ids"]
            whole = hf.tokenizer(ctx + cont)["input_ids"]
        else:  # an empty context is the prefix token (BOS here)
            ctx_ids = [lm.prefix_token_id]
            whole = ctx_ids + hf.tokenizer(cont, add_special_tokens=False)["input_ids"]
        n = len(whole) - len(ctx_ids)
        lps, best = _direct(hf, whole)
        assert logp == pytest.approx(sum(lps[-n:]), abs=1e-4)
        assert greedy == (best[-n:] == whole[-n:])
    # Token level: the model's own greedy continuation is greedy; one other token is not.
    ctx = hf.tokenizer(CONTEXTS[1])["input_ids"]
    seq = list(ctx)
    for _ in range(4):
        seq.append(_direct(hf, [*seq, 0])[1][-1])
    cont = seq[len(ctx) :]
    other = [*cont[:-1], (cont[-1] + 1) % lm.vocab_size]
    (lp, greedy), (_, not_greedy) = lm._loglikelihood_tokens(
        [(("", ""), ctx, cont), (("", ""), ctx, other)], disable_tqdm=True
    )
    assert greedy is True and not_greedy is False
    assert lp == pytest.approx(sum(_direct(hf, seq)[0][-4:]), abs=1e-4)


def test_loglikelihood_rolling(lm: RLPHarnessLM, hf: Any, model_dir: Path) -> None:
    text = "Solve the following math problem step by step. Sam has 3 apples and buys 4 more."
    tokens = hf.tokenizer(text, add_special_tokens=False)["input_ids"]
    (total,) = lm.loglikelihood_rolling([_instance("loglikelihood_rolling", (text,))], True)
    lps, _ = _direct(hf, [lm.prefix_token_id, *tokens])
    assert total == pytest.approx(sum(lps), abs=1e-4)
    # Short windows: the same sum as lm-eval's disjoint rolling windows scored directly.
    short = RLPHarnessLM(checkpoint=str(model_dir), device="cpu", max_length=8)
    try:
        (windowed,) = short.loglikelihood_rolling([_instance("loglikelihood_rolling", (text,))])
    finally:
        lm_harness._LIVE.remove(short)
    expected = 0.0
    windows = get_rolling_token_windows(tokens, lm.prefix_token_id, 8, 1)
    for ctx, pred in map(make_disjoint_window, windows):
        lps, _ = _direct(hf, [*ctx, *pred])
        expected += sum(lps[-len(pred) :])
    assert windowed == pytest.approx(expected, abs=1e-4)
    assert windowed != pytest.approx(total, abs=1e-3)  # less context, another number


def test_generate_until(lm: RLPHarnessLM, hf: Any) -> None:
    reqs = [
        _instance("generate_until", (c, {"until": ["\n"], "max_gen_toks": 12, "do_sample": False}))
        for c in CONTEXTS
    ]
    got = lm.generate_until(reqs, disable_tqdm=True)
    eos = hf.tokenizer.eos_token
    ref = [hf([c], 1, 0.0, 12, 0, stop_strings=["\n", eos])[0][0] for c in CONTEXTS]
    assert got == ref and any(got)
    assert all("\n" not in g for g in got)


def _tasks(root: Path) -> Path:
    mc = [
        {"question": f"What is {i} + 1?", "choices": [str(i + 1), str(i + 2), "x"], "label": i % 3}
        for i in range(6)
    ]
    text = [{"text": "Solve the following math problem step by step. " * (k + 1)} for k in range(2)]
    gen = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(2)]
    root.mkdir(parents=True)
    for name, rows in (("mc", mc), ("text", text), ("gen", gen)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    head = "dataset_path: json\ntest_split: test\ndataset_kwargs:\n  cache_dir: {cache}\n"
    head += "  data_files:\n    test: {file}\n"
    specs = {
        "rlp_tiny_mc": (
            "mc",
            'output_type: multiple_choice\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
            'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
            "metric_list:\n  - metric: acc\n",
        ),
        "rlp_tiny_rolling": (
            "text",
            'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
            "metric_list:\n  - metric: word_perplexity\n",
        ),
        "rlp_tiny_gen": (
            "gen",
            'output_type: generate_until\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
            'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n"]\n'
            "  max_gen_toks: 8\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n",
        ),
    }
    for task, (data, body) in specs.items():
        yaml = f"task: {task}\n" + head.format(cache=root / "cache", file=root / f"{data}.jsonl")
        (root / f"{task}.yaml").write_text(yaml + body)
    return root


def test_lm_eval_cli_runs_local_tasks(
    model_dir: Path, hf: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rlp.eval.command import main

    tasks = _tasks(tmp_path / "tasks")
    out = tmp_path / "lm_eval_out"
    argv = [
        "lm-eval", "--model", "rlp", "--model_args", f"checkpoint={model_dir}",
        "--device", "cpu", "--batch_size", "4",
        "--tasks", "rlp_tiny_mc,rlp_tiny_rolling,rlp_tiny_gen",
        "--include_path", str(tasks), "--output_path", str(out),
    ]  # fmt: skip
    before = list(lm_harness._LIVE)
    assert main(argv) == 0
    assert before == lm_harness._LIVE  # the model lm-eval built is released when it is done
    stdout = capsys.readouterr().out
    assert "rlp_tiny_mc" in stdout and "acc" in stdout
    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    # Multiple-choice accuracy = argmax of the continuation log-likelihoods, computed directly.
    rows = [json.loads(x) for x in (tasks / "mc.jsonl").read_text().splitlines()]
    hits = []
    for row in rows:
        ctx = f"Question: {row['question']}\nAnswer:"
        scores = []
        for choice in row["choices"]:
            whole = hf.tokenizer(ctx + " " + choice)["input_ids"]
            n = len(whole) - len(hf.tokenizer(ctx)["input_ids"])
            scores.append(sum(_direct(hf, whole)[0][-n:]))
        hits.append(scores.index(max(scores)) == row["label"])
    assert results["rlp_tiny_mc"]["acc,none"] == pytest.approx(sum(hits) / len(hits))
    assert 1.0 < results["rlp_tiny_rolling"]["word_perplexity,none"] < float("inf")
    assert results["rlp_tiny_gen"]["exact_match,none"] in (0.0, 0.5, 1.0)


def test_lm_eval_cli_errors(capsys: pytest.CaptureFixture[str]) -> None:
    from rlp.eval.command import main

    assert main(["lm-eval", "--model", "rlp", "--tasks"]) != 0  # argparse: missing value
    capsys.readouterr()
