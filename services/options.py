"""Command-line flags and `TWOLANE_*` environment variables from config declarations.

A config is a frozen dataclass whose fields are declared with `scheduler.config.option`
(help text, and the flag name where it differs from the field's). These functions add
one flag per field, build the config back from parsed flags, and turn a config into
the flags a child process needs to rebuild it. A field whose type is itself such a
dataclass is a group: its options are added and read in place.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")

_TRUE = ("1", "true", "yes", "on")


@dataclasses.dataclass(frozen=True)
class _Option:
    field: dataclasses.Field[Any]
    kind: Any  # the field's resolved type
    flag: str  # without dashes
    env: str

    @property
    def dest(self) -> str:
        return self.flag.replace("-", "_")


@functools.cache
def _options(cls: type) -> tuple[_Option | tuple[str, type], ...]:
    """The options of `cls` in declaration order; a group is (field name, its class)."""
    hints = typing.get_type_hints(cls)
    found: list[_Option | tuple[str, type]] = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            found.append((f.name, kind))  # type: ignore[arg-type]
            continue
        if "help" not in f.metadata:
            continue  # set in code, not from the command line
        flag = f.metadata.get("flag") or f.name.replace("_", "-")
        env = f.metadata.get("env") or "TWOLANE_" + flag.replace("-", "_").upper()
        found.append(_Option(f, kind, flag, env))
    return tuple(found)


def _leaves(cls: type) -> list[_Option]:
    leaves: list[_Option] = []
    for item in _options(cls):
        if isinstance(item, _Option):
            leaves.append(item)
        else:
            leaves.extend(_leaves(item[1]))
    return leaves


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"option {f.name} has no default")


def _parse_env(option: _Option, raw: str) -> Any:
    if option.kind is bool:
        return raw.strip().lower() in _TRUE
    if option.kind == tuple[str, ...]:
        return tuple(item.strip() for item in raw.split(",") if item.strip())
    return raw  # argparse applies `type` to string defaults


def add_options(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    skip: frozenset[str] = frozenset(),
    helps: Mapping[str, str] | None = None,
) -> None:
    """Add a flag for every option of `cls` (and its groups) not named in `skip`;
    `helps` replaces the help text of some (by dest), where a command means them
    differently."""
    for option in _leaves(cls):
        if option.dest in skip:
            continue
        f = option.field
        default = _default(f)
        if option.env in os.environ:
            default = _parse_env(option, os.environ[option.env])
        help_text = f"{(helps or {}).get(option.dest, f.metadata['help'])} (env {option.env})"
        kwargs: dict[str, Any] = {"dest": option.dest, "default": default, "help": help_text}
        if option.kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif option.kind == tuple[str, ...]:
            kwargs["action"] = "append"
            kwargs["default"] = list(default)
        else:
            kwargs["type"] = option.kind
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
        parser.add_argument("--" + option.flag, **kwargs)


def from_args(cls: type[T], args: argparse.Namespace, **values: Any) -> T:
    """Build `cls` from parsed flags; `values` set fields that have no flag."""
    built: dict[str, Any] = {}
    klass: type = cls  # mypy reads `type[T]` as not Hashable (for the cache); a class is
    for item in _options(klass):
        if isinstance(item, _Option):
            if hasattr(args, item.dest):
                value = getattr(args, item.dest)
                built[item.field.name] = tuple(value) if isinstance(value, list) else value
        else:
            name, group = item
            built[name] = from_args(group, args)
    return cls(**{**built, **values})


def to_argv(config: Any, *, skip: frozenset[str] = frozenset()) -> list[str]:
    """The flags that rebuild `config` in another process (every option, explicitly)."""
    argv: list[str] = []
    klass: type = type(config)
    for item in _options(klass):
        if isinstance(item, tuple):
            argv.extend(to_argv(getattr(config, item[0]), skip=skip))
            continue
        if item.dest in skip:
            continue
        value = getattr(config, item.field.name)
        if item.kind is bool:
            argv.append(("--" if value else "--no-") + item.flag)
        elif item.kind == tuple[str, ...]:
            for element in value:
                argv.extend(["--" + item.flag, str(element)])
        else:
            argv.extend(["--" + item.flag, str(value)])
    return argv
