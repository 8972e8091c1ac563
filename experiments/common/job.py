"""A command-line program as one process of a job, or alone: its Ctrl-C and its exit codes.

``run_job(body)`` runs ``body`` (run and report; it returns the exit code) and turns
how it ends into an exit code and one line on stderr: Ctrl-C (130, naming the epoch
of the checkpoint the same command resumes from), a lost peer or a failed process
(1, ending the process at once so that the others stop within the heartbeat
timeout). The library raises; this is where a program decides how to exit.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

import jax

from abc_jax import parallel
from abc_jax.checkpoint import checkpoint_epoch

INTERRUPTED = 130  # the exit code of a run ended by Ctrl-C (128 + SIGINT), as a shell's


_SIGINT = threading.Event()  # set by run_job's Ctrl-C handler, cleared when the job ends


def interrupted() -> bool:
    """Whether Ctrl-C reached ``run_job`` since it started."""
    return _SIGINT.is_set()


def interrupt_check(epoch: int, params: Any, metrics: dict[str, Any]) -> None:
    """A training callback: raises the Ctrl-C that reached ``run_job``. The handler raises
    ``KeyboardInterrupt`` at once, as Python's own does, but Python drops one raised inside a
    garbage-collector callback (JAX runs one), so training asks this after every chunk."""
    if interrupted():
        raise KeyboardInterrupt


def _on_sigint(signum: int, frame: Any) -> None:
    _SIGINT.set()
    raise KeyboardInterrupt


def run_job(body: Callable[[], int], *, checkpoint_dir: Any = None,
            coordinator: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, heartbeat_timeout: int = 10,
            init_timeout: int = 300) -> int:
    """Run ``body()`` (which returns an exit code) as one process of a job, or alone, and
    turn how it ends into an exit code and one line on stderr (what ``experiments.train`` does).

    With ``coordinator`` (and ``num_processes``, ``process_id``) first join the job
    (``initialize_distributed``); if that fails: ``error: ...`` and exit code 2.

    Alone: Ctrl-C (``KeyboardInterrupt``) prints ``interrupted at epoch E: run the same
    command again to resume``, E the epoch of the checkpoint in ``checkpoint_dir``
    (``train`` writes it before letting Ctrl-C go on), and returns ``INTERRUPTED`` (130); any
    other exception propagates.

    One of several processes: any exception ends this process at once (``os._exit``) after one
    line ``error: ...; run the same commands again to resume from the last checkpoint`` (130
    for Ctrl-C; 1 for a lost peer, a ``JaxRuntimeError`` from a collective, or a failure here,
    whose traceback is printed first). A normal exit would wait in JAX's exit barrier for the
    others, which wait for it; instead its heartbeats stop and JAX ends the others within
    ``heartbeat_timeout`` seconds.
    """
    if coordinator is not None:  # join the job of several processes
        try:
            parallel.initialize_distributed(coordinator, num_processes, process_id,
                                   heartbeat_timeout=heartbeat_timeout,
                                   initialization_timeout=init_timeout)
        except (ConnectionError, ValueError, TypeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    main = threading.current_thread() is threading.main_thread()  # signals go to it alone
    previous = signal.signal(signal.SIGINT, _on_sigint) if main else None
    try:
        return body()
    except BaseException as e:
        if jax.process_count() == 1:
            if not isinstance(e, KeyboardInterrupt):
                raise
            epoch = 0 if checkpoint_dir is None else checkpoint_epoch(checkpoint_dir)
            print(f"interrupted at epoch {epoch}: run the same command again to resume",
                  file=sys.stderr, flush=True)
            return INTERRUPTED
        if isinstance(e, KeyboardInterrupt):
            code, what = INTERRUPTED, "interrupted"
        elif isinstance(e, jax.errors.JaxRuntimeError):  # a collective failed: a peer died
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            code, what = 1, f"lost a peer process ({first[:200]})"
        else:
            traceback.print_exc()
            code, what = 1, f"process {jax.process_index()} failed ({type(e).__name__})"
        print(f"error: {what}; run the same commands again to resume from the last checkpoint",
              file=sys.stderr, flush=True)
        os._exit(code)
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
        _SIGINT.clear()
