"""prorank/run/checkpoints.py: the layout every reader and the learner agree on."""

from __future__ import annotations

import subprocess
import sys

import pytest

from prorank.model.models import checkpoint_model_dir
from prorank.run import checkpoints
from prorank.run.run_lock import FolderInUse, lock_output


def _model(folder):
    (folder / checkpoints.MODEL).mkdir()
    (folder / checkpoints.MODEL / "config.json").write_text("{}")


def test_commit_points_latest_at_the_new_step_and_readers_follow(tmp_path):
    root = checkpoints.stage_root(tmp_path, "score")
    assert root.name == "score-checkpoints" and checkpoints.stage_root(tmp_path, "warmup").name == "checkpoints"
    assert checkpoints.latest(root) is None and checkpoints.completed_steps(root) == 0
    assert checkpoints.final_model(root) is None
    for steps in (2, 4):
        tmp = checkpoints.start(root, steps)
        _model(tmp)
        final = checkpoints.commit(root, tmp, steps, {"data": "pos"})
        assert final == root / f"step-{steps}" and not tmp.exists()
    assert checkpoints.latest(root) == root / "step-4" and checkpoints.completed_steps(root) == 4
    assert checkpoints.read_state(root / "step-2") == {"steps": 2, "data": "pos", "files": {"model/config.json": 2}}
    assert checkpoints.final_model(root) == str(root / "step-4" / "model")
    for given in (root, root / "LATEST", root / "step-4"):
        assert checkpoint_model_dir(str(given)) == str(root / "step-4" / "model")


def test_an_unfinished_step_leaves_the_previous_one_in_place(tmp_path):
    root = tmp_path / "checkpoints"
    tmp = checkpoints.start(root, 1)
    _model(tmp)
    checkpoints.commit(root, tmp, 1, {})
    crashed = checkpoints.start(root, 2)  # a crash before commit: written, never renamed
    assert crashed.name.startswith(".tmp") and checkpoints.latest(root) == root / "step-1"
    assert checkpoints.completed_steps(root) == 1


def _commit(root, steps, weights=b"w" * 100):
    tmp = checkpoints.start(root, steps)
    _model(tmp)
    (tmp / checkpoints.MODEL / "model.safetensors").write_bytes(weights)
    return checkpoints.commit(root, tmp, steps, {})


def test_a_damaged_newest_step_is_named_and_the_one_before_resumed(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    for steps in (1, 2, 3):
        _commit(root, steps)
    assert checkpoints.read_state(root / "step-3")["files"]["model/model.safetensors"] == 100
    assert checkpoints.problems(root / "step-3") == []
    weights = root / "step-3" / "model" / "model.safetensors"
    weights.write_bytes(b"w" * 40)  # truncated
    (root / "step-2" / "model" / "config.json").unlink()  # a piece missing
    assert checkpoints.problems(root / "step-3") == [f"{weights}: 40 bytes, written as 100"]
    assert checkpoints.resume_point(root) == root / "step-1" and checkpoints.completed_steps(root) == 1
    assert str(weights) in caplog.text and "config.json: missing" in caplog.text
    moved = checkpoints.set_aside_newer(root, root / "step-1")
    assert [p.name for p in moved] == ["damaged-step-3", "damaged-step-2"]
    assert checkpoints.latest(root) == root / "step-1"
    assert [p.name for p in checkpoints.steps_on_disk(root)] == ["step-1"]
    (root / "step-1" / checkpoints.STATE).write_text("{trunc")
    with pytest.raises(checkpoints.CheckpointError, match=r"no intact checkpoint under .*driver.json: unreadable"):
        checkpoints.resume_point(root)


def test_prune_keeps_the_newest_and_the_one_named(tmp_path):
    root = tmp_path / "checkpoints"
    for steps in (2, 4, 6, 8, 10):
        _commit(root, steps)
    assert checkpoints.size(root / "step-2") == len("{}") + 100 + len((root / "step-2" / "driver.json").read_text())
    gone = checkpoints.prune(root, 2, also_keep=root / "step-4")
    assert sorted(p.name for p in gone) == ["step-2", "step-6"]
    assert [p.name for p in checkpoints.steps_on_disk(root)] == ["step-10", "step-8", "step-4"]
    assert checkpoints.latest(root) == root / "step-10"


def test_a_second_holder_of_an_output_folder_is_refused_and_a_dead_one_leaves_no_lock(tmp_path):

    held = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from prorank.run.run_lock import lock_output; "
            f"h = lock_output({str(tmp_path)!r}); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert held.stdout.readline().strip() == "held"
        with pytest.raises(FolderInUse, match=rf"{tmp_path} is in use by a running job \(pid {held.pid} on "):
            lock_output(tmp_path)
    finally:
        held.kill()  # a crashed job: the kernel drops its lock
        held.wait()
    lock_output(tmp_path).close()


def test_a_ranks_error_reaches_the_console_with_its_cause():
    from prorank.learner.group import rank_failure  # noqa: PLC0415 pulls ray, torch, which importing this module does not

    traceback = (
        "ray::LearnerRank.save() (pid=4242, ip=10.0.0.2, actor_id=ab)\n"
        '  File "learner/rank.py", line 238\n'
        "    self.engine.save_checkpoint(folder)\n"
        "OSError: [Errno 28] No space left on device: "
        "'/runs/x/checkpoints/.tmp-step-40/state/mp_rank_00.pt'\n"
    )
    err = rank_failure("rank 0 on node 10.0.0.2 (abcd1234)", "save", RuntimeError(traceback))
    message = str(err)
    assert message.startswith("learner rank 0 on node 10.0.0.2 (abcd1234) failed in save: RuntimeError: ray::")
    assert message.endswith(
        "OSError: [Errno 28] No space left on device: '/runs/x/checkpoints/.tmp-step-40/state/mp_rank_00.pt'"
    )
