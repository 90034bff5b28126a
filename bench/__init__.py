"""Benchmarks: run as modules from the repo root, e.g. `python -m bench.reward`. Each prints ratios against a
baseline measured in the same run; the figures and commands are in BENCHMARKS.md."""

import argparse
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def data_model_parser(doc: str) -> argparse.ArgumentParser:
    """The command line of a bench on a dataset and a model: its docstring as --help, --data (a BEIR
    folder) and --model (a model folder), both required."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", required=True)
    return ap


def recipe(name: str, data: str, model: str) -> dict:
    """configs/<name>.yaml as a dict, pointed at `data` and `model`, without its eval outputs (a bench
    writes its own); the caller changes what it measures, then `write_config`s it."""

    cfg = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    cfg["data"]["path"], cfg["model"]["path"] = data, model
    for key in ("output", "tensorboard_dir"):
        cfg.get("eval", {}).pop(key, None)
    return cfg


def write_config(cfg: dict, out: Path) -> Path:
    """`cfg` as the YAML file beside the run folder `out` (out.yaml)."""

    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


# The warmup's keys before each stage had its own section (commit 67986d0 and earlier): its objective and
# learning rate sat in `learner:`, its steps, mode and cadence in `train:`.
_OLD_LEARNER_KEYS = {
    "groups_per_step",
    "micro_batch_groups",
    "clip_eps",
    "beta",
    "scale_advantages_by_std",
    "aggregation",
    "shared_prefix",
    "tis_cap",
    "lr",
    "warmup_steps",
    "lr_schedule",
}


def for_tree(cfg: dict, code: Path) -> dict:
    """`cfg` (this tree's sections) as the code at `code` reads it: an A/B's A side may predate `warmup:`."""
    if (code / "prorank" / "stage_config.py").is_file() or "warmup" not in cfg:
        return cfg
    old = {k: dict(v) if isinstance(v, dict) else v for k, v in cfg.items() if k != "warmup"}
    for key, value in cfg["warmup"].items():
        old.setdefault("learner" if key in _OLD_LEARNER_KEYS else "train", {})[key] = value
    if "steps" in cfg["warmup"] and "lr_schedule" in cfg["warmup"]:
        old["learner"]["total_steps"] = cfg["warmup"]["steps"]
    return old
