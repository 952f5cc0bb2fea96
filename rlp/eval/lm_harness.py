"""lm-evaluation-harness adapter: ``lm_eval --model rlp`` over rlp's Megatron model.

This module owns the bridge to EleutherAI's lm-evaluation-harness (optional extra ``lmeval``):
:class:`RLPHarnessLM`, registered for lm-eval under the name ``rlp``, and :func:`main`, the
``rlp eval lm-eval ...`` command that registers it and then runs lm-eval's own command line.

Model arguments (``--model_args checkpoint=DIR,tp=2,...``): ``checkpoint`` (an HF model
directory or an rlp checkpoint, as ``benchmarks/evaluate.py --checkpoint``), ``tp`` (tensor
parallel size; launch ``tp`` processes), ``backend`` (``megatron``, the default, or ``hf``),
``dtype``, ``max_length`` (default: the model's positions), ``max_gen_toks`` (default 256),
``add_special_tokens`` (default true: contexts are encoded as ``tokenizer(text)`` encodes them,
BOS included where the tokenizer adds one, exactly as this library's generation does),
``seed``, ``score_tokens`` and ``max_batch_rows`` (memory bounds, see
:class:`rlp.eval.megatron_generation.MegatronGenerator`). lm-eval's own ``--batch_size`` sets
the requests per model call and ``--device`` the device (``cpu`` / ``cuda``; lm-eval's default
``cuda:0`` falls back to CPU where there is no GPU).

The three request types:

* ``loglikelihood``: ``(context, continuation)`` is encoded by lm-eval's ``TemplateLM`` (whole
  string, then the context's tokens split off), cut from the left to ``max_length + 1`` tokens,
  and scored by teacher forcing with :meth:`~rlp.eval.megatron_generation.MegatronGenerator.score`
  (:func:`rlp.model.logprobs.score_sequences` on the megatron backend). ``is_greedy`` is
  decided from the log-probs where they settle it (every continuation token above probability
  1/2: greedy; one below 1/V: not) and otherwise from the model's argmax tokens (one more
  forward, only for those requests).
* ``loglikelihood_rolling``: lm-eval's disjoint rolling windows of ``max_length`` tokens
  (``lm_eval.utils.get_rolling_token_windows``) after the prefix token (BOS, else EOS), each
  scored as above and summed.
* ``generate_until``: grouped by generation arguments and sent through the generation backend
  (:mod:`rlp.eval.megatron_generation`: rlp's KV-cache sampler) with lm-eval's ``until`` strings
  (plus the EOS text) as stop strings, ``max_gen_toks`` new tokens, greedy unless ``do_sample``
  with a temperature (plain temperature sampling, seeded per call).

Tensor parallelism: ``torchrun --nproc-per-node N -m rlp.cli eval lm-eval --model rlp
--model_args checkpoint=DIR,tp=N ...``. Rank 0 runs lm-eval; the other ranks parse the same
command line (lm-eval's own parser), build the same model and serve its requests until rank 0
is done (the leader/follower protocol of :mod:`rlp.eval.megatron_generation`). Under TP the
model arguments must be on the command line (not only in ``--config``).

lm-eval discovers models only through its registry (``@register_model``; it has no plugin entry
point), so ``lm_eval --model rlp`` works in a process that imported this module: use
``rlp eval lm-eval ...`` (which does) or, from Python, pass an :class:`RLPHarnessLM` instance to
``lm_eval.simple_evaluate(model=...)``.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence
from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from rlp.eval.generation import load_generate_fn

logger = logging.getLogger(__name__)

_LIVE: list[RLPHarnessLM] = []
"""Models built in this process, released by :func:`main` when lm-eval is done."""

_REQUESTS_PER_SCORE = 64
_LOG_HALF = math.log(0.5)


def _device(device: str | None) -> str | None:
    """``cpu`` / ``cuda`` from lm-eval's ``--device`` (``cuda:0`` by default, even without a
    GPU: then CPU, as lm-eval's own HF model does); the TP rank picks its own GPU."""
    if device is None:
        return None
    kind = str(device).split(":")[0]
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            logger.warning("--device %s: CUDA is not available, running on CPU", device)
            return "cpu"
    return kind


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


@register_model("rlp")
class RLPHarnessLM(TemplateLM):
    """An lm-eval ``LM`` over an rlp generator (see the module docstring for the arguments)."""

    def __init__(
        self,
        checkpoint: str,
        tp: int = 1,
        backend: str = "megatron",
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str | None = 16,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_special_tokens: bool | str = True,
        seed: int = 0,
        score_tokens: int = 4096,
        max_batch_rows: int | None = None,
    ) -> None:
        super().__init__()
        device = _device(device)
        try:
            requests = int(batch_size)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            requests = 16  # "auto" and the like
        if max_batch_size is not None:
            requests = min(requests, int(max_batch_size))
        self.requests_per_call = max(1, requests)
        self.seed = int(seed)
        self.model = load_generate_fn(
            checkpoint,
            int(tp),
            self.requests_per_call,
            self.seed,
            device=device,
            dtype=dtype,
            backend=backend,
            max_batch_rows=None if max_batch_rows is None else int(max_batch_rows),
            score_tokens=int(score_tokens),
        )
        tok = getattr(self.model, "hf_tokenizer", None) or self.model.tokenizer
        self.hf_tokenizer = tok
        # An upper bound on the tokens with non-zero probability (the 1/V rule of is_greedy).
        model_vocab = getattr(self.model, "vocab_size", None) or getattr(
            getattr(getattr(self.model, "model", None), "config", None), "vocab_size", 0
        )
        self.vocab_size = max(len(tok), int(model_vocab or 0))
        positions = self.model.max_positions or 2048
        self._max_length = int(max_length) if max_length is not None else int(positions)
        if self._max_length > positions:
            raise ValueError(f"max_length={max_length} exceeds the model's {positions} positions")
        self.max_gen_toks = int(max_gen_toks)
        self.add_special_tokens = _as_bool(add_special_tokens)
        eos = getattr(self.model, "eos_ids", None)
        self._eot = int(eos[0]) if eos else int(tok.eos_token_id)
        self._calls = 0
        self._warned: set[tuple[str, ...]] = set()
        self.checkpoint = str(checkpoint)
        inner = getattr(self.model, "model", None)
        self._device = next(inner.parameters()).device if inner is not None else None
        _LIVE.append(self)

    # ------------------------------------------------------------------ lm-eval's interface

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        bos = self.hf_tokenizer.bos_token_id
        return self._eot if bos is None else int(bos)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.hf_tokenizer, "name_or_path", self.checkpoint)).replace("/", "__")

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        special = self.add_special_tokens if add_special_tokens is None else add_special_tokens
        return self.model.encode(string, special=special)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.model.decode(tokens)

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        seqs, n_cont = [], []
        for _, ctx, cont in requests:
            seq = (list(ctx) + list(cont))[-(self.max_length + 1) :]
            seqs.append(seq)
            n_cont.append(min(len(cont), len(seq) - 1))
        logps = self._score(seqs, disable_tqdm, "loglikelihood")
        greedy: list[bool | None] = []
        unsettled = []
        for i, (lp, n) in enumerate(zip(logps, n_cont)):
            tail = lp[len(lp) - n :]
            if all(x > _LOG_HALF for x in tail):
                greedy.append(True)
            elif any(x < -math.log(self.vocab_size) for x in tail):
                greedy.append(False)
            else:
                greedy.append(None)
                unsettled.append(i)
        for start in range(0, len(unsettled), _REQUESTS_PER_SCORE):
            chunk = unsettled[start : start + _REQUESTS_PER_SCORE]
            best = self.model.argmax([seqs[i] for i in chunk])
            for i, b in zip(chunk, best):
                n = n_cont[i]
                greedy[i] = b[len(b) - n :] == seqs[i][len(seqs[i]) - n :]
        out = []
        for (pair, _, _), lp, n, g in zip(requests, logps, n_cont, greedy):
            answer = (float(sum(lp[len(lp) - n :])), bool(g))
            self.cache_hook.add_partial("loglikelihood", pair, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        seqs: list[list[int]] = []
        owners: list[tuple[int, int]] = []  # (request, predicted tokens of the window)
        for r, req in enumerate(requests):
            (string,) = req.args
            tokens = self.tok_encode(string, add_special_tokens=False)
            windows = get_rolling_token_windows(
                token_list=tokens,
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for ctx, pred in map(make_disjoint_window, windows):
                seqs.append(list(ctx) + list(pred))
                owners.append((r, len(pred)))
        totals = [0.0] * len(requests)
        for (r, n), lp in zip(owners, self._score(seqs, disable_tqdm, "loglikelihood_rolling")):
            totals[r] += float(sum(lp[len(lp) - n :]))
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        eos_text = self.hf_tokenizer.decode([self.eot_token_id])
        groups: dict[tuple[Any, ...], list[int]] = {}
        settings: dict[tuple[Any, ...], tuple[list[str], int, float]] = {}
        for i, req in enumerate(requests):
            _, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs or {}), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen = int(kwargs.pop("max_gen_toks"))
            temperature = float(kwargs.pop("temperature", 0.0))
            if not kwargs.pop("do_sample", False):
                temperature = 0.0
            ignored = tuple(sorted(k for k in kwargs if kwargs[k] is not None))
            if ignored and ignored not in self._warned:
                self._warned.add(ignored)
                logger.warning("rlp model: ignoring generation arguments %s", list(ignored))
            key = (tuple(until), max_gen, temperature)
            groups.setdefault(key, []).append(i)
            settings[key] = (until, max_gen, temperature)
        out = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for key, idx in groups.items():
            until, max_gen, temperature = settings[key]
            for start in range(0, len(idx), self.requests_per_call):
                chunk = idx[start : start + self.requests_per_call]
                prompts = [requests[i].args[0] for i in chunk]
                self._calls += 1
                texts = self.model(
                    prompts, 1, temperature, max_gen, self.seed + self._calls, stop_strings=until
                )
                for i, row in zip(chunk, texts):
                    out[i] = row[0]
                    self.cache_hook.add_partial("generate_until", requests[i].args, row[0])
                bar.update(len(chunk))
        bar.close()
        return out

    # ------------------------------------------------------------------ helpers and TP

    def _score(self, seqs: list[list[int]], disable_tqdm: bool, desc: str) -> list[list[float]]:
        out: list[list[float]] = []
        bar = tqdm(total=len(seqs), desc=desc, disable=disable_tqdm)
        for start in range(0, len(seqs), _REQUESTS_PER_SCORE):
            chunk = seqs[start : start + _REQUESTS_PER_SCORE]
            out.extend(self.model.score(chunk))
            bar.update(len(chunk))
        bar.close()
        return out

    def serve(self) -> int:
        """Follower ranks: run the leader's requests until it closes (its exit code)."""
        return int(self.model.serve())

    def close(self, exit_code: int = 0) -> None:
        """Leader: release the follower ranks, then tear the process group down (collective)."""
        close = getattr(self.model, "close", None)
        if close is not None:
            close(exit_code)
            self.model.teardown()


def _parse_lm_eval_args(argv: Sequence[str]) -> Any:
    """lm-eval's own parse of ``argv`` (used by the follower ranks)."""
    from lm_eval._cli.harness import HarnessCLI

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        return HarnessCLI().parse_args()
    finally:
        sys.argv = saved


def _follow(argv: Sequence[str]) -> int:
    """A follower rank: build the model from the same command line, then serve rank 0."""
    args = _parse_lm_eval_args(argv)
    if getattr(args, "model", None) != "rlp":
        raise SystemExit("rlp eval lm-eval under torchrun needs --model rlp (one model replica)")
    model_args = args.model_args or {}
    if isinstance(model_args, str):
        from lm_eval.utils import simple_parse_args_string

        model_args = simple_parse_args_string(model_args)
    extra = {"batch_size": getattr(args, "batch_size", None), "device": args.device}
    lm = RLPHarnessLM.create_from_arg_obj(dict(model_args), extra)
    code = lm.serve()
    lm.model.teardown()
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """``rlp eval lm-eval [lm-eval arguments]``: lm-eval's command line with ``--model rlp``
    registered; under torchrun, rank 0 runs lm-eval and the other ranks serve it."""
    from rlp.dist import detect_launch

    argv = list(sys.argv[1:] if argv is None else argv)
    if detect_launch().rank != 0:
        return _follow(argv)
    from lm_eval.__main__ import cli_evaluate

    code = 1
    saved = sys.argv
    first = len(_LIVE)  # models built before this call (a notebook's) stay open
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
        code = 0
    except SystemExit as exc:  # argparse errors, --help
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    finally:
        sys.argv = saved
        while len(_LIVE) > first:
            _LIVE.pop().close(code)
    return code
