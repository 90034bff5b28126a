"""Files written whole or not at all: a report, a dataset file, a cache entry."""

from __future__ import annotations

import os
from pathlib import Path


def write_whole(path: Path, text: str) -> None:
    """`text` into `path` through a temporary file beside it, fsynced, then renamed over it: the whole file
    or, on a full disk or a crash, none (an earlier one stays)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        tmp.unlink(missing_ok=True)  # no half-written file left behind
        raise
    tmp.replace(path)
