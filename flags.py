"""
flags.py: command-line flags from a dataclass, and one-line errors for bad input.

Every field of a program's config dataclass becomes a flag --name with its default and help; its
metadata says which values make sense (at_least, above, at_most, below, choices), and parse_config
refuses any other value, and every NaN or infinite float, before any work starts. Functions that
meet input the user has to fix call fail(message); run() prints that message as one line and exits
with code 2: the user has something to fix, not a bug to report.

`--config FILE` (grpo.py and sft.py) reads a recipe: one TOML file per experiment (recipes/), its
top-level keys shared by both programs (the task, the model, the seed: written once), then a section
per program:

    task = "simple_equations"       # every program that reads the file
    [sft]
    epochs = 1
    [grpo]
    learning_rate = 1e-4

Flags given on the command line override the file. TOML because Python reads it without a dependency
(tomllib) and its values are typed: 1e-4 is a float, "1e-4" a string.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import tomllib
from dataclasses import field

PROGRAMS = ("sft", "grpo")  # the sections a recipe may have


class BadInput(Exception):
    """Input the user has to fix (a flag, a file, a model): the message says what to do."""


def fail(msg: str):
    raise BadInput(msg)


def opt(default, help: str, **check):
    """A config field: its default, its one-line help, and the values it accepts (at_least=, above=,
    at_most=, below=, choices=)."""
    return field(default=default, metadata={"help": help, **check})


def check_value(name: str, value, meta: dict) -> None:
    """The one-line error for a value outside what the field accepts."""
    if isinstance(value, float) and not math.isfinite(value):
        fail(f"--{name} {value}: must be a finite number")
    for key, ok, words in (("at_least", lambda v, b: v >= b, "at least"),
                           ("above", lambda v, b: v > b, "above"),
                           ("at_most", lambda v, b: v <= b, "at most"),
                           ("below", lambda v, b: v < b, "below")):
        if key in meta and not ok(value, meta[key]):
            fail(f"--{name} {value}: must be {words} {meta[key]}")
    if "choices" in meta and value not in meta["choices"]:
        fail(f"--{name} {value}: choose {', '.join(map(str, meta['choices']))}")


def field_type(f) -> type:
    return {"int": int, "float": float, "str": str, "bool": bool}.get(f.type, f.type)


def read_recipe(path: str, cls, program: str) -> dict:
    """The values a recipe file gives `program`: its top-level keys and those of its own section,
    each checked as its flag would be; the errors name the file and the key."""
    if not os.path.isfile(path):
        fail(f"--config {path}: no such file")
    try:
        with open(path, "rb") as f:
            recipe = tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        fail(f"--config {path}: not valid TOML ({e})")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    sections = [k for k, v in recipe.items() if isinstance(v, dict)]
    for section in sections:
        if section not in PROGRAMS:
            fail(f"{path}: unknown section [{section}]; a recipe has top-level keys and "
                 f"[{'], ['.join(PROGRAMS)}]")
    shared = [("", k, v) for k, v in recipe.items() if k not in sections]
    values = {}
    own = [(f"[{program}] ", k, v) for k, v in recipe.get(program, {}).items()]
    for where, key, value in shared + own:
        if key not in fields:
            hint = ": put it under the section of the program that has it" if not where else ""
            fail(f"{path}: {where}{key} is not a flag of {program}.py{hint} ({program}.py --help "
                 f"lists them)")
        typ = field_type(fields[key])
        if typ is float and type(value) is int:
            value = float(value)
        if type(value) is not typ:
            fail(f"{path}: {where}{key} = {json.dumps(value)}: must be {typ.__name__} (like its "
                 f"default, {json.dumps(fields[key].default)})")
        try:
            check_value(key, value, fields[key].metadata)
        except BadInput as e:
            fail(f"{path}: {where}{e}")
        values[key] = value
    return values


def to_toml(cfg, program: str) -> str:
    """cfg as a recipe of one section, which --config reads back to the same values (the resolved
    configuration a run keeps in its out_dir)."""
    lines = [f"[{program}]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in dataclasses.asdict(cfg).items()]
    return "\n".join(lines) + "\n"


def parse_config(cls, argv=None, doc: str = "", program: str | None = None):
    """The dataclass `cls` filled from the command line, every value checked against its field's
    metadata. program: the section of a --config recipe this program reads (None: no --config)."""
    p = argparse.ArgumentParser(description=doc.strip().split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = lambda msg: fail(f"{msg} (--help lists every flag; a negative value is written "
                               f"--flag=-1e-5)")
    if program:
        p.add_argument("--config", default="",
                       help=f"a recipe (TOML): its top-level keys and its [{program}] section "
                            "set flags; the command line overrides them")
    for f in dataclasses.fields(cls):
        help = f.metadata["help"].replace("%", "%%")
        if f.type is bool or f.type == "bool":
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default,
                           help=help)
        else:
            p.add_argument(f"--{f.name}", type=field_type(f), default=f.default, help=help)
    if program:
        known, _ = p.parse_known_args(argv)
        if known.config:
            p.set_defaults(**read_recipe(known.config, cls, program))
    args = vars(p.parse_args(argv))
    args.pop("config", None)
    cfg = cls(**args)
    for f in dataclasses.fields(cls):
        check_value(f.name, getattr(cfg, f.name), f.metadata)
    return cfg


def run(main, cls, doc: str = "", program: str | None = None) -> None:
    """main(config parsed from the command line), with bad input reported as one line on stderr and
    exit code 2."""
    try:
        main(parse_config(cls, doc=doc, program=program))
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
