"""The one definition of a training run's checkpoint layout, for the learner that writes it and for
everything that reads it (resume, the score stage's start model, `prorank export`, the job summary).

    <output_dir>/checkpoints/            the warmup stage (score-checkpoints/ for the score stage)
        LATEST                           the name of the newest complete step folder
        step-N/driver.json               {"steps": N, ...}: the driver's state at step N
        step-N/model/                    the full weights as a model folder transformers loads (LoRA: merged)
        step-N/adapter/                  with learner.lora: the adapter as a peft folder
        step-N/state/, rng-rank*.pt      DeepSpeed's model, optimizer and scheduler state; each rank's RNGs

A step is written into .tmp-step-N, its files and folders fsynced, renamed into place, then LATEST is
replaced and fsynced: a crash or power loss at any point leaves the previous checkpoint and LATEST intact.
driver.json lists every file of the step with its size ("files"): `problems` finds a truncated or missing
piece, and `resume_point` falls back from a damaged newest step to the newest intact one. `prune` keeps the
last N steps (and one more the caller names, the best by dev) once a new one is committed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

WARMUP, SCORE = "checkpoints", "score-checkpoints"  # a stage's folder under the run's output_dir
LATEST = "LATEST"
STATE = "driver.json"
MODEL = "model"
ADAPTER = "adapter"


def stage_root(output_dir: str | Path, stage: str) -> Path:
    """Where a stage ("warmup" or "score") keeps its checkpoints."""
    return Path(output_dir) / (SCORE if stage == "score" else WARMUP)


def start(root: str | Path, steps: int) -> Path:
    """A fresh temporary folder for the checkpoint of step `steps`; fill it, then `commit`."""
    tmp = Path(root) / f".tmp-step-{steps}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(root: str | Path, tmp: Path, steps: int, state: dict) -> Path:
    """Write the driver's `state` and the list of files into `tmp`, fsync it, rename it to step-`steps`,
    and point LATEST at it (fsynced too): once this returns the step survives a power loss."""
    root = Path(root)
    files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
    (tmp / STATE).write_text(json.dumps({"steps": steps, **state, "files": files}))
    _fsync_tree(tmp)
    final = root / f"step-{steps}"
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    _point_latest(root, final)
    return final


def _point_latest(root: Path, folder: Path) -> None:
    """Replace LATEST with `folder`'s name, atomically and fsynced."""
    pointer = root / f".{LATEST}.tmp"
    with open(pointer, "w") as f:
        f.write(folder.name)
        f.flush()
        os.fsync(f.fileno())
    pointer.replace(root / LATEST)
    _fsync_dir(root)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Every file's data, then every folder's entries, down to `folder` itself."""
    for path in sorted(folder.rglob("*"), key=lambda p: -len(p.parts)):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            _fsync_dir(path)
    _fsync_dir(folder)


def step_of(folder: Path) -> int:
    """N of a step-N folder."""
    return int(folder.name.rsplit("-", 1)[1])


def steps_on_disk(root: str | Path) -> list[Path]:
    """The committed step folders under `root`, newest first."""
    found = [p for p in Path(root).glob("step-*") if re.fullmatch(r"step-\d+", p.name) and p.is_dir()]
    return sorted(found, key=step_of, reverse=True)


def problems(folder: Path) -> list[str]:
    """What is wrong with a step folder: its driver.json unreadable, or a file it lists missing or of
    another size (a step written before files were listed is taken as it is). Empty: intact."""
    try:
        listed = read_state(folder).get("files", {})
    except (OSError, ValueError) as err:
        return [f"{folder / STATE}: unreadable ({err})"]
    found = []
    for name, size in listed.items():
        path = folder / name
        if not path.is_file():
            found.append(f"{path}: missing")
        elif (actual := path.stat().st_size) != size:
            found.append(f"{path}: {actual:,} bytes, written as {size:,}")
    return found


def resume_point(root: str | Path) -> Path | None:
    """The newest intact step under `root`, starting from the one LATEST names; a damaged step is named
    in a warning and passed over. None when there is no checkpoint; an error when none is intact."""
    root = Path(root)
    named, on_disk = latest(root), steps_on_disk(root)
    if named is None and not on_disk:
        return None
    candidates = ([named] if named else []) + [p for p in on_disk if p != named]
    damaged: list[str] = []
    for folder in candidates:
        if not (wrong := problems(folder)):
            if damaged:
                log.warning("resuming from %s: the newer checkpoint is damaged: %s", folder, "; ".join(damaged))
            return folder
        damaged.append("; ".join(wrong[:3]))
    raise CheckpointError(f"no intact checkpoint under {root}: " + " | ".join(damaged))


def set_aside_newer(root: str | Path, folder: Path) -> list[Path]:
    """Rename the step folders newer than `folder` (damaged ones a resume passed over) to damaged-step-N,
    kept for a look but never counted or pruned, and point LATEST at `folder`: the resumed job's own steps
    then take their names."""
    root = Path(root)
    moved = []
    for newer in steps_on_disk(root):
        if step_of(newer) > step_of(folder):
            target = root / f"damaged-{newer.name}"
            shutil.rmtree(target, ignore_errors=True)
            newer.rename(target)
            moved.append(target)
    if latest(root) != folder:
        _point_latest(root, folder)
    return moved


class CheckpointError(RuntimeError):
    """No checkpoint to resume from is intact; the message names each damaged file."""


def size(folder: Path) -> int:
    """Bytes of the files in a step folder."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def prune(root: str | Path, keep: int, also_keep: Path | None = None) -> list[Path]:
    """Delete all but the newest `keep` step folders (and `also_keep`); the ones deleted."""
    gone = [p for p in steps_on_disk(root)[keep:] if p != also_keep]
    for folder in gone:
        shutil.rmtree(folder, ignore_errors=True)
    return gone


def latest(root: str | Path) -> Path | None:
    """The step folder LATEST names under `root`; None when there is none."""
    pointer = Path(root) / LATEST
    return Path(root) / pointer.read_text().strip() if pointer.is_file() else None


def read_state(folder: Path) -> dict:
    """The driver state saved with a step folder ({"steps": N, ...})."""
    return json.loads((folder / STATE).read_text())


def completed_steps(root: str | Path) -> int:
    """Steps of the checkpoint a resume continues from (`resume_point`); 0 when there is none."""
    folder = resume_point(root)
    return read_state(folder)["steps"] if folder else 0


def final_model(root: str | Path) -> str | None:
    """The model folder of the newest checkpoint under `root`; None when there is none."""
    folder = latest(root)
    return str(folder / MODEL) if folder else None


def final_adapter(root: str | Path) -> str | None:
    """The LoRA adapter folder of the newest checkpoint under `root`; None when there is none."""
    folder = latest(root)
    return str(folder / ADAPTER) if folder and (folder / ADAPTER).is_dir() else None


def is_pointer(path: Path) -> bool:
    """Whether `path` names a checkpoints root or its LATEST file."""
    return path.name == LATEST or (path / LATEST).is_file()


def model_of(path: Path) -> Path | None:
    """The model folder a step folder holds; None if `path` is not one."""
    return path / MODEL if (path / MODEL / "config.json").is_file() else None
