"""What the experiment scripts share (not scripts themselves).

- ``cli``: command lines built from a script's ``Config``; ``results``: files, tables, figures,
  docs copies, ``environment``; ``timing``: ``time_interleaved`` and the gradient methods timed;
  ``problems``: random problems and optimizers; ``data``: samples and targets read from files.
- Task helpers: ``homework`` (the plain-Python homework), ``homework_check`` (its printed check
  re-read), ``teacher`` and ``averaging`` (the generalization tasks).

The names scripts use most are re-exported here: ``from experiments import common``.
"""

from experiments.common.cli import HelpFormatter, check, flag, parser
from experiments.common.problems import OPTIMIZERS, make_optimizer, problem, rate_kwargs
from experiments.common.results import (
    device_label,
    docs_copy,
    environment,
    figure,
    format_table,
    git_commit,
    precisions_to_time,
    print_table,
    progress,
    write_and_report,
)
from experiments.common.timing import (
    GRADIENT_METHODS,
    TIMING_FIELDS,
    Method,
    Timing,
    compile_clock,
    rel_error,
    time_gradients,
    time_interleaved,
)

__all__ = ["GRADIENT_METHODS", "OPTIMIZERS", "TIMING_FIELDS", "HelpFormatter", "Method", "Timing",
           "check", "compile_clock", "device_label", "docs_copy", "environment", "figure", "flag",
           "format_table", "git_commit", "make_optimizer", "parser", "precisions_to_time",
           "print_table", "problem", "progress", "rate_kwargs", "rel_error", "time_gradients",
           "time_interleaved", "write_and_report"]
