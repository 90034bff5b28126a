"""The fault soak (bench/soak.py), shortened: one job with 2 actors and 2 reward replicas under actor
kills, reward replica kills, a frozen relay hop and a driver SIGKILL + --resume, against the same job run
untouched. Every step exactly once, with all its groups and the reference's loss and rewards."""

from __future__ import annotations

from bench.soak import soak


def test_soak_loses_and_repeats_nothing(tmp_path, answering_model, scifact_dir):
    steps = 16  # faults (one a step) by step 8, the crash at step 13 (after the checkpoint at 10)
    report = soak(str(scifact_dir), str(answering_model), tmp_path, steps=steps, actor_kills=3, replica_kills=1, cuts=1)
    faults = report["faults"]
    assert faults["actor kills"] == 3 and faults["reward replica kills"] == 1 and faults["driver SIGKILL"] == 1
    assert faults["actors lost (seen by the job, before the crash)"] >= 3
    assert report["steps"] == list(range(1, steps + 1))  # none skipped, none repeated (resumed from a checkpoint)
    assert report["groups_per_step"] == [16.0]
    assert report["versions"] == [steps]  # every actor ends on the latest weights
    # Same judgments as the untouched run at every step, the redone ones after the crash included.
    assert report["loss_max_abs_diff"] < 1e-4 and report["reward_equal_steps"] == steps
