"""The run log's clock and resume purge, the dev-curve plot, and the dtype that `model.dtype: auto` picks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from prorank.driver.cli import app
from prorank.model.models import native_bf16, resolve_dtype
from prorank.run.plots import PlotError, dev_curve, plot_dev_curve, reward_curve
from prorank.run.tracking import RunLog


def _lines(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_run_log_clock_and_resume_purge(tmp_path):
    log = RunLog(tmp_path)
    for step in range(1, 5):
        log.log(step, {"x": float(step)})
    log.close()
    first = _lines(tmp_path)
    hours = [r["time/wall_hours"] for r in first]
    assert hours == sorted(hours) and hours[0] >= 0

    # Resumed from the step-2 checkpoint: the lines a crashed run wrote after it go, the clock goes on.
    log = RunLog(tmp_path, start_step=2)
    log.log(3, {"x": 30.0})
    log.close()
    lines = _lines(tmp_path)
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert lines[2]["x"] == 30.0
    assert lines[2]["time/wall_hours"] >= lines[1]["time/wall_hours"]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_dev_curve_and_plot(tmp_path):
    records = [
        {"step": 0, "time/wall_hours": 0.1, "dev/ndcg@10": 0.40, "dev/bm25_ndcg@10": 0.70},
        {"step": 1, "time/wall_hours": 0.2, "train/loss": 1.0},
        {"step": 2, "time/wall_hours": 0.3, "score/loss": 2.0},
        {"step": 3, "time/wall_hours": 0.5, "score/loss": 1.5, "dev/ndcg@10": 0.55, "dev/bm25_ndcg@10": 0.70},
    ]
    _write(tmp_path / "metrics.jsonl", records)
    curve = dev_curve(tmp_path / "metrics.jsonl")
    assert curve["hours"] == [0.1, 0.5] and curve["ndcg"] == [0.40, 0.55] and curve["steps"] == [0, 3]
    assert curve["bm25"] == 0.70 and curve["score_start"] == 0.3
    png = plot_dev_curve([("", tmp_path / "metrics.jsonl")], tmp_path / "out" / "dev.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_two_runs_on_one_axis_through_the_cli(tmp_path):
    """`prorank plot A=run-a B=run-b`: an A/B at equal clock; a run without dev figures fails before drawing."""
    for name, ndcg in (("a", 0.5), ("b", 0.6)):
        (tmp_path / name).mkdir()
        records = [{"step": 0, "time/wall_hours": 0.1, "dev/ndcg@10": 0.4, "dev/bm25_ndcg@10": 0.7}]
        records.append({"step": 9, "time/wall_hours": 0.4, "score/loss": 1.0, "dev/ndcg@10": ndcg})
        _write(tmp_path / name / "metrics.jsonl", records)
    png = tmp_path / "ab.png"
    result = CliRunner().invoke(
        app, ["plot", f"score only={tmp_path / 'a'}", f"warmup={tmp_path / 'b'}", "--output", str(png)]
    )
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "c").mkdir()
    _write(tmp_path / "c" / "metrics.jsonl", [{"step": 0, "time/wall_hours": 0.1}])
    result = CliRunner().invoke(
        app, ["plot", str(tmp_path / "a"), str(tmp_path / "c"), "--output", str(tmp_path / "x.png")]
    )
    assert result.exit_code != 0 and "c/metrics.jsonl: no dev/ndcg@10 figures" in result.output
    assert not (tmp_path / "x.png").exists()


def test_reward_curve_and_the_quickstart_picture(tmp_path):
    records = [
        {"step": 0, "time/wall_hours": 0.1, "dev/ndcg@10": 0.40, "dev/bm25_ndcg@10": 0.70},
        {"step": 1, "time/wall_hours": 0.2, "train/reward/total_mean": 0.1, "train/reward/format_mean": 0.0},
        {"step": 2, "time/wall_hours": 0.3, "train/reward/total_mean": 1.2, "train/reward/format_mean": 0.9},
        {"step": 12, "time/wall_hours": 0.5, "score/loss": 1.5, "dev/ndcg@10": 0.55, "dev/bm25_ndcg@10": 0.70},
    ]
    _write(tmp_path / "metrics.jsonl", records)
    curve = reward_curve(tmp_path / "metrics.jsonl")
    assert curve == {
        "steps": [1, 2],
        "total": [0.1, 1.2],
        "format": [0.0, 0.9],
        "judged_steps": [],
        "judgment_accuracy": [],
    }
    png = plot_dev_curve([("", tmp_path / "metrics.jsonl")], tmp_path / "curves.png", rewards=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"step": 0, "time/wall_hours": 0.1}\n{not json\n', r"metrics.jsonl:2: not JSON"),
        ('{"step": 0, "dev/ndcg@10": 0.4}\n', r"metrics.jsonl:1: no time/wall_hours"),
        ('{"step": 0, "time/wall_hours": 0.1}\n', r"no dev/ndcg@10 figures"),
    ],
)
def test_dev_curve_refuses_what_it_cannot_plot(tmp_path, content, message):
    (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(PlotError, match=message):
        dev_curve(tmp_path / "metrics.jsonl")


def test_plot_command_names_a_missing_run(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "prorank.driver.cli",
            "plot",
            str(tmp_path / "nope"),
            "--output",
            str(tmp_path / "x.png"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "nope: no such file" in out.stderr


def test_auto_dtype_follows_the_hardware():
    assert resolve_dtype("float32", "cpu") == "float32"
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16"
    assert resolve_dtype("auto", "cpu") == ("bfloat16" if native_bf16("cpu") else "float32")
