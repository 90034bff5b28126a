"""prorank/checkpoints.py: the layout every reader and the learner agree on."""

from __future__ import annotations

from prorank import checkpoints
from prorank.models import checkpoint_model_dir


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
    assert checkpoints.read_state(root / "step-2") == {"steps": 2, "data": "pos"}
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
