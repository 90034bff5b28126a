"""Where a run's figures go: TensorBoard scalars, a metrics.jsonl line per step, and the console line."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

# The console line: the key figures, in this order, with their short names.
CONSOLE = [
    ("train/reward/total_mean", "reward"),
    ("train/reward/format_mean", "format"),
    ("train/judgment_accuracy", "acc"),
    ("rollout/dropped_share", "dropped"),
    ("dev/judgment_accuracy", "dev acc"),
    ("train/kl", "kl"),
    ("rollout/judgments_per_second", "j/s"),
    ("score/loss", "score loss"),
    ("score/margin", "margin"),
    ("weights/sync_seconds", "sync s"),
    ("dev/ndcg@10", "dev nDCG@10"),
]


class RunLog:
    def __init__(self, output_dir: str | Path, start_step: int = 0, started: float | None = None):
        """`started`: time.monotonic() when the job began (its start-up counts on the clock)."""
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 torch: heavy (~1.6 s), imported where tensors are used so the CLI and core stay light

        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        # purge_step drops events a crashed run wrote after its last checkpoint (at start_step, whose own
        # figures were logged before it was saved), so curves do not fold back.
        self.writer = SummaryWriter(str(self.dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        # metrics.jsonl gets the same purge, and `time/wall_hours` (the job's own clock, which a resumed run
        # continues from its checkpoint step's line) goes on every line: curves against hours, not steps.
        kept = self._lines_up_to(start_step) if start_step else []
        self._clock_offset = kept[-1].get("time/wall_hours", 0.0) * 3600 if kept else 0.0
        self._started = time.monotonic() if started is None else started
        (self.dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._jsonl = (self.dir / "metrics.jsonl").open("a")
        self.latest: dict[str, float] = {}
        self.last_step = start_step

    def _lines_up_to(self, step: int) -> list[dict]:
        path = self.dir / "metrics.jsonl"
        if not path.is_file():
            return []
        return [r for r in map(json.loads, path.read_text().splitlines()) if r["step"] <= step]

    def wall_hours(self) -> float:
        return (self._clock_offset + time.monotonic() - self._started) / 3600

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()
        # Only the jsonl gets the job clock: TensorBoard keeps a wall time on every event of its own.
        self._jsonl.write(json.dumps({"step": step, **metrics, "time/wall_hours": self.wall_hours()}) + "\n")
        self._jsonl.flush()
        self.latest.update(metrics)
        self.last_step = max(self.last_step, step)  # dev figures arrive late, at the step they measured

    def dev_history(self, key: str = "dev/ndcg@10") -> list[dict[str, float]]:
        """Every dev evaluation of the run so far (a resumed run's earlier ones too), in logged order: the
        figure `key` (the first dev set's nDCG@10, or a named set's: dev/<name>/ndcg@10) as "ndcg@10"."""
        self._jsonl.flush()
        return [
            {"step": r["step"], "ndcg@10": r[key], "wall_hours": r["time/wall_hours"]}
            for r in map(json.loads, (self.dir / "metrics.jsonl").read_text().splitlines())
            if key in r
        ]

    def console_line(self) -> str:
        return "  ".join(f"{short} {self.latest[key]:.3g}" for key, short in CONSOLE if key in self.latest)

    def close(self) -> None:
        self.writer.close()
        self._jsonl.close()
