"""One job per output folder: `prorank train` holds an exclusive lock on `<output_dir>/.lock` while it runs.

A second job on the same folder would interleave its metrics, TensorBoard events and checkpoints with the
first's; it is refused before it starts anything. The lock is the kernel's (flock): a job that crashed or
was killed leaves nothing stuck, the lock ends with its process. The file holds the holder's pid and host.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

LOCK = ".lock"


class FolderInUse(RuntimeError):
    """Another running job holds the output folder."""


def lock_output(folder: str | Path):
    """Take the folder's lock for this process (creating the folder); the open file, kept open while the
    job runs (closing it releases the lock). FolderInUse when another process holds it."""
    path = Path(folder) / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise FolderInUse(
            f"{folder} is in use by a running job ({holder}); wait for it to end, stop it "
            "(`prorank stop`), or set another train.output_dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle
