"""`learner.lora`: peft adapters trained by the DeepSpeed ranks (equal to a plain peft torch loop; only the
adapter moves), versions that are the adapter alone, served by live vLLM actors on the base model, and
checkpoints that keep the adapter beside the merged model (resume, export). On the tiny model."""

from __future__ import annotations

import pytest
import torch
from test_actors import hf_logprobs, requests_from
from test_learner import scifact_groups
from test_score_learning import _ranking_groups, _torch_steps

from prorank.config import (
    ActorConfig,
    LoraSettings,
    PromptConfig,
    ProRankConfig,
    SamplingConfig,
    StageLearnerConfig,
    WeightSyncConfig,
)
from prorank.models import load_tokenizer

LORA = LoraSettings(r=8, alpha=16)
TOKEN = "lora-token"


def _peft_model(model_dir, lora: LoraSettings = LORA, seed: int = 0):
    """The base with a fresh adapter, made as a learner rank makes it (same seed: the same A)."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 transformers: heavy, loaded only where a model or tokenizer is

    from prorank.lora import add_adapter  # noqa: PLC0415 pulls torch, which importing this module does not

    torch.manual_seed(seed)
    return add_adapter(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), lora)


def _moved(model, seed: int = 1):
    """Give every adapter's B (zero when fresh) some values: the adapter then changes the model."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def test_lora_and_trainable_layers_are_refused_together():
    with pytest.raises(ValueError, match="learner.lora and learner.trainable_layers cannot be used together"):
        StageLearnerConfig(lora={"r": 8}, trainable_layers=1)
    with pytest.raises(ValueError, match="r"):
        ProRankConfig.model_validate({"learner": {"lora": {"r": 1024}}})
    with pytest.raises(ValueError, match="rank"):
        ProRankConfig.model_validate({"learner": {"lora": {"rank": 8}}})  # a wrong key is named


def test_a_saved_adapter_of_other_settings_is_refused_naming_file_and_key(tiny_model_dir, tmp_path):
    """The score stage continues the warmup's adapter: one saved with another r or alpha is named, not loaded."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 transformers: heavy, loaded only where a model or tokenizer is

    from prorank.lora import adapter_state, add_adapter, write_adapter  # noqa: PLC0415 pulls torch, which importing this module does not

    other = LoraSettings(r=4, alpha=8)
    folder = write_adapter(
        tmp_path / "adapter", other, str(tiny_model_dir), adapter_state(_peft_model(tiny_model_dir, other))
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match=r"adapter_config.json: r is 4, learner.lora says 8"):
        add_adapter(base, LORA, str(folder))
    with pytest.raises(ValueError, match=r"lora_alpha is 8.0, learner.lora says 16.0"):
        add_adapter(base, LoraSettings(r=4, alpha=16), str(folder))
    with pytest.raises(FileNotFoundError, match="no LoRA adapter here"):
        add_adapter(base, LORA, str(tmp_path))
    assert add_adapter(base, other, str(folder)).peft_config["default"].r == 4


def test_merged_state_is_peft_merge_and_the_model_is_left_as_it_was(tiny_model_dir, tmp_path):
    from peft import PeftModel  # noqa: PLC0415 peft: heavy (imports transformers), only with learner.lora
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 transformers: heavy, loaded only where a model or tokenizer is

    from prorank.lora import (  # noqa: PLC0415 pulls torch, which importing this module does not
        adapter_specs_model,
        adapter_state,
        base_weights,
        merge_into,
        merged_state,
        vllm_rank,
        write_adapter,
    )

    model = _moved(_peft_model(tiny_model_dir))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merged_state(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    expected = _moved(_peft_model(tiny_model_dir)).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    assert all(torch.allclose(merged[k], expected[k], atol=1e-6) for k in expected)
    # An actor serving merged weights adds a version (peft's names) to the model folder's weights alike.
    base = base_weights(str(tiny_model_dir), "float32")
    by_actor = {**base, **merge_into(base, adapter_state(model), LORA)}
    assert all(torch.allclose(by_actor[k], expected[k], atol=1e-6) for k in base)
    assert sum(not torch.equal(by_actor[k], base[k]) for k in base) == len(adapter_state(model)) // 2
    # What a version must hold, from the meta device: the adapter's names and shapes exactly.
    specs = adapter_specs_model(str(tiny_model_dir), LORA, "float32")
    state = adapter_state(model)
    assert {k: tuple(v.shape) for k, v in specs.items()} == {k: tuple(v.shape) for k, v in state.items()}
    assert all(".lora_A." in k or ".lora_B." in k for k in state)
    # The adapter folder peft loads gives the merged model's outputs.
    folder = write_adapter(tmp_path / "adapter", LORA, str(tiny_model_dir), state)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(folder))
    ids = torch.tensor([[1, 5, 9, 20, 3]])
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    plain.load_state_dict(merged)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, plain(ids).logits, atol=1e-5)
    assert [vllm_rank(r) for r in (1, 2, 8, 9, 16, 200)] == [1, 8, 8, 16, 16, 256]


def test_grpo_reference_of_a_lora_policy_is_its_base(tiny_model_dir, scifact_test, tiny_model):
    """With LoRA the KL reference is the policy with its adapter off: the same loss as a separate copy of the
    start model, without holding one."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 transformers: heavy, loaded only where a model or tokenizer is

    from prorank.learner.step import micro_batch_loss  # noqa: PLC0415 pulls torch, which importing this module does not

    groups = scifact_groups(scifact_test, tiny_model[1], tiny_model[0], 2)
    cfg = StageLearnerConfig(num_ranks=1, groups_per_step=2, micro_batch_groups=2, beta=0.5, lora=LORA)
    model = _moved(_peft_model(tiny_model_dir))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    own, stats = micro_batch_loss(model, None, groups, 8.0, cfg, tiny_model[1].pad_token_id)
    copy, copy_stats = micro_batch_loss(model, base, groups, 8.0, cfg, tiny_model[1].pad_token_id)
    assert stats["kl"] > 0 and own.item() == pytest.approx(copy.item(), abs=1e-6)
    assert stats["kl"] == pytest.approx(copy_stats["kl"], abs=1e-7)


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


@pytest.mark.slow
def test_grpo_with_lora_on_zero3_ranks_matches_a_peft_torch_loop(
    ray_local, tiny_model_dir, tiny_model, scifact_test, tmp_path
):
    """GRPO with LoRA on 2 ZeRO-3 ranks: the losses of a plain peft torch loop (the KL reference is the
    base), only the adapted weights move, and a resumed checkpoint goes on with the same losses."""
    from prorank.learner.group import LearnerGroup  # noqa: PLC0415 pulls ray, torch, which importing this module does not
    from prorank.learner.objectives import GrpoObjective  # noqa: PLC0415 pulls torch, which importing this module does not
    from prorank.learner.torch_loop import TorchLearner  # noqa: PLC0415 pulls torch, which importing this module does not

    groups = scifact_groups(scifact_test, tiny_model[1], tiny_model[0], 4)
    cfg = StageLearnerConfig(
        num_ranks=2,
        zero_stage=3,
        groups_per_step=4,
        micro_batch_groups=1,
        lr=2e-3,
        warmup_steps=1,
        lr_schedule="linear",
        total_steps=10,
        beta=0.05,
        lora=LORA,
    )
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
    model = _peft_model(tiny_model_dir, seed=cfg.seed)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    loop = TorchLearner(model, None, cfg, load_tokenizer(str(tiny_model_dir)).pad_token_id)
    losses = [loop.step(groups)["loss"] for _ in range(3)]
    assert [m["loss"] for m in metrics] == pytest.approx(losses, rel=1e-3, abs=1e-5)
    assert metrics[0]["kl"] == pytest.approx(0, abs=1e-6) and metrics[-1]["kl"] > 0  # the base is the reference
    _compare_merged(weights, model.merge_and_unload().state_dict(), tiny_model[0].state_dict())


@pytest.mark.slow
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
    from prorank.lora import adapter_state  # noqa: PLC0415 pulls torch, which importing this module does not
    from prorank.weights.server import WeightServer  # noqa: PLC0415 pulls torch, which importing this module does not
    from prorank.weights.transport import GrpcTransport  # noqa: PLC0415 pulls torch, which importing this module does not

    groups, builder = _ranking_groups(scifact_dir, load_tokenizer(str(tiny_model_dir)))
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
        adapter_bytes = sum(t.numel() * 4 for t in adapter_state(_peft_model(tiny_model_dir)).values())
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
            wrong.publisher.publish(3, adapter_state(_peft_model(tiny_model_dir, LoraSettings(r=4, alpha=8))))
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

    model = _peft_model(tiny_model_dir, seed=lc.seed)
    losses = _torch_steps(model, groups, builder, objective.ranking_loss, lc)
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
