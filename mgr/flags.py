"""Derive argparse flags from a config dataclass, so a demo declares each option exactly once.

Field metadata: ``help`` (text), ``choices`` (allowed values) and ``aliases`` (more flag names, e.g. the name an
earlier script used). Supported types: int, float, str, bool
(``--x``/``--no-x``), ``X | None`` of those, and tuples of int/float/str given comma-separated on the CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _whole_number(text: str) -> int:
    """An int, also written in float notation (1e4, 2048.0), as sizes and step counts often are."""
    try:
        return int(text)
    except ValueError:
        value = float(text)
        if not value.is_integer():
            raise
        return int(value)


def _scalar_parser(tp: type):
    convert = _whole_number if tp is int else tp

    def parse(text: str):
        try:
            return convert(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expects {tp.__name__}, got {text!r}") from None
    return parse


def _parser_for(tp: Any, optional: bool):
    if typing.get_origin(tp) is tuple:
        elem = typing.get_args(tp)[0]
        scalar = _scalar_parser(elem)

        def parse_tuple(text: str):
            return tuple(scalar(t.strip()) for t in text.split(",") if t.strip())
        base = parse_tuple
    else:
        base = _scalar_parser(tp)
    if not optional:
        return base
    return lambda text: None if text.lower() in ("none", "") else base(text)


def add_config_flags(parser: argparse.ArgumentParser, config_cls: type) -> None:
    hints = typing.get_type_hints(config_cls)
    group = parser.add_argument_group("demo options")
    for field in dataclasses.fields(config_cls):
        flag = "--" + field.name.replace("_", "-")
        tp, optional = _unwrap_optional(hints[field.name])
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        help_text = field.metadata.get("help", "")
        names = (flag, *field.metadata.get("aliases", ()))
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        if tp is bool:
            group.add_argument(*names, dest=field.name, default=default, action=argparse.BooleanOptionalAction,
                               help=help_text)
            continue
        choices = field.metadata.get("choices")
        group.add_argument(*names, dest=field.name, default=default, type=_parser_for(tp, optional),
                           choices=choices, metavar=None if choices else tp.__name__.upper() if isinstance(tp, type)
                           else "LIST", help=f"{help_text} (default: {shown})")


def config_from_args(config_cls: type, args: argparse.Namespace) -> Any:
    return config_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)})
