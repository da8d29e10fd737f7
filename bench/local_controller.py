"""The controller process of one local job: `python -m bench.local_controller <folder>`.

submitit's local controller (it starts the worker, forwards SIGTERM to it, sends SIGUSR2 before
the job's time limit and restarts a requeued worker), started by `bench.local` in a process
group of its own, so a Ctrl-C in the terminal reaches `run_all.py` alone, which then stops each
job exactly once. Two changes:

- SIGINT is forwarded to the worker like SIGTERM, instead of killing the worker after a second
  (submitit's KeyboardInterrupt path): the worker checkpoints after its current iteration.
  Only the first stop is forwarded (a second one would make the worker stop at once, without
  its checkpoint); to kill a job, the launcher sends SIGKILL to its process group.
- On Linux, the controller gets SIGTERM when `run_all.py` dies, even by SIGKILL, and forwards
  it, so a killed launcher leaves no worker training on its own. A stop that arrives before
  the worker has started is forwarded once it has.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path
from typing import Any

from submitit.local.local import Controller

PARENT_ENV = "AIR_LAUNCHER_PID"  # the launcher's pid, to notice it died before prctl ran
_PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send `signum` when the parent process ends (Linux); False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class StoppableController(Controller):
    """submitit's Controller that forwards SIGINT too, and remembers a stop asked for early."""

    def __init__(self, folder: Path) -> None:
        self.stop_signal: int | None = None
        super().__init__(folder)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_stop)

    def _on_stop(self, signum: int, frame: Any) -> None:
        if self.stop_signal is not None:
            return  # forwarded once: a repeat (some systems deliver the stop twice) would make
            # the worker give up its checkpoint; the launcher kills the job if it must
        self.stop_signal = int(signum)
        self._forward_signal(signum)

    def start_tasks(self) -> None:
        super().start_tasks()
        if self.stop_signal is not None:  # the stop came while the worker was being started
            self._forward_signal(self.stop_signal)


def main(folder: str) -> None:
    controller = StoppableController(Path(folder))
    parent = os.environ.get(PARENT_ENV)
    if die_with_parent() and parent and os.getppid() != int(parent):
        controller.stop_signal = signal.SIGTERM  # the launcher was gone before prctl ran
    if controller.stop_signal is not None:
        return  # nothing started, nothing to stop: the runs stay as they were
    controller.run()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m bench.local_controller <submitit job folder>")
    main(sys.argv[1])
