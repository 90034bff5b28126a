"""Progress of long work, for a person at a terminal and for a log file alike.

On a terminal: tqdm's bar. Without one (SLURM, nohup, a CI log), tqdm's bar would be carriage returns
in one endless line, or nothing: instead a plain line on stderr every `LOG_EVERY_SECONDS`, with the count,
rate and time left, so that a 15-minute evaluation shows where it is in any log.
"""

from __future__ import annotations

import sys
from typing import IO

from tqdm.auto import tqdm

LOG_EVERY_SECONDS = 30.0


class _Lines:
    """A file for tqdm that writes each refresh as its own line (tqdm draws with '\\r' between states)."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.strip("\r\n ")
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(total: int, desc: str, unit: str = "it", enabled: bool = True, stream: IO[str] | None = None) -> tqdm:
    """A tqdm bar over `total` items: drawn on a terminal, a line every LOG_EVERY_SECONDS in a log."""
    out = stream or sys.stderr
    if out.isatty():
        return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=out, dynamic_ncols=True)
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=not enabled,
        file=_Lines(out),  # tqdm needs only write() and flush()
        mininterval=LOG_EVERY_SECONDS,
        maxinterval=LOG_EVERY_SECONDS * 4,
        ascii=True,
        ncols=100,
    )
