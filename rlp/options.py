"""One command-line grammar for every ``rlp`` subcommand (``rlp.cli`` dispatches to them).

Every subcommand accepts

* its ``--flags`` (the names users already type; short aliases such as ``-p`` stay), and
* ``key=value`` words, in any order among the flags:

  - ``key=value`` (or ``COMMAND.key=value``) sets the command's own option of that name, the
    flag's name with ``_`` or ``-`` (``limit=20`` is ``--limit 20``, ``max_new_tokens=64`` is
    ``--max-new-tokens 64``; ``no_progress=true`` is ``--no-progress``);
  - ``section.key=value`` sets a key of the run config (``rollout.num_thoughts=8``) for the
    commands that load one (``train``, ``config``, ``submit``); :func:`rlp.config.load_config`
    checks it.

Keys are strict: an unknown one is an error naming the closest valid key, like an unknown config
key. Values are read as YAML scalars where the option has no type of its own.

Options backed by a dataclass get their flags from the dataclass itself (:func:`add_fields`: name,
type, default, and the docstring under each field as help) and come back as that dataclass
(:func:`build`), so no field is copied by hand between a parser and its options object.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from rlp.config import SECTIONS, ConfigError, field_docs

WORDS = "_words"
"""Namespace attribute that collects the ``key=value`` words before they are applied."""


class ArgsChecked(Exception):  # noqa: N818 - a signal, not an error
    """Raised by :func:`parse` under :func:`check_only` once a command line parsed cleanly."""


_check_only = False
_parsing = 0  # depth of parse() calls: argparse calls inside them are not the last word


class check_only:  # noqa: N801 - used as a context manager, like contextlib's
    """``with check_only(): main(argv)``: parse and check ``argv`` with the command's own parser,
    then stop with :class:`ArgsChecked` before the command does anything (documentation tests).
    A command that parses with plain argparse instead of :func:`parse` is stopped the same way
    after its ``parse_known_args``."""

    def __enter__(self) -> check_only:
        global _check_only
        self._previous, _check_only = _check_only, True
        self._original = original = argparse.ArgumentParser.parse_known_args

        def stop_after(parser, args=None, namespace=None):  # type: ignore[no-untyped-def]
            result = original(parser, args, namespace)
            if not _parsing:
                raise ArgsChecked(parser.prog)
            return result

        argparse.ArgumentParser.parse_known_args = stop_after  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        global _check_only
        _check_only = self._previous
        argparse.ArgumentParser.parse_known_args = self._original  # type: ignore[method-assign]


DEFAULT_CONFIG = "tiny_cpu"
"""The run config of ``rlp train`` / ``rlp config`` without ``--config``."""


def config_parser(
    prog: str, description: str, *, required: bool = False
) -> argparse.ArgumentParser:
    """A parser for a command that loads a run config: ``--config FILE|NAME`` (a YAML file or the
    name of a bundled config) plus ``section.key=value`` words (:func:`parse` with
    ``run_config=True`` returns them as ``namespace.overrides``)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--config",
        default=None if required else DEFAULT_CONFIG,
        required=required,
        metavar="FILE|NAME",
        help="run config: a YAML file or a bundled config name",
    )
    return parser


# ------------------------------------------------------------------------------------------------
# Flags from dataclass fields


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def add_fields(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    aliases: Mapping[str, Sequence[str]] | None = None,
    names: Mapping[str, Sequence[str]] | None = None,
    skip: Iterable[str] = (),
    metavars: Mapping[str, str] | None = None,
) -> None:
    """Add one flag per field of dataclass ``cls``: ``--field-name`` plus ``aliases[field]``
    (or exactly ``names[field]``, for flags whose established name differs from the field's),
    typed from the annotation (``bool`` -> ``--x/--no-x``, ``Literal`` -> choices, ``X | None``
    -> X with default None), the field's default, and its docstring as help (a parser with
    ``argparse.ArgumentDefaultsHelpFormatter`` shows the defaults)."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    aliases, names, metavars = aliases or {}, names or {}, metavars or {}
    skipped = set(skip)
    for f in dataclasses.fields(cls):
        if f.name in skipped:
            continue
        tp = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        kwargs: dict[str, Any] = {"dest": f.name, "default": default}
        help_text = docs.get(f.name, "").rstrip(".").replace("``", "")
        flags = list(names.get(f.name) or [_flag(f.name), *aliases.get(f.name, ())])
        metavar = metavars.get(f.name, flags[0].lstrip("-").replace("-", "_").upper())
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is Literal:
            kwargs["choices"] = list(typing.get_args(tp))
        elif tp in (int, float, str, Path):
            kwargs["type"] = tp
            kwargs["metavar"] = metavar
        elif typing.get_origin(tp) in (list, tuple):
            kwargs["action"] = "append"
            kwargs["default"] = []
            kwargs["metavar"] = metavars.get(f.name, "VALUE")  # one value per flag
            help_text += " (repeatable)"
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no flag for annotation {tp!r}")
        kwargs["help"] = help_text.replace("%", "%%")
        parser.add_argument(*flags, **kwargs)


def build(cls: type, namespace: argparse.Namespace, **extra: Any) -> Any:
    """The dataclass ``cls`` from the parsed ``namespace`` (fields by name; ``extra`` wins)."""
    values = {
        f.name: getattr(namespace, f.name)
        for f in dataclasses.fields(cls)
        if f.init and hasattr(namespace, f.name)
    }
    values.update(extra)
    return cls(**values)


# ------------------------------------------------------------------------------------------------
# Parsing: flags + key=value words


def _closest(name: str, options: Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Settable options by key: the dest, and every long flag without its dashes."""
    out: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue  # positionals are given as words of their own
        out.setdefault(action.dest, action)
        for flag in action.option_strings:
            if flag.startswith("--"):
                out.setdefault(flag[2:].replace("-", "_"), action)
    return out


def _value(action: argparse.Action, key: str, raw: str, current: Any) -> Any:
    """Convert the text of ``key=raw`` as the flag ``action`` would (booleans: true/false;
    ``no_x=true`` of a ``--x/--no-x`` flag is ``x=false``; a repeatable flag appends)."""
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
        value = yaml.safe_load(raw) if raw.strip() else None
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {raw!r}")
        if isinstance(action, argparse.BooleanOptionalAction):
            negated = key.rsplit(".", 1)[-1].replace("-", "_").startswith("no_")
            return value != negated if negated and action.dest != key else value
        if isinstance(action, argparse._StoreTrueAction):
            return value
        if isinstance(action, argparse._StoreFalseAction):
            return not value
        return action.const if value else action.default
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    items = [s for s in raw.split(",") if s] if many else [raw]
    try:
        parsed = [action.type(s) if callable(action.type) else s for s in items]
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise ConfigError(f"{key}: invalid value {raw!r}") from None
    if action.choices is not None:
        bad = [p for p in parsed if p not in action.choices]
        if bad:
            choices = ", ".join(map(str, action.choices))
            raise ConfigError(f"{key}: {bad[0]!r} is not one of {choices}")
    if isinstance(action, argparse._AppendAction):
        return [*(current or []), *parsed]
    return parsed if many else parsed[0]


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def parse(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    *,
    run_config: bool = False,
) -> argparse.Namespace:
    """Parse ``argv`` with ``parser`` plus ``key=value`` words (see the module doc).

    With ``run_config`` the ``section.key=value`` words are returned in ``namespace.overrides``
    (in order) for :func:`rlp.config.load_config`; otherwise they are an error. A parser with
    subcommands (``rlp convert hf-to-mcore ...``) applies the words to the chosen subcommand.
    Under :func:`check_only` raises :class:`ArgsChecked` once everything parsed.
    """
    global _parsing
    argv = list(sys.argv[1:] if argv is None else argv)
    sub = _subparsers(parser)
    _parsing += 1
    try:
        if sub is not None:
            namespace = _parse_with_subcommand(parser, sub, argv, run_config)
        else:
            namespace = _parse_flat(parser, argv, run_config)
    finally:
        _parsing -= 1
    if _check_only:
        raise ArgsChecked(parser.prog)
    return namespace


def _parse_flat(
    parser: argparse.ArgumentParser, argv: list[str], run_config: bool
) -> argparse.Namespace:
    if not any(a.dest == WORDS for a in parser._actions):
        parser.add_argument(
            WORDS,
            nargs="*",
            default=[],
            metavar="key=value",
            help="options as key=value (key: a flag's name)"
            + ("; run-config keys as section.key=value" if run_config else ""),
        )
    # A required flag may come as key=value: argparse must not insist on it before the words.
    must = [a for a in parser._actions if a.option_strings and a.required]
    for action in must:
        action.required = False
    try:
        namespace = parser.parse_intermixed_args(argv)
    finally:
        for action in must:
            action.required = True
    words = getattr(namespace, WORDS)
    delattr(namespace, WORDS)
    overrides = list(getattr(namespace, "overrides", None) or []) if run_config else []
    actions = _option_actions(parser)
    command = parser.prog.split()[-1]
    words = _reclaim_words(parser, namespace, actions, command, run_config) + words
    for word in words:
        key, sep, raw = word.partition("=")
        if not sep or not key:
            parser.error(f"unexpected argument {word!r}: give options as --flag or key=value")
        section = key.split(".", 1)[0]
        if run_config and "." in key and section in SECTIONS:
            overrides.append(word)
            continue
        name = key[len(command) + 1 :] if key.startswith(command + ".") else key
        action = actions.get(name.replace("-", "_"))
        if action is None:
            valid = sorted({a.dest for a in actions.values()})
            parser.error(_unknown(parser.prog, key, valid, run_config))
        try:
            current = getattr(namespace, action.dest, None)
            setattr(namespace, action.dest, _value(action, name, raw, current))
        except ConfigError as exc:
            parser.error(str(exc))  # usage + one line, exit 2, like an unknown --flag
    if run_config:
        namespace.overrides = overrides
    missing = [a.option_strings[0] for a in must if getattr(namespace, a.dest) in (None, [])]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    return namespace


def _is_word(text: str, actions: dict, command: str, run_config: bool) -> bool:
    key, sep, _ = text.partition("=")
    if not sep or text.startswith("-"):
        return False
    name = key[len(command) + 1 :] if key.startswith(command + ".") else key
    return name.replace("-", "_") in actions or (
        run_config and "." in key and key.split(".", 1)[0] in SECTIONS
    )


def _reclaim_words(
    parser: argparse.ArgumentParser,
    namespace: argparse.Namespace,
    actions: dict[str, argparse.Action],
    command: str,
    run_config: bool,
) -> list[str]:
    """A flag taking several values (``--input a b``) swallows the words after it; give back
    those that name an option (``--input a tokenizer=T`` sets ``tokenizer``)."""
    reclaimed: list[str] = []
    for action in parser._actions:
        values = getattr(namespace, action.dest, None)
        if not action.option_strings or action.nargs not in ("+", "*") or not values:
            continue
        if not isinstance(values, list) or values == action.default:
            continue
        kept = [
            v
            for v in values
            if not (isinstance(v, str) and _is_word(v, actions, command, run_config))
        ]
        reclaimed += [v for v in values if v not in kept]
        if action.nargs == "+" and not kept:
            parser.error(f"argument {action.option_strings[0]}: expected at least one argument")
        setattr(namespace, action.dest, kept)
    return reclaimed


def _unknown(prog: str, key: str, valid: list[str], run_config: bool) -> str:
    section = key.split(".", 1)[0]
    hint = _closest(key.replace("-", "_"), valid)
    if not hint and "." in key:
        hint = (
            _closest(section, SECTIONS)
            if run_config
            else f" ({prog} takes no run-config keys such as {key})"
        )
    more = "; run-config keys as section.key=value" if run_config else ""
    return f"unknown option '{key}' for {prog}{hint}; options: {', '.join(valid)}{more}"


def _parse_with_subcommand(
    parser: argparse.ArgumentParser,
    sub: argparse._SubParsersAction,
    argv: list[str],
    run_config: bool,
) -> argparse.Namespace:
    at = next((i for i, word in enumerate(argv) if word in sub.choices), None)
    if at is None:
        return parser.parse_args(argv)  # argparse's own usage error (or --help)
    if at > 0:  # options of the top-level parser itself: argparse's own handling
        return parser.parse_args(argv)
    namespace = _parse_flat(sub.choices[argv[at]], argv[at + 1 :], run_config)
    setattr(namespace, sub.dest, argv[at])
    return namespace
