"""Signals as a flag: SIGINT, SIGTERM and SIGHUP stop a run at its next safe point.

A Python signal handler that raises (as the default SIGINT handler does, and as raising
`SystemExit` on SIGTERM would) can raise inside whatever bytecode runs at that moment: a JAX
garbage-collection callback prints "Exception ignored" and the run goes on, an Orbax save leaves
`N.orbax-checkpoint-tmp`, a half-written temporary stays behind. So within `handled()` the three
signals only set a flag, and the code asks `stop_if_requested()` where stopping is safe: between
layers of calibration, between training steps (after the step's checkpoint), between evaluation
batches, and before an output is renamed into place (the temporary is then removed and the
previous output kept). It raises `Interrupted`, a `SystemExit` with status 128 + the signal
number, which no `except Exception` swallows and which exits quietly if nothing catches it.

A second signal while the first waits stops the process at once (the signal's default action);
temporaries it leaves are removed by the next write to the same output
(`io.atomic.remove_stale_temporaries`).

Example:
    >>> with handled():
    ...     for layer in layers:
    ...         stop_if_requested()
    ...         prune(layer)
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                if hasattr(signal, name))

_pending: int | None = None
_depth = 0


class Interrupted(SystemExit):
    """Raised at a safe point after a signal; exit status 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"interrupted by {signal.Signals(self.signum).name}"


def _handler(signum, frame) -> None:
    global _pending
    if _pending is not None:  # asked twice: stop now, as if nnxprune had installed nothing
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _pending = signum
    with contextlib.suppress(Exception):  # stderr may be closed (a daemon's SIGHUP)
        print(f"nnxprune: {signal.Signals(signum).name} received, stopping at the next safe point "
              f"(send it again to stop at once)", file=sys.stderr, flush=True)


def _is_default(signum: int) -> bool:
    current = signal.getsignal(signum)
    return current is signal.SIG_DFL or (signum == signal.SIGINT
                                         and current is signal.default_int_handler)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Within the block the three signals set the flag (main thread only, and only where their
    handler is the default one, so an application's own handlers are left alone). Nested blocks
    share the outermost one's handlers. A signal still pending when the block ends is raised."""
    global _depth, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    installed = {}
    if _depth == 0:
        for signum in SIGNALS:
            if _is_default(signum):
                installed[signum] = signal.signal(signum, _handler)
    _depth += 1
    try:
        yield
        stop_if_requested()
    finally:
        _depth -= 1
        for signum, previous in installed.items():
            signal.signal(signum, previous)
        if _depth == 0:
            _pending = None


def requested() -> int | None:
    """The signal waiting to stop the run, or None."""
    return _pending


def stop_if_requested() -> None:
    """Raises `Interrupted` when a signal arrived; a safe point."""
    if _pending is not None:
        raise Interrupted(_pending)
