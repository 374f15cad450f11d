"""Command-line flags generated from a config dataclass, so that each option is declared once.

`add_flags(parser, Config)` gives every field of `Config` a `--field-name` flag: its type and
default are the field's, its help is the field's trailing `# comment` in the class source
(inherited fields included). `build(Config, args)` makes the dataclass back from the parsed
flags. How each annotation becomes a flag:

    bool                    --x / --no-x
    int, float, str, Path   one value of that type
    X | None                a value of type X; the default stays None
    Literal["a", "b"]       one of the literals
    tuple[X, ...], list[X]  a comma-separated list, e.g. --betas 0.9,0.95
    dict[str, X]            repeated KEY=VALUE, each VALUE read as JSON when it parses

`Flag` adjusts one field's flag where the command line has always differed from the
dataclass (an alias, a required flag, a default computed later); `choices` take a field's
allowed values from the registry that defines them.

`LazyParser` is the subcommand parser: its registry- and dataclass-driven flags are added when
that subcommand is parsed or its help shown, so `septet --help` and the other verbs do not
import torch for them.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import textwrap
import tokenize
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

_AS_FIELD = object()  # Flag.default: the field's own default


@dataclasses.dataclass(frozen=True)
class Flag:
    """How one field's flag departs from what its dataclass field implies."""

    aliases: tuple[str, ...] = ()  # other option strings, shown before --field-name, e.g. ("--set",)
    help: str | None = None  # instead of the field's comment
    default: Any = _AS_FIELD  # instead of the field's default (e.g. None: computed later)
    required: bool | None = None  # None: required when the field has no default
    metavar: str | None = None


class LazyParser(argparse.ArgumentParser):
    """An ArgumentParser that adds some of its flags on first use (parse or help)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deferred: list[Callable[[argparse.ArgumentParser], Any]] = []

    def defer(self, add: Callable[[argparse.ArgumentParser], Any]) -> None:
        """Run `add(self)` just before this parser is first used."""
        self._deferred.append(add)

    def complete(self) -> LazyParser:
        """Add every deferred flag now (parsing and help do this themselves)."""
        while self._deferred:
            self._deferred.pop(0)(self)
        return self

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        self.complete()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self.complete()
        return super().format_help()

    def format_usage(self) -> str:
        self.complete()
        return super().format_usage()


def field_comments(cls: type) -> dict[str, str]:
    """Each dataclass field's trailing `# comment` in the source of `cls` or of the base class
    that declares it (a subclass's comment wins). Fields without one, or classes whose
    source is unavailable, are left out."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        comments = {tok.start[0]: tok.string.lstrip("#").strip()
                    for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                    if tok.type == tokenize.COMMENT}
        body = ast.parse(source).body[0]
        for node in getattr(body, "body", []):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                lines = range(node.lineno, (node.end_lineno or node.lineno) + 1)
                text = " ".join(comments[n] for n in lines if n in comments)
                if text:
                    out[node.target.id] = text
    return out


def option(name: str) -> str:
    """The flag of field `name`: `--field-name`."""
    return "--" + name.replace("_", "-")


def _comma_list(kind: Callable[[str], Any], container: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return container(kind(part.strip()) for part in text.split(",") if part.strip())

    parse.__name__ = f"comma-separated {getattr(kind, '__name__', 'value')} list"
    return parse


class _KeyValues(argparse.Action):
    """Repeated KEY=VALUE into a dict; VALUE is read as JSON when it parses, else kept as text."""

    def __call__(self, parser, namespace, values, option_string=None):
        key, sep, value = str(values).partition("=")
        if not sep or not key:
            parser.error(f"{option_string} {values!r}: expected KEY=VALUE, e.g. {option_string} n_layer=4")
        items = dict(getattr(namespace, self.dest) or {})  # never the shared default
        try:
            items[key] = json.loads(value)
        except json.JSONDecodeError:
            items[key] = value
        setattr(namespace, self.dest, items)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _unwrap_optional(kind: Any) -> Any:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return kind


def _type_kwargs(name: str, kind: Any) -> dict[str, Any]:
    """argparse keywords for a field annotated `kind`; TypeError for a type with no flag form."""
    kind = _unwrap_optional(kind)
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    if kind in (int, float, str, Path):
        return {"type": kind}
    if origin is typing.Literal:
        return {"type": type(args[0]), "choices": args}
    if origin in (tuple, list) and args:
        elem = args[0]
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis) and len(set(args)) != 1:
            raise TypeError(f"field {name}: mixed tuple {kind} has no flag form")
        if elem not in (int, float, str, Path):
            raise TypeError(f"field {name}: list of {elem} has no flag form")
        return {"type": _comma_list(elem, origin), "metavar": f"{elem.__name__.upper()},..."}
    if origin is dict:
        return {"action": _KeyValues, "metavar": "KEY=VALUE"}
    raise TypeError(f"field {name}: type {kind} has no flag form; give it a Flag or leave it out")


def add_flags(parser: argparse.ArgumentParser, cls: type, *,
              flags: Mapping[str, Flag] | None = None,
              choices: Mapping[str, Iterable[Any]] | None = None,
              skip: Iterable[str] = ()) -> list[str]:
    """Give `parser` one flag per init field of dataclass `cls` (except `skip`); returns the
    field names given flags, in declaration order."""
    flags, choices, skip = dict(flags or {}), dict(choices or {}), set(skip)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = (set(flags) | set(choices) | skip) - known
    if unknown:
        raise ValueError(f"{cls.__name__} has no field {', '.join(sorted(unknown))}")
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    added = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name in skip:
            continue
        spec = flags.get(f.name, Flag())
        kw = _type_kwargs(f.name, hints[f.name])
        if f.name in choices:
            kw["choices"] = tuple(choices[f.name])
            kw.pop("metavar", None)
        if spec.metavar is not None:
            kw["metavar"] = spec.metavar
        default = _field_default(f) if spec.default is _AS_FIELD else spec.default
        required = spec.required if spec.required is not None else default is dataclasses.MISSING
        help_text = (spec.help if spec.help is not None else comments.get(f.name, "")).replace("%", "%%")
        action = parser.add_argument(*spec.aliases, option(f.name), dest=f.name, required=required,
                                     default=None if default is dataclasses.MISSING else default,
                                     help=help_text, **kw)
        hidden = default is None or default is dataclasses.MISSING or (isinstance(default, (dict, list, tuple))
                                                                        and not default)
        if not hidden and "%(default)" not in (action.help or ""):  # some Pythons add it to --x/--no-x
            action.help = f"{action.help} (default: %(default)s)".lstrip()
        added.append(f.name)
    return added


def build(cls: type, args: argparse.Namespace, **given: Any) -> Any:
    """`cls` from the parsed flags of its fields; `given` (e.g. a value computed from several
    flags) wins over the flags, and fields without a flag keep their defaults."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
              if f.init and hasattr(args, f.name)}
    return cls(**{**values, **given})


__all__ = ["Flag", "LazyParser", "add_flags", "build", "field_comments", "option"]
