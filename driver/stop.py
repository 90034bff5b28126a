"""How `prorank train` stops when a scheduler (SLURM, Kubernetes, a launcher) or a user asks it to.

The first SIGTERM or SIGINT asks for a clean stop: the job finishes the step it is in, writes a checkpoint
of it, stops its actors, servers and Ray, and the CLI exits 143 (SIGTERM) or 130 (SIGINT) with the
`--resume` command. If the step and its checkpoint take longer than `train.stop_grace_seconds`, or a
second signal comes, the job stops at once (`StopNow`), keeping the checkpoint before. Ray's `ray.init`
installs its own SIGTERM handler (a stack dump, then exit 134): the job installs these again once Ray is up.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable

log = logging.getLogger(__name__)


class StopNow(KeyboardInterrupt):
    """Stop without finishing the step: a second signal, or the grace period ran out."""


class StopSignals:
    def __init__(self, grace_seconds: float):
        self.grace = grace_seconds
        self.received: int | None = None  # the first signal's number
        self._on_stop: Callable[[], None] | None = None  # None: nothing to finish yet, so a signal stops at once

    def install(self, on_stop: Callable[[], None] | None = None) -> None:
        """Catch SIGTERM and SIGINT (again, after Ray replaced ours); `on_stop()` asks the job to end after
        its step. Without `on_stop` the first signal stops at once (nothing is under way to finish)."""
        self._on_stop = on_stop
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._signal)
        signal.signal(signal.SIGALRM, self._grace_over)

    def disarm(self) -> None:
        """The step and its checkpoint are done: the grace period no longer runs."""
        signal.setitimer(signal.ITIMER_REAL, 0)
        self._on_stop = None

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as shells report a process a signal ended."""
        return 128 + (self.received or signal.SIGINT)

    def _signal(self, signum: int, _frame) -> None:
        if self.received is not None or self._on_stop is None:
            self.received = self.received or signum
            raise StopNow(f"{signal.Signals(signum).name}: stopping at once")
        self.received = signum
        print(
            f"{self.name}: stopping after this step with a checkpoint (at most {self.grace:g} s; "
            "a second signal stops at once)",
            file=sys.stderr,
            flush=True,
        )
        signal.setitimer(signal.ITIMER_REAL, self.grace)
        self._on_stop()

    def _grace_over(self, _signum: int, _frame) -> None:
        raise StopNow(f"the step and its checkpoint took longer than train.stop_grace_seconds ({self.grace:g} s)")
