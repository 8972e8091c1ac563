"""Command lines built from a script's ``Config``: flags from its fields, then run and report.

A script declares its knobs as a frozen dataclass ``Config`` (its defaults) and a module-level
``QUICK`` instance (the --quick values, with ``quick=True``). A field made with
``flag(default, help)`` is also a command-line flag ``--field-name`` (its type from the
annotation, or ``type=`` in ``flag``); other fields are fixed settings. ``main`` adds --out,
--quick and --docs, builds the config (``dataclasses.replace(QUICK or Config(), **changed)``,
``changed`` the flags given away from their defaults; a ``ValueError`` from the dataclass's
checks is a usage error, exit 2), then calls ``report(run(config), out, docs)``. A script whose
run needs its folder (train: its checkpoint) makes ``out`` a field of its own; ``docs=False``
leaves out --docs; ``job`` wraps run and report (train: one process of several):

    @dataclasses.dataclass(frozen=True)
    class Config:
        n: int = flag(256, "training rows N")
        seed: int = flag(0, "random seed")
        quick: bool = False

    QUICK = Config(n=16, quick=True)

    def main(argv=None):
        return cli.main(__name__, argv)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from abc_jax.edge import PRECISIONS


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every flag's default (unless its help names it)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        plain = "(default" in text or action.default is None or action.default is False
        return text if plain else super()._get_help_string(action)


def parser(name: str, doc: str | None, precision: bool = False, *,
           seed: bool = True, docs: bool = True, out: bool = True) -> argparse.ArgumentParser:
    """An ArgumentParser with --quick (and --out, --seed, --docs, --precision if asked)."""
    head, _, rest = (doc or name).strip().partition("\n")
    ap = argparse.ArgumentParser(prog=f"python -m experiments.{name}", description=head,
                                 epilog=rest.strip() or None, formatter_class=HelpFormatter)
    if out:
        ap.add_argument("--out", type=Path, default=Path("results") / name, help="results folder")
    if seed:
        ap.add_argument("--seed", type=int, default=0, help="random seed")
    ap.add_argument("--quick", action="store_true", help="tiny configuration that runs in seconds")
    if docs:
        ap.add_argument("--docs", type=Path, metavar="DIR",
                        help="a 256-colour copy of the key figure, and DIR/results/NAME.json")
    if precision:
        ap.add_argument("--precision", choices=PRECISIONS, default="highest", help=PRECISION_HELP)
    return ap


PRECISION_HELP = ("JAX matmul precision ('highest': exact float32; 'default' lets a GPU use "
                  "TF32)")


def flag(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    """A ``Config`` field with ``default`` that is also the flag ``--name``; ``argparse_kwargs``
    (``type``, ``choices``, ``nargs``, ``metavar``) override what the annotation implies, and
    ``group="title"`` lists the flag under that heading in --help."""
    return dataclasses.field(default=default, metadata={"help": help, **argparse_kwargs})


def _kind(hint: Any) -> tuple[Any, bool]:
    """(the scalar type, whether a sequence) of an annotation like ``int``, ``float | None``,
    ``tuple[int, ...]``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return _kind(args[0])
    if typing.get_origin(hint) in (tuple, list):
        return (args[0] if args else str), True
    return hint, False


def add_flags(ap: argparse.ArgumentParser, config: type) -> None:
    """One flag per ``flag`` field of the dataclass ``config``."""
    hints, groups = typing.get_type_hints(config), {}
    for f in dataclasses.fields(config):
        if "help" not in f.metadata:
            continue
        kw = dict(f.metadata)
        title = kw.pop("group", None)  # flag(..., group="title"): listed under that heading
        target = ap if title is None else groups.setdefault(title, ap.add_argument_group(title))
        kind, many = _kind(hints[f.name])
        if kind is bool and "type" not in kw:
            kw.setdefault("action", argparse.BooleanOptionalAction)
        else:
            kw.setdefault("type", kind)
            if many:
                kw.setdefault("nargs", "+")
        default = f.default
        target.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name,
                        default=list(default) if isinstance(default, tuple) and many
                        else default, **kw)


def config_from(args: argparse.Namespace, module: Any) -> Any:
    """``module.QUICK`` (with --quick) or ``module.Config()``, with the flags whose values
    differ from the defaults replaced."""
    default = module.Config()
    changed = {}
    for f in dataclasses.fields(module.Config):
        if "help" in f.metadata:
            value = getattr(args, f.name)
            value = tuple(value) if isinstance(value, list) else value
            if value != getattr(default, f.name):
                changed[f.name] = value
    return dataclasses.replace(module.QUICK if args.quick else default, **changed)


def _name(mod: types.ModuleType) -> str:
    """The script's name: its ``NAME``, else the last part of its module name."""
    return getattr(mod, "NAME", mod.__name__.rpartition(".")[2])


def parse(module: str, argv: Sequence[str] | None = None, *,
          docs: bool = True) -> tuple[Any, argparse.Namespace]:
    """(config, flags) of the command line ``argv`` of the script ``module``: flags from its
    ``Config`` (a field ``out`` is --out itself), --out, --quick and, with ``docs``, --docs.
    argparse's usage errors exit 2; a ``Config``'s failed check raises ``ValueError``."""
    mod = sys.modules[module]
    fields = {f.name for f in dataclasses.fields(mod.Config) if "help" in f.metadata}
    ap = parser(_name(mod), mod.__doc__, seed=False, docs=docs, out="out" not in fields)
    add_flags(ap, mod.Config)
    args = ap.parse_args(argv)
    return config_from(args, mod), args


def main(module: str, argv: Sequence[str] | None = None, *, docs: bool = True,
         job: Callable[[Any, Callable[[], int]], int] | None = None) -> int:
    """The command line of the script ``module`` (a module name, e.g. ``__name__``): flags from
    its ``Config``, then ``report(run(config), out, docs)``; the exit code. A ``ValueError``
    from building the config prints ``NAME: error: ...`` and returns 2; a ``Failed`` from
    ``run`` or ``report`` (``Unavailable``: 2) prints ``error: ...`` and returns its code.
    ``job(config, body)``, if given, runs ``body`` (run and report; the exit code) and returns
    the exit code: e.g. as one process of several, turning Ctrl-C into one."""
    mod = sys.modules[module]
    try:
        cfg, args = parse(module, argv, docs=docs)
    except ValueError as e:
        print(f"{_name(mod)}: error: {e}", file=sys.stderr)
        return 2

    def body() -> int:
        try:
            mod.report(mod.run(cfg), args.out, getattr(args, "docs", None))
        except Failed as e:
            print(f"error: {e}", file=sys.stderr)
            return e.code
        return 0

    return body() if job is None else job(cfg, body)


class Failed(RuntimeError):
    """What ``run`` or ``report`` raises to end the command with one line on stderr,
    ``error: <message>``, and the exit code ``code`` (what was written stays)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class Unavailable(Failed):
    """What ``run`` raises when the machine lacks what it needs (a package): ``main`` prints
    ``error: <message>`` and returns 2, writing nothing."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 2)


def check(ok: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``ok``: a ``Config``'s ``__post_init__`` check."""
    if not ok:
        raise ValueError(message)
