"""Stop a training run cleanly on SIGTERM / SIGINT: finish the step, checkpoint, exit non-zero.

:class:`StopOnSignal` is a context manager that installs handlers which only *record* the signal;
the training loop polls :meth:`StopOnSignal.should_stop` at its safe point (after a step) and, when
set, :meth:`StopOnSignal.check` raises :class:`TrainingStopped` (a :class:`SearchRLError`, so the
CLI prints one line and exits 2) after the caller has written its checkpoint. A second signal
while waiting for the safe point restores the previous handler and re-raises it (Ctrl-C twice
still kills). The previous handlers are restored on exit. Outside the main thread it does nothing
(Python only delivers signals there).

Left out: stopping inside a step (a rollout or an update is never cut in half), SIGHUP, Windows.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

from searchrl.errors import SearchRLError

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingStopped(SearchRLError):
    """The run was asked to stop by a signal; it stopped at a step boundary with a checkpoint."""


class StopOnSignal:
    """Record SIGTERM / SIGINT instead of dying; see the module docstring."""

    def __init__(self, signals: tuple[int, ...] = SIGNALS):
        self.signals = signals
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:  # second signal: give it back to the previous handler
            old = self._old.pop(signum, signal.SIG_DFL)
            signal.signal(signum, old)
            signal.raise_signal(signum)
            return
        self.received = signum
        log.warning("%s received: stopping after the current step (send it again to stop at once)",
                    signal.Signals(signum).name)

    def should_stop(self) -> bool:
        return self.received is not None

    def check(self, step: int, checkpoint: Any, force: bool = False) -> None:
        """Raise :class:`TrainingStopped` when a signal came (call after writing ``checkpoint``);
        ``force``: stop anyway (another rank of the job received one)."""
        if self.received is not None or force:
            name = signal.Signals(self.received).name if self.received is not None else "a signal to another rank"
            raise TrainingStopped(f"stopped by {name} after step {step}; checkpoint {checkpoint} written: "
                                  "continue with the same command plus --resume")
