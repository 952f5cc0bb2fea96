"""Benchmark registry, item schema and loaders for the bundled evaluation.

This module owns *what* is evaluated: the list of benchmarks (:data:`REGISTRY`), their kind
(free-form ``math`` answer or multiple choice ``mc``), their default sampling protocol(s) and
the loaders that turn a benchmark's files into :class:`BenchmarkItem` records. It knows nothing
about prompts, models or scoring.

Data sources
------------
* **Local (default).** ``<data_dir>/<folder>/test.jsonl`` with keys ``id``, ``question``,
  ``choices`` (multiple choice only), ``answer`` (final answer, or the gold letter for multiple
  choice). ``docs/evaluation.md`` ("Data") describes the layout and where each set comes from.
  GPQA-Diamond is read straight out of the password-protected ``gpqa_diamond/gpqa_diamond.zip``
  (the password the GPQA authors publish) and is never extracted to disk; a plain
  ``gpqa_diamond/test.jsonl`` is used instead when one exists.
* **Hugging Face hub (``--hf-datasets``, online only).** :func:`load_benchmark_hf` maps hub
  datasets onto the same schema with a lazy ``datasets`` import. It is a convenience for machines
  with internet access and is *not exercised by the offline test-suite*; field names are picked
  from a short list of known spellings and a clear error is raised if none is present.

The data directory is resolved by :func:`resolve_data_dir`: explicit argument, then the
``RLP_BENCHMARK_DIR`` environment variable, then :func:`default_data_dir`
(``$XDG_CACHE_HOME/rlp/benchmarks``, i.e. ``~/.cache/rlp/benchmarks`` by default).
"""

from __future__ import annotations

import csv
import json
import os
import random
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

BenchmarkKind = Literal["math", "mc"]
BenchmarkGroup = Literal["math", "science", "extra"]

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
"""Choice letters, in order; an item with ``k`` choices uses ``LETTERS[:k]``."""

DATA_DIR_ENV = "RLP_BENCHMARK_DIR"
"""Environment variable naming the benchmark data root (overridden by ``--data-dir``)."""

GPQA_ZIP_PASSWORD = b"deserted-untie-orchid"
"""Password the GPQA authors publish for their own zip; the bundled copy uses the same one."""


def default_data_dir() -> Path:
    """``$XDG_CACHE_HOME/rlp/benchmarks``, else ``~/.cache/rlp/benchmarks`` (the user's cache,
    next to the models ``rlp convert`` writes); used when neither ``--data-dir`` nor
    ``$RLP_BENCHMARK_DIR`` is given."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rlp" / "benchmarks"


class BenchmarkDataError(ValueError):
    """Benchmark data is missing or malformed; the message says where and what to change."""


@dataclass(frozen=True)
class BenchmarkItem:
    """One test question, the same schema for every benchmark.

    ``choices`` is ``None`` for free-form (math) items and a tuple of option texts for multiple
    choice; ``answer`` is then the gold letter (``"A"`` ... ). ``subject`` is the MMLU subject or
    the MMLU-Pro category when known (used for few-shot exemplars and the prompt header).
    """

    id: str
    question: str
    choices: tuple[str, ...] | None
    answer: str
    benchmark: str
    subject: str | None = None

    @property
    def valid_letters(self) -> str:
        """Letters that name a choice of this item (empty for free-form items)."""
        return LETTERS[: len(self.choices)] if self.choices else ""


@dataclass(frozen=True)
class Protocol:
    """How one benchmark is sampled: a mode name, samples per item, temperature."""

    mode: Literal["greedy", "sampled"]
    num_samples: int
    temperature: float


GREEDY = Protocol("greedy", 1, 0.0)
DEFAULT_SAMPLING_TEMPERATURE = 0.6
"""Temperature of the sampled protocols. The paper does not report one (docs/method.md §13);
0.6 is the common choice for pass@1-averaged reasoning evaluation and is documented in
docs/evaluation.md. Override with ``--temperature``."""


@dataclass(frozen=True)
class BenchmarkSpec:
    """Registry entry: name, kind, reporting group, local folder, hub source, protocols."""

    name: str
    display_name: str
    kind: BenchmarkKind
    group: BenchmarkGroup
    folder: str
    protocols: tuple[Protocol, ...]
    hf_source: tuple[str, str | None, str] | None = None
    """``(hub dataset name, config or None, split)`` for ``--hf-datasets``."""
    description: str = ""


def _math_protocols() -> tuple[Protocol, ...]:
    # Paper: math is pass@1 averaged over 8 samples.
    return (Protocol("sampled", 8, DEFAULT_SAMPLING_TEMPERATURE),)


def _science_protocols() -> tuple[Protocol, ...]:
    # Paper: science reports the greedy score and avg@4 ("@1[4]").
    return (GREEDY, Protocol("sampled", 4, DEFAULT_SAMPLING_TEMPERATURE))


REGISTRY: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec(
            "aime25",
            "AIME25",
            "math",
            "math",
            "aime25",
            _math_protocols(),
            ("math-ai/aime25", None, "test"),
            "AIME 2025 I+II, 30 integer answers",
        ),
        BenchmarkSpec(
            "math500",
            "MATH500",
            "math",
            "math",
            "math500",
            _math_protocols(),
            ("HuggingFaceH4/MATH-500", None, "test"),
            "MATH-500 (PRM800K split)",
        ),
        BenchmarkSpec(
            "gsm8k",
            "GSM8K",
            "math",
            "math",
            "gsm8k",
            _math_protocols(),
            ("openai/gsm8k", "main", "test"),
            "GSM8K test, 1,319 problems",
        ),
        BenchmarkSpec(
            "amc23",
            "AMC23",
            "math",
            "math",
            "amc23",
            _math_protocols(),
            ("math-ai/amc23", None, "test"),
            "AMC 12 2023, 40 integer answers",
        ),
        BenchmarkSpec(
            "minerva_math",
            "Minerva",
            "math",
            "math",
            "minerva_math",
            _math_protocols(),
            ("math-ai/minervamath", None, "test"),
            "Minerva Math (MIT OCW), 272 problems; CC BY-NC-SA",
        ),
        BenchmarkSpec(
            "mmlu",
            "MMLU",
            "mc",
            "science",
            "mmlu",
            _science_protocols(),
            ("cais/mmlu", "all", "test"),
            "MMLU test, 57 subjects, 4 choices",
        ),
        BenchmarkSpec(
            "mmlu_pro",
            "MMLU-Pro",
            "mc",
            "science",
            "mmlu_pro",
            _science_protocols(),
            ("TIGER-Lab/MMLU-Pro", None, "test"),
            "MMLU-Pro test, 3-10 choices",
        ),
        BenchmarkSpec(
            "gpqa_diamond",
            "GPQA",
            "mc",
            "science",
            "gpqa_diamond",
            _science_protocols(),
            ("Idavidrein/gpqa", "gpqa_diamond", "train"),
            "GPQA-Diamond, 198 questions, 4 shuffled choices",
        ),
        BenchmarkSpec(
            "aime24",
            "AIME24",
            "math",
            "extra",
            "aime24",
            _math_protocols(),
            ("HuggingFaceH4/aime_2024", None, "train"),
            "AIME 2024 I+II (extra; not in the paper's averages)",
        ),
    )
}
"""All benchmarks by name. The eight paper benchmarks plus AIME24 as an extra."""

MATH_BENCHMARKS: tuple[str, ...] = ("aime25", "math500", "gsm8k", "amc23", "minerva_math")
SCIENCE_BENCHMARKS: tuple[str, ...] = ("mmlu", "mmlu_pro", "gpqa_diamond")
PAPER_BENCHMARKS: tuple[str, ...] = MATH_BENCHMARKS + SCIENCE_BENCHMARKS


def get_spec(name: str) -> BenchmarkSpec:
    """Registry lookup with an error that lists the valid names."""
    key = name.strip().lower().replace("-", "_")
    if key not in REGISTRY:
        raise KeyError(
            f"unknown benchmark {name!r}; valid names: {', '.join(REGISTRY)} "
            "(or 'all' for the eight paper benchmarks)"
        )
    return REGISTRY[key]


def parse_benchmark_list(value: str | Sequence[str]) -> list[str]:
    """Turn ``"all"``, ``"math500,gsm8k"`` or a list into validated registry names.

    ``all`` means the eight paper benchmarks (AIME24 is an extra and must be named); ``all+extra``
    adds the extras. Duplicates are dropped, order is kept.
    """
    parts = [p for p in value.split(",")] if isinstance(value, str) else list(value)
    names: list[str] = []
    for raw in parts:
        part = raw.strip().lower()
        if not part:
            continue
        if part == "all":
            expanded: Iterable[str] = PAPER_BENCHMARKS
        elif part == "all+extra":
            expanded = REGISTRY
        else:
            expanded = [get_spec(part).name]
        for name in expanded:
            if name not in names:
                names.append(name)
    if not names:
        raise ValueError(
            f"no benchmark selected from {value!r}; valid names: {', '.join(REGISTRY)} or 'all'"
        )
    return names


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Find the benchmark data root: argument, then ``$RLP_BENCHMARK_DIR``, then the default.

    Raises :class:`BenchmarkDataError` naming the place looked at and how to point elsewhere.
    """
    if data_dir is not None:
        path, origin = Path(data_dir), "--data-dir"
    elif os.environ.get(DATA_DIR_ENV):
        path, origin = Path(os.environ[DATA_DIR_ENV]), f"${DATA_DIR_ENV}"
    else:
        path, origin = default_data_dir(), "the default"
    path = path.expanduser()
    if not path.is_dir():
        raise BenchmarkDataError(
            f"benchmark data directory not found: looked at {path} (from {origin}). "
            f"Pass --data-dir DIR or set {DATA_DIR_ENV}=DIR to the folder that holds "
            f"{', '.join(s.folder for s in REGISTRY.values())}/ (each with a test.jsonl), "
            "or use --hf-datasets when online."
        )
    return path.resolve()


def _read_jsonl_lines(lines: Iterable[str], where: str) -> list[dict[str, Any]]:
    # Callers split on "\n" only: str.splitlines() would also break on U+2028, U+0085, \x1c ...
    # which occur inside JSON strings of the real MMLU file.
    rows: list[dict[str, Any]] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BenchmarkDataError(f"{where}:{lineno}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise BenchmarkDataError(f"{where}:{lineno}: expected a JSON object per line")
        rows.append(row)
    return rows


def _subject_from_id(name: str, item_id: str) -> str | None:
    # MMLU ids are "<subject>/<row>"; other sets carry no subject in test.jsonl.
    if name == "mmlu" and "/" in item_id:
        return item_id.split("/", 1)[0]
    return None


def rows_to_items(name: str, rows: Sequence[Mapping[str, Any]], where: str) -> list[BenchmarkItem]:
    """Validate normalised rows and build :class:`BenchmarkItem` records.

    Checks: required keys present, unique ids, non-empty question and answer; for multiple
    choice at least two choices and a gold letter among the item's valid letters; for free-form
    items no ``choices``. Errors name the file and row.
    """
    spec = get_spec(name)
    items: list[BenchmarkItem] = []
    seen: set[str] = set()
    for i, row in enumerate(rows, start=1):
        loc = f"{where} row {i}"
        missing = [k for k in ("id", "question", "answer") if k not in row]
        if missing:
            raise BenchmarkDataError(
                f"{loc}: missing key(s) {missing}; expected id, question, "
                "answer (and choices for multiple choice)"
            )
        item_id = str(row["id"])
        if item_id in seen:
            raise BenchmarkDataError(f"{loc}: duplicate id {item_id!r}")
        seen.add(item_id)
        question = str(row["question"])
        answer = str(row["answer"]).strip()
        if not question.strip() or not answer:
            raise BenchmarkDataError(f"{loc} (id {item_id!r}): empty question or answer")
        choices: tuple[str, ...] | None = None
        if spec.kind == "mc":
            raw_choices = row.get("choices")
            if not isinstance(raw_choices, list) or len(raw_choices) < 2:
                raise BenchmarkDataError(
                    f"{loc} (id {item_id!r}): multiple-choice benchmark {name} needs a "
                    "'choices' list with at least two entries"
                )
            choices = tuple(str(c) for c in raw_choices)
            if len(choices) > len(LETTERS):
                raise BenchmarkDataError(f"{loc}: {len(choices)} choices; at most {len(LETTERS)}")
            answer = answer.upper()
            if len(answer) != 1 or answer not in LETTERS[: len(choices)]:
                raise BenchmarkDataError(
                    f"{loc} (id {item_id!r}): answer {row['answer']!r} is not one of the letters "
                    f"{LETTERS[: len(choices)]} for its {len(choices)} choices"
                )
        elif row.get("choices"):
            raise BenchmarkDataError(
                f"{loc} (id {item_id!r}): free-form benchmark {name} must not have 'choices'"
            )
        subject = row.get("subject") or _subject_from_id(name, item_id)
        items.append(
            BenchmarkItem(
                item_id, question, choices, answer, spec.name, str(subject) if subject else None
            )
        )
    return items


def _gpqa_rows(folder: Path) -> tuple[list[dict[str, Any]], str]:
    plain = folder / "test.jsonl"
    if plain.is_file():
        lines = plain.read_text(encoding="utf-8").split("\n")
        return _read_jsonl_lines(lines, str(plain)), str(plain)
    archive = folder / "gpqa_diamond.zip"
    if not archive.is_file():
        raise BenchmarkDataError(
            f"GPQA-Diamond not found: looked for {archive} and {plain}. Point --data-dir at the "
            "benchmark root that holds gpqa_diamond/gpqa_diamond.zip."
        )
    where = f"{archive}!test.jsonl"
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.setpassword(GPQA_ZIP_PASSWORD)
            data = zf.read("test.jsonl")
    except (KeyError, RuntimeError, zipfile.BadZipFile) as exc:
        raise BenchmarkDataError(f"cannot read {where}: {exc}") from exc
    return _read_jsonl_lines(data.decode("utf-8").split("\n"), where), where


def load_benchmark_local(
    name: str, data_dir: str | os.PathLike[str] | None = None
) -> list[BenchmarkItem]:
    """Load all items of ``name`` from the normalised local files (file order)."""
    spec = get_spec(name)
    root = resolve_data_dir(data_dir)
    folder = root / spec.folder
    if spec.name == "gpqa_diamond":
        rows, where = _gpqa_rows(folder)
    else:
        path = folder / "test.jsonl"
        if not path.is_file():
            raise BenchmarkDataError(
                f"no test set for {spec.name}: {path} does not exist. Pass --data-dir (or set "
                f"{DATA_DIR_ENV}) to the folder holding {spec.folder}/test.jsonl."
            )
        rows = _read_jsonl_lines(path.read_text(encoding="utf-8").split("\n"), str(path))
        where = str(path)
    items = rows_to_items(spec.name, rows, where)
    if not items:
        raise BenchmarkDataError(f"{where}: no items")
    return items


# --------------------------------------------------------------------------------------------
# Hugging Face hub alternative (online only; not exercised by the offline tests).
# --------------------------------------------------------------------------------------------


def _pick(row: Mapping[str, Any], keys: Sequence[str], dataset: str) -> Any:
    for key in keys:
        if key in row and row[key] is not None:
            return row[key]
    raise BenchmarkDataError(
        f"hub dataset {dataset}: none of the fields {list(keys)} present (have {sorted(row)})"
    )


def _hf_row(
    name: str, row: Mapping[str, Any], index: int, dataset: str, rng: random.Random
) -> dict[str, Any]:
    if name == "gsm8k":
        answer = str(_pick(row, ["answer"], dataset)).split("####")[-1].strip().replace(",", "")
        return {"id": f"gsm8k-test-{index}", "question": row["question"], "answer": answer}
    if name == "mmlu":
        return {
            "id": f"{row['subject']}/{index}",
            "question": row["question"],
            "choices": list(row["choices"]),
            "answer": LETTERS[int(row["answer"])],
            "subject": row["subject"],
        }
    if name == "mmlu_pro":
        return {
            "id": str(row["question_id"]),
            "question": row["question"],
            "choices": list(row["options"]),
            "answer": row["answer"],
            "subject": row.get("category"),
        }
    if name == "gpqa_diamond":
        # Same shuffle as the bundled copy (simple-evals' first repeat): one Random(0) stream.
        options = [
            str(row[k]).strip()
            for k in (
                "Correct Answer",
                "Incorrect Answer 1",
                "Incorrect Answer 2",
                "Incorrect Answer 3",
            )
        ]
        order = rng.sample(range(4), 4)
        return {
            "id": str(row.get("Record ID", index)),
            "question": str(row["Question"]).strip(),
            "choices": [options[j] for j in order],
            "answer": LETTERS[order.index(0)],
        }
    question = _pick(row, ["problem", "question", "Problem", "Question"], dataset)
    answer = _pick(row, ["answer", "final_answer", "Answer", "solution"], dataset)
    item_id = row.get("id", row.get("unique_id", row.get("idx", index)))
    return {"id": str(item_id), "question": question, "answer": str(answer)}


def load_benchmark_hf(name: str) -> list[BenchmarkItem]:
    """Load ``name`` from the Hugging Face hub (needs ``datasets`` and internet access)."""
    spec = get_spec(name)
    if spec.hf_source is None:
        raise BenchmarkDataError(f"{name} has no hub source; use the local data (--data-dir)")
    try:
        import datasets  # noqa: PLC0415 - optional, online-only dependency
    except ImportError as exc:
        raise BenchmarkDataError(
            "--hf-datasets needs the 'datasets' package (pip install datasets); "
            "or drop --hf-datasets to use the local files"
        ) from exc
    dataset, config, split = spec.hf_source
    ds = datasets.load_dataset(dataset, config, split=split)
    rng = random.Random(0)
    rows = [_hf_row(spec.name, row, i, dataset, rng) for i, row in enumerate(ds)]
    return rows_to_items(spec.name, rows, f"hf:{dataset}")


def load_benchmark(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    use_hf: bool = False,
    limit: int | None = None,
) -> list[BenchmarkItem]:
    """Load a benchmark (local files by default) and optionally subsample it.

    ``limit`` keeps ``limit`` items chosen by a fixed-seed random sample (seeded by the benchmark
    name only, so every run and every checkpoint sees the same subset) and returns them in file
    order. A plain "first N" would be badly biased on MMLU, whose file is sorted by subject.
    """
    items = load_benchmark_hf(name) if use_hf else load_benchmark_local(name, data_dir)
    return subsample(items, limit)


def subsample(items: Sequence[BenchmarkItem], limit: int | None) -> list[BenchmarkItem]:
    """Deterministic ``limit``-item subset in original order (all items if ``limit`` is None)."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit <= 0:
        raise ValueError(f"--limit must be positive, got {limit}")
    rng = random.Random(f"rlp-eval-limit:{items[0].benchmark}")
    keep = sorted(rng.sample(range(len(items)), limit))
    return [items[i] for i in keep]


# --------------------------------------------------------------------------------------------
# Few-shot pools (raw dev / validation splits shipped next to the test sets).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FewShotExample:
    """A solved exemplar: question, choices (MC) and the worked answer text shown after it."""

    question: str
    choices: tuple[str, ...] | None
    answer: str
    """Gold letter for MC, final answer for math."""
    rationale: str = ""
    """Optional worked reasoning shown before the final answer (MMLU-Pro CoT, math exemplars)."""
    subject: str | None = None


@dataclass
class FewShotPool:
    """Exemplars by subject (``""`` = any subject); :meth:`select` picks ``k`` for an item."""

    by_subject: dict[str, list[FewShotExample]] = field(default_factory=dict)

    def select(self, subject: str | None, k: int) -> list[FewShotExample]:
        """First ``k`` exemplars of the item's subject, topped up from other subjects in order."""
        if k <= 0:
            return []
        chosen = list(self.by_subject.get(subject or "", []))[:k]
        if len(chosen) < k:
            for key in sorted(self.by_subject):
                for ex in self.by_subject[key]:
                    if len(chosen) >= k:
                        break
                    if ex not in chosen:
                        chosen.append(ex)
        return chosen


def load_mmlu_dev(data_dir: str | os.PathLike[str] | None = None) -> FewShotPool:
    """MMLU ``dev`` split (5 per subject) from ``mmlu/raw/data/mmlu/dev/<subject>_dev.csv``."""
    root = resolve_data_dir(data_dir)
    dev_dir = root / "mmlu" / "raw" / "data" / "mmlu" / "dev"
    files = sorted(dev_dir.glob("*_dev.csv"))
    if not files:
        raise BenchmarkDataError(
            f"MMLU few-shot needs the dev split: no *_dev.csv under {dev_dir}. Point --data-dir at "
            "the benchmark root, or run with --few-shot 0."
        )
    pool = FewShotPool()
    for path in files:
        subject = path.name[: -len("_dev.csv")]
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            for row in reader:
                choices = tuple(row[f"choice{j}"] for j in range(4))
                pool.by_subject.setdefault(subject, []).append(
                    FewShotExample(
                        row["question"], choices, LETTERS[int(row["answer"])], subject=subject
                    )
                )
    return pool


def _read_parquet_rows(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq  # noqa: PLC0415 - optional dependency
    except ImportError as exc:
        raise BenchmarkDataError(
            f"reading {path} needs pyarrow (pip install pyarrow); it is only needed for "
            "MMLU-Pro few-shot. Run MMLU-Pro with --few-shot 0 otherwise."
        ) from exc
    return pq.read_table(path).to_pylist()


def load_mmlu_pro_validation(data_dir: str | os.PathLike[str] | None = None) -> FewShotPool:
    """MMLU-Pro ``validation`` split (70 CoT exemplars, 5 per category), needs pyarrow."""
    root = resolve_data_dir(data_dir)
    path = root / "mmlu_pro" / "raw" / "data" / "mmlu_pro" / "validation-00000-of-00001.parquet"
    if not path.is_file():
        raise BenchmarkDataError(
            f"MMLU-Pro few-shot needs {path}; point --data-dir at the benchmark root or use "
            "--few-shot 0."
        )
    pool = FewShotPool()
    for row in _read_parquet_rows(path):
        cot = str(row.get("cot_content") or "")
        # The upstream CoT starts with "A: Let's think step by step." and ends with
        # "The answer is (X)."; keep only the reasoning, the prompt adds both ends itself.
        cot = cot.removeprefix("A:").strip()
        cot = cot.removeprefix("Let's think step by step.").strip()
        cut = cot.rfind("The answer is")
        if cut >= 0:
            cot = cot[:cut].strip()
        ex = FewShotExample(
            str(row["question"]),
            tuple(str(o) for o in row["options"]),
            str(row["answer"]),
            rationale=cot,
            subject=str(row["category"]),
        )
        pool.by_subject.setdefault(ex.subject or "", []).append(ex)
    return pool


def load_mmlu_pro_categories(data_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """``question_id -> category`` from the raw MMLU-Pro test parquet (needs pyarrow)."""
    root = resolve_data_dir(data_dir)
    path = root / "mmlu_pro" / "raw" / "data" / "mmlu_pro" / "test-00000-of-00001.parquet"
    if not path.is_file():
        raise BenchmarkDataError(f"MMLU-Pro categories need {path}; use --few-shot 0 otherwise.")
    return {str(r["question_id"]): str(r["category"]) for r in _read_parquet_rows(path)}


def with_subjects(
    items: Sequence[BenchmarkItem], subjects: Mapping[str, str]
) -> list[BenchmarkItem]:
    """Copy of ``items`` with ``subject`` filled from ``subjects[id]`` where known."""
    out = []
    for it in items:
        subject = subjects.get(it.id, it.subject)
        out.append(BenchmarkItem(it.id, it.question, it.choices, it.answer, it.benchmark, subject))
    return out
