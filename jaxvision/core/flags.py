"""Command-line flags generated from dataclass fields: each flag is declared once, as a field.

A field becomes `--field-name` when its metadata holds a help text (`flag(...)`); the field's
type gives the argparse type, and a bool field becomes `--name/--no-name`. Every flag's parsed
default is None, so `values(args, cls)` returns only what the user typed; the dataclass fills in
the rest (`TrainConfig` from the arch's recipe). argparse from the standard library, because a
dataclass is already the schema and the help needs only what the metadata carries; no parser
library earns a dependency here.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line: `error: <what>; see --help`, exit 2 (argparse
    prints the whole usage block first)."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")

    def refuse_empty(self, args: argparse.Namespace, *names: str) -> None:
        """A usage error for flag `names` given as an empty string (an unset shell variable:
        `--out "$OUT"`), which would otherwise read as not given."""
        for name in names:
            if message := empty(name, getattr(args, name)):
                self.error(message)


def empty(name: str, value) -> str | None:
    """The usage error for field `name`'s flag given as an empty (or blank) string, else None."""
    if isinstance(value, str) and not value.strip():
        flag_name = name.replace("_", "-")
        return f"--{flag_name} is empty; give a value, or leave the flag out for its default"
    return None


# Field metadata key: see `flag`.
KEY = "flag"


def flag(help: str, *, group: str, aliases: tuple[str, ...] = (), choices=None) -> dict:
    """A field's metadata that makes it a command-line flag, shown in help group `group`."""
    return {KEY: {"help": help, "group": group, "aliases": aliases, "choices": choices}}


def _scalar_type(annotation) -> type:
    """`int`, `float | None`, ... -> the type a flag's string is parsed with."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (annotation,) = args
    return annotation


def add_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    groups: dict[str, argparse._ArgumentGroup] | None = None,
    default_text: Callable[[dataclasses.Field], str | None] | None = None,
) -> dict[str, argparse._ArgumentGroup]:
    """Adds a flag for each field of dataclass `cls` that has `flag` metadata; returns the
    argument groups by name (pass them back in to add more fields to the same groups).

    default_text(field) is shown after the help; by default the field's own default.
    """
    groups = {} if groups is None else groups
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(KEY)
        if meta is None:
            continue
        group = groups.get(meta["group"])
        if group is None:
            group = groups[meta["group"]] = parser.add_argument_group(meta["group"])
        kind = _scalar_type(hints[f.name])
        shown = default_text(f) if default_text else None
        if shown is None and f.default is not None and kind is not bool:
            shown = f"(default: {f.default})"
        help_text = meta["help"] + (f" {shown}" if shown else "")
        names = ["--" + f.name.replace("_", "-"), *meta["aliases"]]
        kwargs = dict(dest=f.name, default=None, help=help_text.replace("%", "%%"))
        if kind is bool:
            group.add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            group.add_argument(*names, type=kind, choices=meta["choices"], **kwargs)
    return groups


def values(args: argparse.Namespace, cls: type) -> dict:
    """The flags of `cls`'s fields that were given on the command line."""
    names = {f.name for f in dataclasses.fields(cls) if KEY in f.metadata}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}
