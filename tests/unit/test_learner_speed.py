"""The settings behind the score step's speed (issue 45): the learner's attention kernel, its threads,
the phase clock a step reports, a YAML `no` for mixed precision, and the servers' memory trimmer, which
trims while a server is busy and stops once it is idle (a learner rank holds the weight server)."""

from __future__ import annotations

import pytest
import torch

from prorank.guard import guarded_server
from prorank.learner.precision import bf16_weights, fold_head_input
from prorank.learner.rank import PhaseClock, attention_kernel, rank_threads
from prorank.settings.config_file import load_config


def test_attention_kernel_is_eager_on_cpu_and_sdpa_on_gpu_unless_set():
    assert attention_kernel("auto", "cpu") == "eager"
    assert attention_kernel("auto", "cuda") == "sdpa"
    assert attention_kernel("sdpa", "cpu") == "sdpa"
    assert attention_kernel("eager", "cuda") == "eager"


def test_eager_attention_matches_sdpa_on_a_padded_batch(tiny_model_dir):
    """The kernel choice changes the speed, not the scores: left-padded prompts on a shared prefix."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 transformers: heavy, loaded only where a model or tokenizer is

    from prorank.model.scoring import answer_logits  # noqa: PLC0415 pulls torch-heavy scoring only here

    prompts = [[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 12, 13], [5, 6, 7, 14, 15, 16, 17, 18]]
    logits = {}
    for kernel in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=kernel)
        logits[kernel] = answer_logits(model, prompts, (3, 4), 0)
    torch.testing.assert_close(logits["eager"], logits["sdpa"], rtol=1e-4, atol=1e-5)


def test_learner_threads_and_a_yaml_no(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learner:\n  mixed_precision: no\n  num_cpus: 2\n")
    cfg = load_config(path, values={"data.path": str(tmp_path)})
    assert cfg.learner.mixed_precision == "no"  # YAML 1.1 reads a bare no as false
    assert rank_threads(cfg.score_learner()) == 2
    assert rank_threads(load_config(path, ["learner.threads=1"], {"data.path": str(tmp_path)}).score_learner()) == 1


def test_phase_clock_adds_up_each_phase(monkeypatch):
    ticks = iter([0.0, 1.5, 2.0, 2.25, 10.0, 10.5])
    monkeypatch.setattr("prorank.learner.rank.time.perf_counter", lambda: next(ticks))
    clock = PhaseClock()
    with clock("forward"):
        pass
    with clock("backward"):
        pass
    with pytest.raises(ValueError), clock("forward"):  # a phase that fails still counts its time
        raise ValueError("boom")
    assert clock.seconds == {"forward": 2.0, "backward": 0.25}


class _Loop:
    def __init__(self, spells: int):
        self.left = spells

    def is_closed(self) -> bool:
        self.left -= 1
        return self.left < 0


def test_the_trimmer_trims_while_busy_and_a_few_spells_after_then_stops(monkeypatch):
    trims = []

    class Libc:
        def malloc_trim(self, pad):
            trims.append(spell[0])

    spell = [0]
    # The server's activity count at each 2 s spell: busy in spells 1-3, idle from spell 4 on.
    counts = iter([0, 3, 7, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9])

    def sleep(_seconds):
        spell[0] += 1

    monkeypatch.setattr(guarded_server.ctypes, "CDLL", lambda _name: Libc())
    monkeypatch.setattr(guarded_server.time, "sleep", sleep)
    guarded_server.return_freed_memory(_Loop(12), lambda: next(counts))
    last_busy = 3
    assert trims == list(range(1, last_busy + guarded_server.AFTER_ACTIVITY + 1))


def test_bf16_weights_only_under_zero2_without_lora():
    from prorank.settings.config import StageLearnerConfig  # noqa: PLC0415 pydantic config: only here

    def cfg(**kw):
        return StageLearnerConfig(num_ranks=1, **kw)

    assert bf16_weights(cfg(mixed_precision="bf16"), "cpu")
    assert not bf16_weights(cfg(mixed_precision="bf16", zero_stage=3), "cpu")
    assert not bf16_weights(cfg(mixed_precision="bf16", lora={"r": 4}), "cpu")
    assert not bf16_weights(cfg(mixed_precision="no"), "cpu")


def test_folded_head_gives_the_same_logits_in_every_shape(tiny_model_dir):
    """The vocabulary head's input folded to one matrix: the same logits for the answer position
    (stage 2) and for several completion positions (GRPO), in bf16."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 transformers: heavy, loaded only where a model or tokenizer is

    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 10, 11, 12]])
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    folded = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    fold_head_input(folded)
    for keep in (1, 3, 0):
        a = plain(input_ids=ids, logits_to_keep=keep).logits
        b = folded(input_ids=ids, logits_to_keep=keep).logits
        assert a.shape == b.shape
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_an_unknown_attention_kernel_is_refused_naming_the_key(tmp_path):
    from prorank.settings.config_file import ConfigError  # noqa: PLC0415 only here

    with pytest.raises(ConfigError, match="learner.attention"):
        load_config(None, ["learner.attention=flash"], {"data.path": str(tmp_path)})
