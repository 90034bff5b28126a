"""The peak resident memory of another process while a block runs: the benches' and tests' measure of what
an attack costs a server (psutil, from the test extra)."""

from __future__ import annotations

import threading
import time

import psutil


class PeakRss:
    """The highest RSS (MB) of process `pid`, sampled every 10 ms on a thread while the `with` block runs."""

    def __init__(self, pid: int):
        self.process, self.peak, self._stop = psutil.Process(pid), 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def rss(self) -> float:
        return self.process.memory_info().rss / 2**20

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.01)

    def __enter__(self) -> PeakRss:
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.peak = max(self.peak, self.rss())
