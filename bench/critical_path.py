"""Is the learner the only thing on the critical path? An A/B of the same `prorank train` config.

    .venv/bin/python -m bench.critical_path --before f4befd6 [--steps 6] [--json docs/results/critical-path.json]

A: the code at git ref `--before` (checked out into a temporary worktree): the driver gathers the full
weights from rank 0, publishes them from its own weight server and waits until every actor has applied
them; it scores the dev pairs itself with transformers. B: this tree: rank 0 publishes in place, the
actors pull after their chunks in flight, the dev pairs are scored on a rollout actor.

Both run the quickstart model (SmolLM2-135M) in async mode with dev evaluation every 5 steps, 8 prompts
x G=8, up to 4 new tokens, beta 0 (the setting the issue measured), one after the other on this machine,
nothing else running. Checkpoints only at the end, so that the steps measure the loop itself.

From each run's metrics.jsonl, over steps 2..N (start-up and the first step left out), both from figures
the two versions log alike:
  learner busy  = sum(train/step_seconds + learner-side sync seconds) / wall seconds of those steps
  sync per step = mean weights/sync_seconds (what the step waited for the weights to be synced)
B also logs its own per-step `time/learner_busy_fraction` and `time/actor_busy_fraction`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench import ROOT, for_tree, recipe, write_config


def job_config(code: Path, out: Path, model: str, data: str, steps: int) -> Path:
    """The quickstart with `steps` async warmup steps, as the code at `code` reads its config."""
    cfg = recipe("quickstart", data, model)
    cfg["sampling"].update(group_size=8, max_tokens=4)
    cfg["warmup"].update(beta=0.0, steps=steps, mode="async", dev_every=5, checkpoint_every=0)
    cfg["train"].update(output_dir=str(out), job_name=f"critpath{os.getpid()}")
    return write_config(for_tree(cfg, code), out)


@contextlib.contextmanager
def worktree(ref: str, where: Path) -> Iterator[Path]:
    """The code at git `ref`, checked out at `where` for the duration (the A side of an A/B)."""
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), ref],
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        yield where
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(where)], capture_output=True, timeout=120
        )


def write_report(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def run(code: Path, config: Path, timeout: float) -> float:
    env = {**os.environ, "PYTHONPATH": str(code), "TOKENIZERS_PARALLELISM": "false"}
    start = time.monotonic()
    # `prorank.cli` before the driver moved to its own package, `driver.cli` after, `prorank.driver.cli` once
    # the roles became subpackages of `prorank` (the A side of an A/B may be an older commit).
    if '"prorank.driver"' in (code / "pyproject.toml").read_text():
        module = "prorank.driver.cli"
    else:
        module = "driver.cli" if (code / "driver" / "cli.py").is_file() else "prorank.cli"
    out = subprocess.run(
        [sys.executable, "-m", module, "train", "--config", str(config)],
        cwd=code,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if out.returncode:
        raise RuntimeError(f"{code}: prorank train failed:\n{(out.stdout + out.stderr)[-3000:]}")
    return time.monotonic() - start


def figures(metrics: Path) -> dict[str, float]:
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    steps = {m["step"]: m for m in lines if "train/loss" in m}
    window = sorted(steps)[1:]
    wall = (steps[window[-1]]["time/wall_hours"] - steps[window[0] - 1]["time/wall_hours"]) * 3600
    train = sum(steps[s]["train/step_seconds"] for s in window)
    # The learner's own share of a sync: A gathers on the ranks (gather_seconds), B packs on rank 0.
    learner_sync = sum(
        steps[s].get("weights/publish_seconds", steps[s].get("weights/gather_seconds", 0.0)) for s in window
    )
    out = {
        "steps": len(window),
        "wall_seconds": wall,
        "train_seconds": train,
        "learner_busy": (train + learner_sync) / wall,
        "train_busy": train / wall,
        "sync_seconds_mean": statistics.fmean(steps[s]["weights/sync_seconds"] for s in window),
        "dev_lines": sum("dev/ndcg@10" in m for m in lines),
        "dev_ndcg": [m["dev/ndcg@10"] for m in lines if "dev/ndcg@10" in m],
    }
    dev_seconds = [m["dev/seconds"] for m in lines if "dev/seconds" in m]
    out["dev_seconds_mean"] = statistics.fmean(dev_seconds) if dev_seconds else 0.0
    if all("time/learner_busy_fraction" in steps[s] for s in window):
        out["logged_learner_busy_mean"] = statistics.fmean(steps[s]["time/learner_busy_fraction"] for s in window)
        out["logged_actor_busy_mean"] = statistics.fmean(steps[s]["time/actor_busy_fraction"] for s in window)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="git ref of the A side")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    parser.add_argument("--data", default=str((ROOT / ".." / "shared" / "data" / "scifact").resolve()))
    parser.add_argument("--timeout", type=float, default=2400)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.steps < 6:
        parser.error("--steps: at least 6, so that the dev evaluation at step 5 falls inside the measured steps")
    if not Path(args.model, "config.json").is_file():
        parser.error(f"--model {args.model}: no model folder there (make it with `prorank convert-gguf`)")
    with (
        tempfile.TemporaryDirectory(prefix="critpath-") as tmp,
        worktree(args.before, Path(tmp) / "before-code") as before,
    ):
        results = {}
        for side, code in (("A", before), ("B", ROOT)):
            out = Path(tmp) / f"run-{side}"
            seconds = run(code, job_config(code, out, args.model, args.data, args.steps), args.timeout)
            results[side] = {**figures(out / "metrics.jsonl"), "job_seconds": seconds}
            print(side, json.dumps(results[side]), flush=True)
    a, b = results["A"], results["B"]
    report = {
        "before": args.before,
        "steps": args.steps,
        "A": a,
        "B": b,
        "sync_ratio_B_over_A": b["sync_seconds_mean"] / a["sync_seconds_mean"],
        "job_seconds_ratio_B_over_A": b["job_seconds"] / a["job_seconds"],
    }
    nan = float("nan")
    print(
        f"learner busy: A {a['learner_busy']:.3f}  B {b['learner_busy']:.3f}  (B logged "
        f"{b.get('logged_learner_busy_mean', nan):.3f}, actors {b.get('logged_actor_busy_mean', nan):.3f})"
    )
    print(
        f"sync seconds per step: A {a['sync_seconds_mean']:.2f}  B {b['sync_seconds_mean']:.2f}  "
        f"ratio B/A {report['sync_ratio_B_over_A']:.3f}"
    )
    print(f"whole job: B/A {report['job_seconds_ratio_B_over_A']:.3f}")
    if args.json:
        write_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
