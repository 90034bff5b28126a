"""The one stage loop (driver/loop.py) on fakes: what it calls, in which order, at which steps."""

from __future__ import annotations

from types import SimpleNamespace

from prorank.driver import checkpointing
from prorank.driver.loop import run_stage
from prorank.run import checkpoints


class FakeLearner:
    def __init__(self, events: list, resumed_at: int = 0):
        self.events, self.resumed_at = events, resumed_at

    def nodes(self):
        return ["node-a", "node-a"]

    def load(self, root):
        self.events.append(("load", root.name))
        return {"steps": self.resumed_at}

    def save(self, root):
        self.events.append(("save", root.name))

    def shutdown(self):
        self.events.append(("shutdown",))


class FakeStage:
    name, offset, dev_every, checkpoint_every, wait_for_actors = "score", 10, 2, 3, False

    def __init__(self, events: list, steps: int = 5, resumed_at: int = 0):
        self.events, self.steps = events, steps
        self.learner = FakeLearner(events, resumed_at)

    def begin(self, step):
        self.events.append(("begin", step))

    def train(self, step):
        self.events.append(("train", step))
        return {"score/loss": float(step)}, 1.0

    def sync_due(self, step, dev_due):
        return dev_due or step % 4 == 0 or step == self.steps

    def synced(self, step, metrics):
        metrics["stage/synced_hook"] = float(step)

    def end(self, step):
        self.events.append(("end", step))


def fake_job(tmp_path, events: list, stop_at: int | None = None, published: int = 10, between: bool = True):
    """`published`: the last weight version this process sent (10: the warmup's last, in the same process)."""
    logged: dict[int, dict] = {}
    train = SimpleNamespace(
        stages=["warmup", "score"], dev_between_stages=between, keep_checkpoints=2, when_disk_full="stop"
    )
    job = SimpleNamespace(
        out=tmp_path,
        placement={},
        stopping=False,
        logged=logged,
        cfg=SimpleNamespace(train=train),
        signals=None,
    )

    def stop(reason: str) -> None:
        events.append(("stop", reason))
        job.stopping = True

    def sync(version: int) -> dict[str, float]:
        events.append(("sync", version))
        return {"weights/sync_seconds": 0.5}

    job.stop, job.sync = stop, sync
    job.sync.attach = lambda learner, pool: events.append(("attach",))
    job.sync.version = published
    job.pool = object()
    job.run = SimpleNamespace(
        log=lambda step, metrics: logged.setdefault(step, {}).update(metrics),
        console_line=lambda: "",
        dev_history=lambda key: [],
    )
    job.dev = SimpleNamespace(start=lambda: events.append(("dev",)), best_key="dev/scifact/ndcg@10")
    job.log_dev = lambda wait=False: None
    job.progress_bar = lambda name, start, total: SimpleNamespace(
        update=lambda n: None, close=lambda: None, set_postfix_str=lambda *a, **k: None
    )
    job.clock = lambda learner_seconds: {"time/learner_seconds": learner_seconds}
    job.clock.restart = lambda: None

    def between_steps(stage, step):
        if stop_at is not None and step == stop_at:
            job.stopping = True
        return {"actors/count": 1.0}

    job.between_steps = between_steps
    return job


def test_the_cadence_of_a_stage(tmp_path):
    events = []
    job = fake_job(tmp_path, events)
    run_stage(job, FakeStage(events), resume=False)
    assert events == [
        ("attach",),
        ("begin", 0),
        ("train", 0),
        ("train", 1),
        ("sync", 12),
        ("dev",),  # dev every 2 steps, after the weights went to the actors
        ("train", 2),
        ("save", "score-checkpoints"),  # checkpoint every 3
        ("train", 3),
        ("sync", 14),
        ("dev",),  # step 4: due by the stage (every 4) and by the dev cadence
        ("train", 4),
        ("sync", 15),  # the last step: always synced by this stage; no dev or save inside the loop
        ("end", 5),
        ("save", "score-checkpoints"),
        ("dev",),
        ("shutdown",),  # the final checkpoint and figures
    ]
    assert sorted(job.logged) == [11, 12, 13, 14, 15]  # global steps: offset + 1 ...
    assert job.logged[12]["time/learner_seconds"] == 1.5  # the step plus the publish the driver waited for
    assert job.logged[11]["time/learner_seconds"] == 1.0 and "weights/sync_seconds" not in job.logged[11]
    assert job.logged[13]["stage/synced_hook"] == 3.0 and job.logged[13]["actors/count"] == 1.0
    assert job.placement == {"score_learner": ["node-a"]}


def test_the_warmup_ends_without_a_dev_evaluation_when_asked(tmp_path):
    """train.dev_between_stages: false: the warmup's final figures are skipped (the score stage's end still
    has them), one evaluation less for the quickstart."""
    for between, expected in ((True, 1), (False, 0)):
        events = []
        warmup = FakeStage(events, steps=2)
        warmup.name, warmup.offset, warmup.dev_every = "warmup", 0, 0
        run_stage(fake_job(tmp_path, events, published=0, between=between), warmup, resume=False)
        tail = [("end", 2), ("save", "checkpoints"), *[("dev",)] * expected, ("shutdown",)]
        assert events[-len(tail) :] == tail and events.count(("dev",)) == expected
        events.clear()
        run_stage(fake_job(tmp_path, events, between=between), FakeStage(events, steps=2), resume=False)
        assert events[-2:] == [("dev",), ("shutdown",)]


def test_a_stage_whose_start_weights_this_process_never_sent_sends_them_first(tmp_path):
    """The score stage of a job resumed after its warmup: the new actors serve the start model (with LoRA,
    the bare base), so the learner's start weights go to them before the stage begins."""
    events = []
    run_stage(fake_job(tmp_path, events, published=0), FakeStage(events), resume=False)
    assert events[:3] == [("attach",), ("sync", 10), ("begin", 0)]


def test_a_resumed_stage_sends_its_weights_first_and_a_stopped_one_still_saves(tmp_path):
    events = []
    job = fake_job(tmp_path, events, stop_at=13)
    run_stage(job, FakeStage(events, resumed_at=2), resume=True)
    assert events == [
        ("attach",),
        ("load", "score-checkpoints"),
        ("sync", 12),
        ("begin", 2),
        ("train", 2),
        ("save", "score-checkpoints"),  # step 3: a checkpoint is due
        ("end", 3),
        ("dev",),
        ("shutdown",),
    ]  # stopped right after it: not saved twice
    assert sorted(job.logged) == [12, 13]


class WritingLearner(FakeLearner):
    """Commits real step folders of 1,000 bytes (prorank/run/checkpoints.py), as the learner does."""

    steps = 0

    def save(self, root):

        super().save(root)
        tmp = checkpoints.start(root, self.steps)
        (tmp / "state.bin").write_bytes(b"s" * 1000)
        checkpoints.commit(root, tmp, self.steps, {})


def _writing_stage(events, steps=8):
    stage = FakeStage(events, steps=steps)
    stage.checkpoint_every, stage.learner = 1, WritingLearner(events)
    real_train = stage.train
    stage.train = lambda step: (setattr(stage.learner, "steps", step + 1), real_train(step))[1]
    return stage


def test_checkpoints_are_pruned_to_the_newest_and_the_best_by_dev(tmp_path):
    events = []
    job = fake_job(tmp_path, events)
    job.run.dev_history = lambda key: [{"step": 12, "ndcg@10": 0.9}, {"step": 14, "ndcg@10": 0.5}]  # offset 10
    run_stage(job, _writing_stage(events), resume=False)
    names = sorted(p.name for p in (tmp_path / "score-checkpoints").glob("step-*"))
    assert names == ["step-2", "step-7", "step-8"]  # the last 2 and the best (step 2: global 12)


def test_the_best_checkpoint_follows_the_dev_set_named_for_it(tmp_path):
    """Two dev sets disagree on the best step: the one train.best_dev names (DevEval.best_key) decides."""
    events = []
    job = fake_job(tmp_path, events)
    history = {
        "dev/scifact/ndcg@10": [{"step": 12, "ndcg@10": 0.9}, {"step": 14, "ndcg@10": 0.5}],
        "dev/arguana/ndcg@10": [{"step": 12, "ndcg@10": 0.2}, {"step": 14, "ndcg@10": 0.6}],
    }
    job.run.dev_history = lambda key: history[key]
    job.dev.best_key = "dev/arguana/ndcg@10"
    run_stage(job, _writing_stage(events), resume=False)
    names = sorted(p.name for p in (tmp_path / "score-checkpoints").glob("step-*"))
    assert names == ["step-4", "step-7", "step-8"]  # the last 2 and arguana's best (step 4: global 14)


def test_no_room_for_a_checkpoint_stops_or_skips_and_keeps_the_previous(tmp_path, monkeypatch, capsys):

    free = {"bytes": 10**9}
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda path: SimpleNamespace(free=free["bytes"]))
    for policy, expected in (("stop", ["step-1", "step-2"]), ("skip", ["step-1", "step-2"])):
        events, out = [], tmp_path / policy
        job = fake_job(out, events)
        job.cfg.train.when_disk_full = policy
        stage = _writing_stage(events, steps=6)
        real_train = stage.train
        stage.train = lambda step: (free.update(bytes=500 if step >= 2 else 10**9), real_train(step))[1]
        run_stage(job, stage, resume=False)
        assert sorted(p.name for p in (out / "score-checkpoints").glob("step-*")) == expected
        message = capsys.readouterr().err
        assert "no room for the checkpoint of score step 3" in message and "step-2 is kept" in message
        assert f"(train.when_disk_full: {policy})" in message
        trained = [e[1] for e in events if e[0] == "train"]
        if policy == "stop":  # a clean stop after the step that found no room: no more steps, no final save
            assert trained == [0, 1, 2] and job.stopping and events[-3:] == [("end", 3), ("dev",), ("shutdown",)]
        else:  # trains to the end; the final checkpoint does not fit either
            assert trained == list(range(6)) and not job.stopping
