"""`learner.lora`: peft adapters trained by the DeepSpeed ranks (equal to a plain peft torch loop; only the
adapter moves), versions that are the adapter alone, served by live vLLM actors on the base model, and
checkpoints that keep the adapter beside the merged model (resume, export). On the tiny model."""

from __future__ import annotations

import pytest
import torch

from prorank.model.models import load_tokenizer
from prorank.settings.config import (
    ActorConfig,
    LoraSettings,
    PromptConfig,
    ProRankConfig,
    SamplingConfig,
    WeightSyncConfig,
)
from tests.builders import LORA, learner_config, peft_model, scifact_groups
from tests.integration.test_actors import hf_logprobs, requests_from
from tests.integration.test_score_learning_ranks import ranking_groups, torch_steps

TOKEN = "lora-token"


def _compare_merged(got: dict, expected: dict, base: dict) -> None:
    """Tensors the adapter touches match the reference's update to 2e-3 of its size (Adam turns rounding
    noise into visible moves, see test_learner); every other tensor is the base's, bit for bit."""
    moved = 0
    for name, t in expected.items():
        update = (t - base[name]).norm()
        if update == 0:
            assert torch.equal(got[name], base[name]), name
            continue
        moved += 1
        assert (got[name] - t).norm() <= 2e-3 * update, (name, (got[name] - t).norm() / update)
    assert moved and "model.embed_tokens.weight" not in {n for n, t in expected.items() if not torch.equal(t, base[n])}


def test_grpo_with_lora_on_zero3_ranks_matches_a_peft_torch_loop(
    ray_local, tiny_model_dir, tiny_model, scifact_test, tmp_path
):
    """GRPO with LoRA on 2 ZeRO-3 ranks: the losses of a plain peft torch loop (the KL reference is the
    base), only the adapted weights move, and a resumed checkpoint goes on with the same losses."""
    from prorank.learner.group import LearnerGroup  # noqa: PLC0415 pulls ray, torch, which importing this module does not
    from prorank.learner.objectives import GrpoObjective  # noqa: PLC0415 pulls torch, which importing this module does not
    from prorank.learner.torch_loop import TorchLearner  # noqa: PLC0415 pulls torch, which importing this module does not

    groups = scifact_groups(scifact_test, tiny_model[1], tiny_model[0], 4)
    cfg = learner_config(3, lora=LORA)
    learner = LearnerGroup(str(tiny_model_dir), cfg, GrpoObjective(cfg))
    try:
        metrics = [learner.step(groups)]
        learner.save(tmp_path)
        metrics += [learner.step(groups) for _ in range(2)]
        weights, _ = learner.full_weights()  # merged
    finally:
        learner.shutdown()
    resumed = LearnerGroup(str(tiny_model_dir), cfg, GrpoObjective(cfg))
    try:
        assert resumed.load(tmp_path)["steps"] == 1
        assert [resumed.step(groups)["loss"] for _ in range(2)] == pytest.approx(
            [m["loss"] for m in metrics[1:]], abs=1e-6
        )
    finally:
        resumed.shutdown()
    model = peft_model(tiny_model_dir, seed=cfg.seed)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    loop = TorchLearner(model, None, cfg, load_tokenizer(str(tiny_model_dir)).pad_token_id)
    losses = [loop.step(groups)["loss"] for _ in range(3)]
    assert [m["loss"] for m in metrics] == pytest.approx(losses, rel=1e-3, abs=1e-5)
    assert metrics[0]["kl"] == pytest.approx(0, abs=1e-6) and metrics[-1]["kl"] > 0  # the base is the reference
    _compare_merged(weights, model.merge_and_unload().state_dict(), tiny_model[0].state_dict())


def test_adapter_versions_reach_live_vllm_actors_and_checkpoints_resume(
    ray_local, tiny_model_dir, tiny_model, scifact_dir, scifact_test, tmp_path
):
    """Score learning with LoRA on 2 ZeRO-2 ranks, equal to the peft torch loop. Each version is the adapter
    alone (a few % of the model's bytes), relayed from actor to actor, and served as vLLM's LoRA
    (`actors_serve: adapter`); the actors' logprobs then equal the learner's merged model's, as after a
    full-weight sync. An adapter of another rank is refused and the
    actors keep theirs. A checkpoint holds the adapter and the merged model; resumed, the steps go on alike."""
    from peft import PeftModel  # noqa: PLC0415 peft: heavy (imports transformers), only with learner.lora
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 transformers: heavy, loaded only where a model or tokenizer is

    from prorank.actors.pool import ActorPool  # noqa: PLC0415 pulls ray, torch, which importing this module does not
    from prorank.learner.group import LearnerGroup  # noqa: PLC0415 pulls ray, torch, which importing this module does not
    from prorank.learner.objectives import RankingObjective  # noqa: PLC0415 pulls torch, which importing this module does not
    from prorank.model.lora import adapter_state  # noqa: PLC0415 pulls torch, which importing this module does not
    from prorank.weights.server import WeightServer  # noqa: PLC0415 pulls torch, which importing this module does not
    from prorank.weights.transport import GrpcTransport  # noqa: PLC0415 pulls torch, which importing this module does not

    groups, builder = ranking_groups(scifact_dir, load_tokenizer(str(tiny_model_dir)))
    lora = LORA.model_copy(update={"actors_serve": "adapter"})
    cfg = ProRankConfig.model_validate(
        {
            "learner": {"num_ranks": 2, "zero_stage": 2, "lora": lora.model_dump()},
            "train": {"stages": ["score"]},
            "score": {"queries_per_step": 4, "micro_batch_queries": 1, "lr": 2e-3, "steps": 10, "pairwise_weight": 0.5},
        }
    )
    lc, objective = cfg.score_learner(), RankingObjective.of(cfg.score)
    transport = GrpcTransport(TOKEN, WeightSyncConfig(wait_seconds=30, relay_wait_seconds=10), lora)
    learner = LearnerGroup(str(tiny_model_dir), lc, objective, sender=transport.sender())
    pool = ActorPool(
        str(tiny_model_dir),
        ActorConfig(num_actors=2, num_cpus=1, max_model_len=384, chunk_size=2),
        SamplingConfig(group_size=2, max_tokens=3, seed=1),
        PromptConfig(max_length=176),
        transport.receiver,
    ).start()
    try:
        address = learner.serve_weights()
        metrics = [learner.step(groups)]
        published = learner.publish(1, pool.receiver_names())
        answers = pool.sync_weights(address, 1)
        assert all(a["applied"] and not a["error"] for a in answers.values()), answers
        assert {a["source"] for a in answers.values()} - {address}, "the second actor pulls from the first's relay"
        adapter_bytes = sum(t.numel() * 4 for t in adapter_state(peft_model(tiny_model_dir)).values())
        assert published["bytes"] == adapter_bytes and published["changed_tensors"] == published["tensors"]
        merged, _ = learner.full_weights()
        _check_actor_logprobs(pool, tiny_model[0], merged, scifact_test, 1)

        learner.save(tmp_path)  # step 1
        metrics += [learner.step(groups) for _ in range(2)]
        learner.publish(2, pool.receiver_names())
        assert all(a["applied"] for a in pool.sync_weights(address, 2).values())
        merged, _ = learner.full_weights()
        _check_actor_logprobs(pool, tiny_model[0], merged, scifact_test, 2)

        wrong = WeightServer(TOKEN).start()  # an adapter of rank 4 where rank 8 is served: refused, named
        try:
            wrong.publisher.publish(3, adapter_state(peft_model(tiny_model_dir, LoraSettings(r=4, alpha=8))))
            answers = pool.sync_weights(wrong.address, 3, wait_seconds=5)
            assert all(
                not a["applied"] and "lora_A" in a["error"] and "expected" in a["error"] for a in answers.values()
            ), answers
        finally:
            wrong.stop(0)
        assert set(pool.versions().values()) == {2}
    finally:
        pool.shutdown()
        learner.shutdown()

    model = peft_model(tiny_model_dir, seed=lc.seed)
    losses = torch_steps(model, groups, builder, objective.ranking_loss, lc)
    assert [m["loss"] for m in metrics] == pytest.approx(losses, rel=1e-3, abs=1e-5)
    _compare_merged(merged, model.merge_and_unload().state_dict(), tiny_model[0].state_dict())

    step = tmp_path / "step-1"
    saved = AutoModelForCausalLM.from_pretrained(step / "model")
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(step / "adapter"))
    ids = torch.tensor([groups[0].prompt_ids[0]])
    with torch.no_grad():
        assert torch.allclose(saved(ids).logits, adapted(ids).logits, atol=1e-5)
    # DeepSpeed's state leaves the frozen base out: it is in model/ (merged) and the start model.
    module_states = sum(f.stat().st_size for f in (step / "state").rglob("*model_states*"))
    assert module_states < 0.5 * (step / "model" / "model.safetensors").stat().st_size
    resumed = LearnerGroup(str(tiny_model_dir), lc, objective)
    try:
        assert resumed.load(tmp_path)["steps"] == 1
        again = [resumed.step(groups)["loss"] for _ in range(2)]
    finally:
        resumed.shutdown()
    assert again == pytest.approx([m["loss"] for m in metrics[1:]], abs=1e-6)


def _check_actor_logprobs(pool, base, merged: dict, dataset, version: int) -> None:
    """The actors' sampled tokens' logprobs under the served adapter equal the merged model's (the
    full-weight sync test's tolerance), and differ from the base's."""

    model = type(base)(base.config).eval()
    model.load_state_dict(merged)
    results = pool.generate(requests_from(dataset, 2, f"lora{version}-"))
    for res in results:
        assert res.version == version
        for c in res.completions:
            assert torch.allclose(torch.tensor(c.logprobs), hf_logprobs(model, res.prompt_ids, c.token_ids), atol=1e-4)
    first = results[0].completions[0]
    assert not torch.allclose(
        torch.tensor(first.logprobs), hf_logprobs(base, results[0].prompt_ids, first.token_ids), atol=1e-4
    )
