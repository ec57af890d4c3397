"""Command-line flags generated from a config dataclass: each field is declared once, with its help.

    max_steps: int = flag(help="optimizer steps in all")            # -> --max-steps N (required: no default)
    use_gpu: bool = flag(False, help="one GPU per worker")           # -> --use-gpu (a switch)
    overrides: dict = flag(default_factory=dict, help="...")         # -> --overrides '{"depth": 3}' (JSON)

The flag is the field name with '-' for '_'; its type, default and required-ness come from the
field, and `stages` / `required_for` / `choices` / `aliases` from the flag() call. One function
over dataclasses.fields rather than tyro or simple-parsing: neither is a dependency here, and
this keeps today's flag names, aliases and one-line errors (OneLineParser) exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import MISSING


def flag(
    default=MISSING,
    *,
    help: str,
    default_factory=MISSING,
    stages: tuple[str, ...] | None = None,  # noqa: A002 - argparse's word
    required_for: tuple[str, ...] = (),
    choices: tuple | None = None,
    aliases: tuple[str, ...] = (),
    name: str | None = None,
    convert=None,
):
    """A dataclass field that is also a flag. stages: the jobs that have it (None: all);
    required_for: the jobs where it must be given; help may name the job as {stage}; name: the
    flag when it is not the field's name; convert: the parsed string -> the field's value (e.g. a
    preset name -> its Preset), applied by values()."""
    metadata = {
        "help": help,
        "stages": stages,
        "required_for": required_for,
        "choices": choices,
        "aliases": aliases,
        "name": name,
        "convert": convert,
    }
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('must be a JSON object such as {"depth": 3}')
    return value


def _value_type(hint):
    """int | None -> int; the types a flag parses to."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def add_flags(parser: argparse.ArgumentParser, cls, stage: str | None = None, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of dataclass `cls` that has flag() metadata, for job `stage`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta or f.name in skip or (meta["stages"] is not None and stage not in meta["stages"]):
            continue
        kind = str if meta["convert"] else _value_type(hints[f.name])
        options: dict = {"dest": f.name, "help": meta["help"].replace("{stage}", str(stage))}
        if kind is bool:
            options["action"] = "store_true"
        else:
            options["type"] = json_object if kind is dict else kind
        if meta["choices"]:
            options["choices"] = list(meta["choices"])
        elif kind is not bool:
            options["metavar"] = (meta["name"] or f.name).lstrip("-").replace("-", "_").upper()
        no_default = f.default is MISSING and f.default_factory is MISSING
        if no_default or stage in meta["required_for"]:
            options["required"] = True
        else:
            options["default"] = f.default_factory() if f.default is MISSING else f.default
        parser.add_argument(meta["name"] or "--" + f.name.replace("_", "-"), *meta["aliases"], **options)


def values(cls, namespace: argparse.Namespace) -> dict:
    """The parsed flags that are fields of `cls`, converted where the field says how."""
    parsed = vars(namespace)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in parsed:
            convert = f.metadata.get("convert")
            out[f.name] = convert(parsed[f.name]) if convert and parsed[f.name] is not None else parsed[f.name]
    return out
