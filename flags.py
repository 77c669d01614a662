"""
flags.py: command-line flags from a dataclass, and one-line errors for bad input.

Every field of a program's config dataclass becomes a flag --name with its default and help; its metadata says
which values make sense (at_least, above, at_most, below, choices), and parse_config refuses any other value,
and every NaN or infinite float, before any work starts. Functions that meet input the user has to fix call
fail(message); run() prints that message as one line and exits with code 2: the user has something to fix, not a
bug to report.
"""
import argparse
import dataclasses
import math
import sys
from dataclasses import field


class BadInput(Exception):
    """Input the user has to fix (a flag, a file, a model): the message says what to do."""


def fail(msg: str):
    raise BadInput(msg)


def opt(default, help: str, **check):
    """A config field: its default, its one-line help, and the values it accepts (at_least=, above=, at_most=,
    below=, choices=)."""
    return field(default=default, metadata={"help": help, **check})


def check_value(name: str, value, meta: dict) -> None:
    """The one-line error for a value outside what the field accepts."""
    if isinstance(value, float) and not math.isfinite(value):
        fail(f"--{name} {value}: must be a finite number")
    for key, ok, words in (("at_least", lambda v, b: v >= b, "at least"), ("above", lambda v, b: v > b, "above"),
                           ("at_most", lambda v, b: v <= b, "at most"), ("below", lambda v, b: v < b, "below")):
        if key in meta and not ok(value, meta[key]):
            fail(f"--{name} {value}: must be {words} {meta[key]}")
    if "choices" in meta and value not in meta["choices"]:
        fail(f"--{name} {value}: choose {', '.join(map(str, meta['choices']))}")


def parse_config(cls, argv=None, doc: str = ""):
    """The dataclass `cls` filled from the command line, every value checked against its field's metadata."""
    p = argparse.ArgumentParser(description=doc.strip().split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = lambda msg: fail(f"{msg} (--help lists every flag; a negative value is written --flag=-1e-5)")
    for f in dataclasses.fields(cls):
        help = f.metadata["help"].replace("%", "%%")
        if f.type is bool or f.type == "bool":
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default, help=help)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            p.add_argument(f"--{f.name}", type=typ, default=f.default, help=help)
    cfg = cls(**vars(p.parse_args(argv)))
    for f in dataclasses.fields(cls):
        check_value(f.name, getattr(cfg, f.name), f.metadata)
    return cfg


def run(main, cls, doc: str = "") -> None:
    """main(config parsed from the command line), with bad input reported as one line on stderr and exit code 2."""
    try:
        main(parse_config(cls, doc=doc))
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
