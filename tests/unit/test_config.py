import argparse
import re
from pathlib import Path

import pytest

from bench.score_ab import ROOT, job_config, parse_variant
from prorank.settings.config_file import ConfigError, load_config


def test_defaults_and_yaml_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  path: /some/where\n  split: dev\nbm25:\n  top_k: 50\n")
    cfg = load_config(path, ["bm25.k1=0.9", "eval.max_queries=7", "model.hub_id=org/name"])
    assert cfg.data.path == "/some/where" and cfg.data.split == "dev"
    assert cfg.bm25.top_k == 50 and cfg.bm25.k1 == 0.9 and cfg.bm25.b == 0.75
    assert cfg.eval.max_queries == 7 and cfg.model.hub_id == "org/name"


def test_typed_values_then_string_overrides_win():
    cfg = load_config(None, ["bm25.top_k=20"], {"bm25.top_k": 10, "data.split": "train"})
    assert cfg.bm25.top_k == 20 and cfg.data.split == "train"


def test_unknown_key_names_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("bm25:\n  topk: 5\n")
    with pytest.raises(ConfigError, match=r"bm25\.topk: Extra inputs are not permitted") as err:
        load_config(path)
    assert str(path) in str(err.value)
    with pytest.raises(ConfigError, match=r"nosuch: Extra inputs"):
        load_config(None, ["nosuch.key=1"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"bm25\.top_k: Input should be a valid integer"):
        load_config(None, ["bm25.top_k=many"])
    with pytest.raises(ConfigError, match=r"eval\.batch_size: Input should be greater than or equal to 1"):
        load_config(None, ["eval.batch_size=0"])


def test_malformed_override_and_file(tmp_path):
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(None, ["bm25.k1"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(None, ["bm25.k1=1", "bm25.k1.x=2"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")


def test_data_needs_a_source():
    with pytest.raises(ConfigError, match="give data.path"):
        load_config(None, ["data.hub_id=null"])


def test_shipped_configs_load():

    for path in sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")):
        load_config(path, [])  # every key known, every value valid


def test_stages_and_score_section():
    cfg = load_config(
        None,
        ["train.stages=warmup,score", "score.queries_per_step=4", "score.micro_batch_queries=2", "learner.num_ranks=2"],
    )
    assert cfg.train.stages == ["warmup", "score"]
    lc = cfg.score_learner()
    assert (lc.lr, lc.warmup_steps, lc.total_steps, lc.num_ranks) == (
        cfg.score.lr,
        cfg.score.warmup_steps,
        cfg.score.steps,
        2,
    )
    mix = cfg.score.ranking_loss()  # passed whole to the learner: every loss named
    assert mix.weights == {"contrastive": 1.0, "pairwise": 0.0, "pointwise": 0.0} and mix.temperature == 1.0
    for bad, key in [
        (["train.stages=score,warmup"], "train"),
        (["train.stages=warmup,warmup"], "train"),
        (["train.stages=score", "score.queries_per_step=3"], "queries_per_step"),
        (["score.init_from=x"], "init_from"),
        (["score.contrastive_weight=0"], "score"),
        (["train.job_name=a b"], "train.job_name"),
    ]:
        with pytest.raises(ConfigError, match=key):
            load_config(None, bad)


def test_score_ab_variants_become_checked_score_only_configs(tmp_path):
    """bench/score_ab.py: a variant's overrides land on a score-only job stopped by train.max_hours, and a
    wrong key fails before any variant runs."""

    assert parse_variant("policy: score.negatives_from=policy score.mine_every=50") == (
        "policy",
        ["score.negatives_from=policy", "score.mine_every=50"],
    )
    assert parse_variant("bm25:") == ("bm25", [])
    with pytest.raises(argparse.ArgumentTypeError, match="NAME: key=value"):
        parse_variant("no colon")
    base = ROOT / "configs" / "scifact-cpu.yaml"
    path = job_config(base, tmp_path / "v0", "runs/x/model", 0.25, ["score.negatives_from=policy"])
    cfg = load_config(path)
    assert cfg.train.stages == ["score"] and cfg.train.max_hours == 0.25 and cfg.score.init_from == "runs/x/model"
    assert cfg.score.negatives_from == "policy" and cfg.train.output_dir == str(tmp_path / "v0")
    with pytest.raises(ConfigError, match="score.negatives_frm"):
        job_config(base, tmp_path / "v1", "runs/x/model", 0.25, ["score.negatives_frm=policy"])


def test_each_stage_owns_its_steps_rate_and_schedule():
    cfg = load_config(
        None,
        ["train.stages=warmup,score", "warmup.steps=7", "warmup.lr=2e-4", "warmup.lr_schedule=cosine"]
        + ["score.steps=40", "score.lr=6e-5", "score.lr_schedule=linear", "learner.num_ranks=1"],
    )
    warm, score = cfg.warmup_learner(), cfg.score_learner()
    # Each stage's learning-rate horizon is its own steps (before, stage 1's was learner.total_steps: 1000).
    assert (warm.lr, warm.lr_schedule, warm.total_steps) == (2e-4, "cosine", 7)
    assert (score.lr, score.lr_schedule, score.total_steps) == (6e-5, "linear", 40)
    assert warm.num_ranks == score.num_ranks == 1 and warm.beta == cfg.warmup.beta
    with pytest.raises(ConfigError, match=r"warmup.groups_per_step \(6\) must be a multiple of"):
        load_config(None, ["warmup.groups_per_step=6", "warmup.micro_batch_groups=4", "learner.num_ranks=1"])


@pytest.mark.parametrize(
    "old, new",
    [
        ("train.steps=5", "train.steps is now warmup.steps"),
        ("train.mode=async", "train.mode is now warmup.mode"),
        ("train.dev_every=5", "train.dev_every is now warmup.dev_every"),
        ("learner.lr=1e-4", "learner.lr is now warmup.lr"),
        ("learner.beta=0", "learner.beta is now warmup.beta"),
        ("learner.total_steps=9", "learner.total_steps is now warmup.steps"),
        ("score.keep_checkpoints=2", "score.keep_checkpoints is now train.keep_checkpoints"),
    ],
)
def test_an_old_key_is_an_error_naming_the_new_one(tmp_path, old, new):
    with pytest.raises(ConfigError, match=re.escape(new)):
        load_config(None, [old])
    key, value = old.split("=")
    path = tmp_path / "old.yaml"
    path.write_text(f"{key.split('.')[0]}:\n  {key.split('.')[1]}: {value}\n")
    with pytest.raises(ConfigError, match=re.escape(new)) as err:
        load_config(path)
    assert str(path) in str(err.value)
