"""Benchmarks: run as modules from the repo root, e.g. `python -m bench.reward`. Each prints ratios against a
baseline measured in the same run; the figures and commands are in BENCHMARKS.md."""

import argparse
from pathlib import Path

import yaml

from prorank.settings.config import MOVED

ROOT = Path(__file__).resolve().parents[1]


def data_model_parser(doc: str) -> argparse.ArgumentParser:
    """The command line of a bench on a dataset and a model: its docstring as --help, --data (a BEIR
    folder) and --model (a model folder), both required."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", required=True)
    return ap


def recipe_parser(doc: str) -> argparse.ArgumentParser:
    """`data_model_parser` plus the recipe a bench measures: --config (configs/scifact-cpu.yaml) and
    `section.key=value` overrides on top of it; `load_recipe(args)` reads them."""
    ap = data_model_parser(doc)
    ap.add_argument("--config", default=str(ROOT / "configs" / "scifact-cpu.yaml"), help="the recipe measured")
    ap.add_argument("overrides", nargs="*", help="section.key=value on top of the recipe")
    return ap


def load_recipe(args: argparse.Namespace):
    """The checked config of `recipe_parser`'s arguments, pointed at --data and --model."""
    from prorank.settings.config_file import load_config  # noqa: PLC0415 pydantic configs: only for the benches that measure a recipe

    return load_config(args.config, args.overrides, {"data.path": args.data, "model.path": args.model})


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


def for_tree(cfg: dict, code: Path) -> dict:
    """`cfg` (this tree's sections) as the code at `code` reads it: an A/B's A side may predate `warmup:`,
    whose keys then sat in `learner:` and `train:` (prorank.settings.config.MOVED says where each went)."""
    if (code / "prorank" / "stage_config.py").is_file() or "warmup" not in cfg:
        return cfg
    old = {k: dict(v) if isinstance(v, dict) else v for k, v in cfg.items() if k != "warmup"}
    for before, now in MOVED.items():
        section, key = before.split(".")
        new_section, _, new_key = now.split(" ")[0].partition(".")
        if new_section == "warmup" and new_key in cfg["warmup"]:
            old.setdefault(section, {})[key] = cfg["warmup"][new_key]  # steps: train.steps and learner.total_steps
    return old
