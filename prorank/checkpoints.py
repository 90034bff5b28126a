"""The one definition of a training run's checkpoint layout, for the learner that writes it and for
everything that reads it (resume, the score stage's start model, `prorank export`, the job summary).

    <output_dir>/checkpoints/            the warmup stage (score-checkpoints/ for the score stage)
        LATEST                           the name of the newest complete step folder
        step-N/driver.json               {"steps": N, ...}: the driver's state at step N
        step-N/model/                    the full weights as a model folder transformers loads (LoRA: merged)
        step-N/adapter/                  with learner.lora: the adapter as a peft folder
        step-N/state/, rng-rank*.pt      DeepSpeed's model, optimizer and scheduler state; each rank's RNGs

A step is written into .tmp-step-N and renamed into place, then LATEST is replaced: a crash at any point
leaves the previous checkpoint and LATEST intact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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
    """Write the driver's `state` into `tmp`, rename it to step-`steps`, and point LATEST at it."""
    root = Path(root)
    (tmp / STATE).write_text(json.dumps({"steps": steps, **state}))
    final = root / f"step-{steps}"
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(final.name)
    pointer.replace(root / LATEST)
    return final


def latest(root: str | Path) -> Path | None:
    """The step folder LATEST names under `root`; None when there is none."""
    pointer = Path(root) / LATEST
    return Path(root) / pointer.read_text().strip() if pointer.is_file() else None


def read_state(folder: Path) -> dict:
    """The driver state saved with a step folder ({"steps": N, ...})."""
    return json.loads((folder / STATE).read_text())


def completed_steps(root: str | Path) -> int:
    """Steps of the checkpoint LATEST points to under `root`; 0 when there is none."""
    folder = latest(root)
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
