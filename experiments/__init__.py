"""The experiment scripts, one per question: ``python -m experiments.NAME --help``.

Each script is a frozen ``Config`` (its defaults; ``Config.quick()`` the --quick values),
``run(config) -> results`` (no files, no printing besides a progress bar) and
``report(results, out, docs)`` (tables, figures, JSON, the printed summary); its command line
is built from the ``Config`` by ``experiments.common.cli``. What scripts share lives in
``experiments.common``; no script imports another.
"""
