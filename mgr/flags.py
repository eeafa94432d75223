"""Derive argparse flags from a config dataclass, so a demo declares each option exactly once.

Field metadata: ``help`` (text), ``choices`` (allowed values) and ``aliases`` (more flag names, e.g. the name an
earlier script used). Supported types: int, float, str, bool (``--x``/``--no-x``), ``X | None`` of those, tuples of
int/float/str given comma-separated on the CLI, and ``dict[str, X]`` given as ``key=value,key=value``.

``--config file.toml`` (every demo): the file's keys are flag names (underscores or dashes) set as defaults, so the
file overrides the dataclass defaults and flags given on the command line override the file. Values are TOML
scalars, arrays (for list options) and tables (for mapping options, e.g. ``layer_sparsity = {"layer.3" = 0.8}``
or a ``[layer_sparsity]`` section); each goes through the same parser as its flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from mgr.errors import UserError


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
    if typing.get_origin(tp) is dict:
        scalar = _scalar_parser(typing.get_args(tp)[1])

        def parse_dict(text: str):
            items = {}
            for item in filter(None, (t.strip() for t in text.split(","))):
                key, eq, value = item.partition("=")
                if not eq or not key.strip():
                    raise argparse.ArgumentTypeError(f"expects key=value pairs, got {item!r}")
                items[key.strip().strip('"')] = scalar(value.strip())
            return items
        base = parse_dict
    elif typing.get_origin(tp) is tuple:
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
        shown = (",".join(map(str, default)) if isinstance(default, tuple)
                 else ",".join(f"{k}={v}" for k, v in default.items()) or "{}" if isinstance(default, dict)
                 else default)
        if tp is bool:
            group.add_argument(*names, dest=field.name, default=default, action=argparse.BooleanOptionalAction,
                               help=help_text)
            continue
        choices = field.metadata.get("choices")
        group.add_argument(*names, dest=field.name, default=default, type=_parser_for(tp, optional),
                           choices=choices, metavar=None if choices else tp.__name__.upper() if isinstance(tp, type)
                           else "K=V,..." if typing.get_origin(tp) is dict else "LIST",
                           help=f"{help_text} (default: {shown})")


def config_from_args(config_cls: type, args: argparse.Namespace) -> Any:
    return config_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)})


def add_config_file_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.toml", help="TOML file of option values (keys are flag names); "
                        "flags on the command line override it")


def config_file_defaults(parser: argparse.ArgumentParser, argv: list[str]) -> dict[str, Any]:
    """The values of the ``--config`` file named in ``argv`` (none: {}), parsed as their flags would be."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config is None:
        return {}
    path = Path(known.config)
    try:
        table = tomllib.loads(path.read_text())
    except OSError as e:
        raise UserError(f"--config {path}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--config {path}: not valid TOML ({e})") from None
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    values = {}
    for key, value in table.items():
        dest = key.replace("-", "_")
        if dest not in actions:
            raise UserError(f"--config {path}: unknown option {key!r}; see --help for the options")
        values[dest] = _file_value(actions[dest], value, f"--config {path}: {key}")
    return values


def _file_value(action: argparse.Action, value: Any, where: str) -> Any:
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(value, dict):
        text = ",".join(f"{k}={v}" for k, v in value.items())
    elif isinstance(value, list):
        text = ",".join(map(str, value))
    elif isinstance(value, bool):
        raise UserError(f"{where}: expects a value, not {str(value).lower()}")
    else:
        text = str(value)
    try:
        parsed = action.type(text) if action.type else text
    except (argparse.ArgumentTypeError, ValueError) as e:
        raise UserError(f"{where}: {e}") from None
    if action.choices is not None and parsed not in action.choices:
        raise UserError(f"{where} must be one of {', '.join(map(str, action.choices))}, got {parsed!r}")
    return parsed
