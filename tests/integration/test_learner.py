"""The learner: real DeepSpeed ZeRO-2/3 with 2 ranks on CPU (tiny model): they learn and match one process,
checkpoints resume, a killed rank is named, rank 0 publishes only what a step changed."""

from __future__ import annotations

import threading
import time

import pytest
import safetensors.torch
import torch

from prorank.learner.forward import naive_group_logprobs
from prorank.learner.objectives import GrpoObjective
from prorank.learner.torch_loop import TorchLearner
from prorank.model.models import load_tokenizer
from prorank.settings.config import WeightSyncConfig
from prorank.weights.receiver import fetch_version
from prorank.weights.transport import GrpcTransport
from tests.builders import learner_config, scifact_groups


def rewarded_logprob(model, groups, tok) -> float:
    """Mean logprob of the rewarded completions."""
    total = 0.0
    with torch.no_grad():
        for g in groups:
            out = naive_group_logprobs(model, g.prompt_ids, g.completions, tok.pad_token_id)
            best = max(g.rewards)
            total += sum(out.logprobs[i].sum().item() for i, r in enumerate(g.rewards) if r == best)
    return total / len(groups)


@pytest.fixture(scope="module")
def groups(scifact_test, tiny_model):
    model, tok = tiny_model
    return scifact_groups(scifact_test, tok, model, 4)


def _reference_run(tiny_model_dir, cfg, groups, steps):
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 transformers: heavy, loaded only where a model or tokenizer is

    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval().requires_grad_(False)
    loop = TorchLearner(model, ref, cfg, load_tokenizer(str(tiny_model_dir)).pad_token_id)
    losses = [loop.step(groups)["loss"] for _ in range(steps)]
    return model, losses


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_ranks_learn_and_match_single_process(ray_local, tiny_model_dir, tiny_model, groups, stage):
    from prorank.learner.group import LearnerGroup  # noqa: PLC0415 pulls ray, which importing this module does not

    cfg = learner_config(stage)
    learner = LearnerGroup(str(tiny_model_dir), cfg, GrpoObjective(cfg))
    try:
        metrics = [learner.step(groups) for _ in range(3)]
        weights, seconds = learner.full_weights()
    finally:
        learner.shutdown()
    assert seconds >= 0 and set(weights) >= {n for n, _ in tiny_model[0].named_parameters()}
    m = metrics[0]
    assert m["reward_mean"] == 1.5 and m["zero_variance_groups"] == 0 and m["lr"] > 0
    assert m["kl"] == pytest.approx(0, abs=1e-6) and metrics[-1]["kl"] > 0  # starts at the reference
    assert 0 <= m["clip_fraction"] <= 1 and m["entropy"] > 0 and m["grad_norm"] > 0

    reference, losses = _reference_run(tiny_model_dir, cfg, groups, 3)
    assert [x["loss"] for x in metrics] == pytest.approx(losses, rel=1e-3, abs=1e-5)
    # Adam divides by the gradient's own scale, so entries whose gradient is rounding noise move by
    # noise-driven amounts; compare each tensor's update as a whole instead of entry by entry.
    start = tiny_model[0].state_dict()
    for name, t in reference.state_dict().items():
        update = (t - start[name]).norm()
        assert update > 0, name
        assert (weights[name] - t).norm() <= 2e-3 * update, (name, (weights[name] - t).norm() / update)

    policy = type(reference)(reference.config)
    policy.load_state_dict(weights)
    before = rewarded_logprob(tiny_model[0], groups, tiny_model[1])
    assert rewarded_logprob(policy.eval(), groups, tiny_model[1]) > before + 0.05


def test_checkpoint_resume_gives_the_same_loss(ray_local, tiny_model_dir, groups, tmp_path):
    from prorank.learner.group import LearnerGroup  # noqa: PLC0415 pulls ray, which importing this module does not

    cfg = learner_config(2)
    learner = LearnerGroup(str(tiny_model_dir), cfg, GrpoObjective(cfg))
    try:
        learner.step(groups)
        learner.save(tmp_path, {"data_position": 17})
        uninterrupted = [learner.step(groups)["loss"] for _ in range(2)]
        (tmp_path / ".tmp-step-9").mkdir()  # debris of a crashed save must not matter
    finally:
        learner.shutdown()
    resumed = LearnerGroup(str(tiny_model_dir), cfg, GrpoObjective(cfg))
    try:
        state = resumed.load(tmp_path)
        assert state == {"steps": 1, "data_position": 17}
        assert [resumed.step(groups)["loss"] for _ in range(2)] == pytest.approx(uninterrupted, abs=1e-6)
    finally:
        resumed.shutdown()


def test_a_rank_killed_mid_step_fails_the_step_naming_it(ray_local, tiny_model_dir, groups):
    """Rank 1 dies while rank 0 waits for it in a collective: the step ends at once with an error
    naming the rank and its node, instead of hanging until the process group's timeout."""

    import ray  # noqa: PLC0415 Ray: heavy, needed only by the job and its actors

    from prorank.learner.group import LearnerError, LearnerGroup  # noqa: PLC0415 pulls ray, which importing this module does not

    cfg = learner_config(2)
    learner = LearnerGroup(str(tiny_model_dir), cfg, GrpoObjective(cfg))
    try:
        learner.step(groups)
        killer = threading.Timer(0.3, lambda: ray.kill(learner.ranks[1]))
        killer.start()
        start = time.monotonic()
        with pytest.raises(LearnerError, match=r"learner rank 1 on node [\d.]+ \(\w+\) failed in train_step: "):
            for _ in range(50):  # steps until the kill lands in one
                learner.step(groups)
        assert time.monotonic() - start < 60
        killer.join()
    finally:
        learner.shutdown()


@pytest.mark.parametrize("stage", [2, 3])
def test_rank0_publishes_its_weights_and_only_what_a_step_changed(ray_local, tiny_model_dir, groups, stage):
    """Rank 0 serves the versions itself (the weights never pass through the driver). With the bottom
    frozen, a step changes the top layer and the final norm only: version 2 marks just those, a receiver
    holding version 1 is sent just those, and its blob then equals the learner's full weights."""

    from prorank.learner.group import LearnerGroup  # noqa: PLC0415 pulls ray, which importing this module does not

    cfg = learner_config(stage, trainable_layers=1)
    sender = GrpcTransport("tok", WeightSyncConfig()).sender()
    learner = LearnerGroup(str(tiny_model_dir), cfg, GrpoObjective(cfg), sender=sender)
    try:
        address = learner.serve_weights()
        first = learner.publish(1, ["r"])
        assert first["changed_tensors"] == first["tensors"] and first["changed_bytes"] == first["bytes"]
        _, blob = fetch_version(address, "tok", 0, "r", timeout=30)
        learner.step(groups)
        second = learner.publish(2, ["r"])
        manifest, blob = fetch_version(address, "tok", 1, "r", timeout=30, buffer=blob, base_version=1)
        weights, _ = learner.full_weights()
    finally:
        learner.shutdown()
    changed = {s.name for s in manifest.tensors if s.changed_at == 2}
    last = max(int(n.split(".")[2]) for n in weights if n.startswith("model.layers."))
    assert changed == {n for n in weights if n.startswith(f"model.layers.{last}.")} | {"model.norm.weight"}
    assert second["changed_tensors"] == len(changed) and second["changed_bytes"] < 0.5 * second["bytes"]
    got = safetensors.torch.load(bytes(blob))
    assert all(torch.equal(got[name], t) for name, t in weights.items())
