"""Exported models in the clients our users serve rerankers with, each the real package from PyPI, against
`prorank eval`'s own scores (float32): `mxbai-rerank` (the method authors' `MxbaiRerankV2`, under
transformers 4 in `.venv-clients`, built by scripts/install-clients.sh), sentence-transformers'
`CrossEncoder` and vLLM's score API. Also the prompt token for token against `MxbaiRerankV2.prepare_inputs`,
and the round trip of fine-tuning a model saved the way the released ProRank models are."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from bench.clients import (
    CLIENTS_PYTHON,
    FULL,
    ClientError,
    flat,
    mxbai,
    order,
    our_scores,
    per_query,
    run_client,
    scifact_candidates,
    vllm,
)
from prorank.corpus.data import load_local
from prorank.model.models import load_tokenizer
from prorank.model.prompt import PromptBuilder, document_text
from prorank.release.export import export_model
from tests.jobs import ROOT, job_config, leftovers, start_job

TRAINED_LENGTH = 192
LONG_QUERY = "Does vitamin C supplementation lower the risk of scurvy in sailors on long voyages? " * 12


@pytest.fixture(scope="module", autouse=True)
def _clients_venv():
    if not CLIENTS_PYTHON.is_file():
        pytest.fail(str(ClientError(f"{CLIENTS_PYTHON} is missing: run `bash scripts/install-clients.sh`")))


def assert_same(got: list[float], expected: list[float], tol: float = 1e-3) -> None:
    assert got == pytest.approx(expected, abs=tol)
    assert order(got) == order(expected)


@pytest.fixture(scope="module")
def exported(smollm2_dir, tmp_path_factory) -> Path:

    out = tmp_path_factory.mktemp("clients") / "smollm2-reranker"
    return export_model(smollm2_dir, out, prompt={"layout": "mxbai-v2", "max_length": TRAINED_LENGTH})


@pytest.fixture(scope="module")
def candidates(scifact_dir) -> dict[str, list[tuple[str, str]]]:
    """2 SciFact test queries, each with its BM25 top 6 (whole documents), as `prorank eval` builds them.
    Few: at full length every client scores these on 2 CPU cores (~1.3 s a pair for SmolLM2)."""
    return scifact_candidates(scifact_dir, 2, 6)


@pytest.fixture(scope="module")
def ours(exported, candidates) -> dict[int, dict[str, list[float]]]:
    return {n: our_scores(exported, candidates, n) for n in (TRAINED_LENGTH, FULL)}


@pytest.mark.parametrize("model", ["smollm2", "tiny"])
def test_token_ids_equal_mxbai_rerank_prepare_inputs(model, exported, tiny_model_dir, candidates, tmp_path):
    """Token for token, truncation included (a long query is cut at 3/4 of the budget, documents at their
    end), with and without an instruction, for the same tokenizer, texts and budget."""

    folder = exported if model == "smollm2" else export_model(tiny_model_dir, tmp_path / "tiny")
    tok = load_tokenizer(str(folder))
    context = json.loads((folder / "config.json").read_text())["max_position_embeddings"]
    pairs = flat(candidates)[:6] + [(LONG_QUERY, flat(candidates)[0][1]), ("short claim", "short document")]
    settings = [(n, i) for n in (48, TRAINED_LENGTH, FULL) for i in (None, "Find the abstract that supports the claim")]
    answer = mxbai(folder, pairs, [{"max_length": n, "instruction": i, "scores": False} for n, i in settings])
    for (n, instruction), run in zip(settings, answer["runs"]):
        builder = PromptBuilder(tok, n, instruction, limit=context)
        assert builder.encode_batch(pairs) == run["ids"], (n, instruction)
    assert any(len(ids) == 48 + builder.overhead for ids in answer["runs"][0]["ids"])  # truncation was exercised


def test_mxbai_rerank_scores_like_prorank_eval(exported, candidates, ours):
    """`MxbaiRerankV2(folder)` under transformers 4 (the folder loads there: RoPE base 100,000 read, not
    4's silent default of 10,000), at the training length and at its default full length."""
    answer = mxbai(
        exported,
        flat(candidates),
        [
            {"max_length": TRAINED_LENGTH, "instruction": None, "scores": True},
            {"max_length": 8192, "instruction": None, "scores": True},
        ],
    )
    assert answer["transformers"].startswith("4.") and answer["rope_theta"] == 100000.0
    for run, length in zip(answer["runs"], (TRAINED_LENGTH, FULL)):
        got = per_query(candidates, run["scores"])
        for qid in candidates:
            assert_same(got[qid], ours[length][qid])


def test_sentence_transformers_cross_encoder_scores_like_prorank_eval(exported, candidates, ours):
    """`CrossEncoder(folder)` with nothing else given: our LogitScore module ("1" against "0"), the pair
    template and no activation, so its scores are ours (whole documents: it cuts only at the context), and
    its rank() orders by them. rank() scores each query's documents with predict(): one pass, not two."""
    from sentence_transformers import CrossEncoder  # noqa: PLC0415 sentence-transformers: heavy, a client under test only

    model = CrossEncoder(str(exported), device="cpu")
    for qid, pairs in candidates.items():
        ranked = model.rank(pairs[0][0], [d for _, d in pairs], batch_size=8)
        got = {r["corpus_id"]: float(r["score"]) for r in ranked}
        assert_same([got[i] for i in range(len(pairs))], ours[FULL][qid])
        assert [r["corpus_id"] for r in ranked] == order(ours[FULL][qid])


def test_vllm_score_api_scores_like_prorank_eval(exported, candidates, ours):
    """vLLM's score API with the model card's hf_overrides and chat template (SmolLM2: vLLM serves Llama as
    LlamaForSequenceClassification): sigmoid of our score, and our score itself without the activation."""
    answer = vllm(exported, candidates)
    for qid, probs, logits in zip(candidates, answer["scores"], answer["logits"]):
        assert_same(logits, ours[FULL][qid])
        assert probs == pytest.approx([1 / (1 + math.exp(-s)) for s in ours[FULL][qid]], abs=1e-4)


def _adapter_gives_the_merged_model(base: Path, adapter: Path, merged: Path) -> None:
    import torch  # noqa: PLC0415 torch: heavy (~1.6 s), imported where tensors are used so the CLI and core stay light
    from peft import PeftModel  # noqa: PLC0415 peft: heavy (imports transformers), only with learner.lora
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 transformers: heavy, loaded only where a model or tokenizer is

    ids = torch.tensor([[5, 17, 3, 40, 9, 11]])
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(adapter))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(ids).logits
        assert torch.allclose(adapted(ids).logits, expected, atol=1e-4)
        with adapted.disable_adapter():  # and the adapter moved the model: the base alone is not it
            assert not torch.allclose(adapted(ids).logits, expected, atol=1e-4)


def test_finetune_a_released_model_round_trip(tiny_model_dir, scifact_dir, tmp_path):
    """A model saved as the released ProRank models are (transformers 4, Qwen2Tokenizer, bfloat16, no
    prorank.json): zero-shot `prorank eval`, both training stages with LoRA (`learner.lora`; every version
    the adapter alone), export (merged, and `--adapter`), then `MxbaiRerankV2` scores the export as
    `prorank eval` does, and the adapter on the released base gives the merged model's logits."""

    released = tmp_path / "released"
    made = json.loads(run_client(CLIENTS_PYTHON, "released_layout_model.py", {}, str(tiny_model_dir), str(released)))
    assert made["tokenizer_class"] == "Qwen2Tokenizer" and made["rope_theta"]
    assert not (released / "prorank.json").exists()

    cli = [sys.executable, "-m", "prorank.driver.cli"]
    zero_shot = subprocess.run(
        cli
        + [
            "eval",
            "--data",
            str(scifact_dir),
            "--model",
            str(released),
            "--max-queries",
            "4",
            "--rerank-depth",
            "5",
            "--max-length",
            "96",
            "--output",
            str(tmp_path / "zs.json"),
            "eval.tensorboard_dir=" + str(tmp_path / "tb"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert zero_shot.returncode == 0, zero_shot.stderr[-3000:]
    assert json.loads((tmp_path / "zs.json").read_text())["settings"]["prompt"]["layout"] == "mxbai-v2"

    tag = uuid.uuid4().hex
    lora = {"r": 8, "alpha": 16}  # the actors (CPU) serve each version merged into their base weights
    config = job_config(
        tmp_path,
        released,
        scifact_dir,
        "sync",
        steps=2,
        stages="warmup,score",
        updates={
            "score": {"steps": 2, "dev_every": 0, "checkpoint_every": 2, "sync_every": 2},
            "warmup": {"dev_every": 0, "checkpoint_every": 2},
            "learner": {"lora": lora},
            "actors": {"num_actors": 1},  # one is enough to show each version reaches an actor
        },
    )
    proc = start_job(config, tag)
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output[-4000:]
    assert not leftovers(tag), "processes left running when the job returned"
    run = tmp_path / "run-sync"
    synced = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    synced = [m for m in synced if "weights/bytes" in m]
    model_bytes = (run / "checkpoints" / "step-2" / "model" / "model.safetensors").stat().st_size
    # Every version, in both stages, is the adapter alone.
    assert [m["step"] for m in synced] == [1, 2, 4] and all(m["weights/bytes"] < 0.25 * model_bytes for m in synced)
    assert all(m["weights/refused"] == 0 for m in synced), "an actor could not apply a version"
    out, adapter = tmp_path / "exported", tmp_path / "adapter"
    exported = subprocess.run(
        cli + ["export", str(run), "--output", str(out), "--adapter", str(adapter)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert json.loads((out / "prorank.json").read_text())["max_length"] == 96
    _adapter_gives_the_merged_model(released, adapter, out)

    data = load_local(scifact_dir, "train")
    qid = data.query_ids[0]
    ids = list(data.corpus)[:5] + list(data.qrels[qid])
    docs = [document_text(data.corpus[d].title, data.corpus[d].text) for d in ids]
    candidates = {qid: [(data.queries[qid], d) for d in docs]}
    answer = mxbai(
        out,
        flat(candidates),
        [
            {"max_length": 96, "instruction": None, "scores": True},
            {"max_length": 8192, "instruction": None, "scores": True},
        ],
    )
    for run, length in zip(answer["runs"], (96, FULL)):
        assert_same(run["scores"], our_scores(out, candidates, length)[qid])
