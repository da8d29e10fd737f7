"""How a worker turns signals into a stop after the current iteration (bench/worker.py)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.seedgroup import SeedGroup
    from bench.trainer import Trainer

log = logging.getLogger("bench.worker")

REPEAT_S = 1.0  # an interrupt this soon after another is the same request, not a second one


class StopOnSignal:
    """Turns signals into a stop after the current iteration, with a checkpoint there.

    `target` is what trains: a Trainer or a SeedGroup. Both read their `stop_requested` flag
    between iterations, checkpoint and return partial results.

    - SIGUSR2, the scheduler's timeout or preemption warning (inside submitit only): stop, then
      hand over to submitit's handler, which requeues the job (`requeue`). If the target does not
      stop within `grace_s`, the handler runs anyway.
    - SIGINT (Ctrl-C) and SIGTERM (`kill`, or the local launcher stopping its jobs): stop, and
      the run is recorded "interrupted" (`interrupted`). Nothing is raised into the step, so a
      compiled graph or a custom op is never cut in half (an exception raised there comes out as
      a RuntimeError). A second one (more than REPEAT_S later: some systems deliver one stop
      twice), or one before there is anything to save, raises KeyboardInterrupt at once,
      whose exception is recorded as the interruption it is. Under SLURM, SIGTERM stays
      submitit's: SLURM sends it when a job is requeued or preempted, and those are handled
      through SIGUSR2.
    """

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.target: Trainer | SeedGroup | None = None
        self.signum: int | None = None  # SIGUSR2 received: checkpoint, then requeue
        self.interrupt_signum: int | None = None  # SIGINT/SIGTERM received: checkpoint, stop
        self._interrupt_at = -float("inf")
        self._timer: threading.Timer | None = None
        self._installed: dict[int, Any] = {}  # signal -> the handler it had before
        self.original = signal.getsignal(signal.SIGUSR2)  # submitit's checkpoint-and-requeue
        if threading.current_thread() is not threading.main_thread():
            self.active = False  # signal handlers can only be set in the main thread
            return
        # Only inside submitit (local or SLURM) is there a SIGUSR2 handler to hand over to.
        self.active = callable(self.original)
        if self.active:
            self._install(signal.SIGUSR2, self._on_signal)
        for signum in interrupt_signals():
            self._install(signum, self._on_interrupt)

    def _install(self, signum: int, handler: Any) -> None:
        self._installed[signum] = signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is not None or self.target is None:
            self.original(signum, frame)  # second signal, or nothing to save yet: requeue now
            return
        log.warning("signal %d: checkpointing after the current iteration, then requeueing", signum)
        self.signum = signum
        self.target.stop_requested = True
        self._timer = threading.Timer(self.grace_s, os.kill, (os.getpid(), signum))
        self._timer.daemon = True
        self._timer.start()

    def _on_interrupt(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.interrupt_signum is not None and now - self._interrupt_at < REPEAT_S:
            log.warning("%s again within %.0f s: taken as the same stop request", name, REPEAT_S)
            return
        if self.interrupt_signum is not None or self.target is None:
            self.interrupt_signum = self.interrupt_signum or signum
            raise KeyboardInterrupt(f"{name}: stopping now")
        log.warning("%s: checkpointing after the current iteration, then stopping", name)
        self.interrupt_signum, self._interrupt_at = signum, now
        self.target.stop_requested = True

    @property
    def requested(self) -> bool:
        """A timeout/preemption signal asked for a checkpoint and a requeue."""
        return self.signum is not None

    @property
    def interrupted(self) -> bool:
        """SIGINT or SIGTERM asked the run to stop."""
        return self.interrupt_signum is not None

    def requeue(self) -> None:
        """Hand over to submitit: it pickles the task again, requeues the job and exits."""
        self.cancel()
        self.original(self.signum, None)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def restore(self) -> None:
        self.cancel()
        for signum, previous in self._installed.items():
            signal.signal(signum, previous)
        self._installed.clear()


def interrupt_signals() -> tuple[int, ...]:
    """The signals a worker turns into a checkpoint-and-stop (see StopOnSignal)."""
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        return (signal.SIGINT,)
    return (signal.SIGINT, signal.SIGTERM)
