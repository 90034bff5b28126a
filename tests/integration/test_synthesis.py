"""No labels, end to end on real SciFact with real vLLM actors: `prorank synthesize` (SmolLM2-135M-Instruct
writing claims for its abstracts) stopped by SIGTERM, then killed mid-run with SIGKILL, then `prorank train`
with the same config finishes the synthesis without writing any document twice and trains on the BEIR folder
it made."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

from prorank.corpus.data import load_corpus, load_dataset
from prorank.driver.synthesis import pick_documents
from prorank.settings.config import DataConfig
from prorank.settings.synth_config import SynthesisConfig
from tests.jobs import ROOT, gone, job_config, leftovers, start_job

DOCUMENTS = 16


def _kill_all(tag: str) -> None:
    """SIGKILL to every process of the run (the CLI, Ray and the engine): a crashed node."""
    for line in leftovers(tag):
        try:
            os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _synthesize(config, tag: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "prorank.driver.cli", "synthesize", "--config", str(config)],
        cwd=ROOT,
        env={**os.environ, "PRORANK_E2E_TAG": tag, "TOKENIZERS_PARALLELISM": "false"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _wait_for_lines(proc: subprocess.Popen, log, lines: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if log.is_file() and log.read_text().count("\n") >= lines:
            return
        time.sleep(0.1)
    raise AssertionError(f"{log} did not reach {lines} lines: exit {proc.poll()}")


def _doc_ids(log) -> list[str]:
    """The documents of the log's whole lines (a line cut by a kill is not one)."""
    return [json.loads(x)["doc_id"] for x in log.read_text().split("\n")[:-1]]


def test_a_killed_synthesis_resumes_without_duplicates_and_the_job_trains_on_it(
    tmp_path, smollm2_dir, tiny_model_dir, scifact_dir
):
    out = tmp_path / "synth"
    synthesis = {
        "corpus": str(scifact_dir),
        "output": str(out),
        "model": str(smollm2_dir),
        "documents": DOCUMENTS,
        "queries_per_document": 2,
        "max_tokens": 40,
        "chunk_documents": 2,
        "filters": {"model_score_keep": 0.9},  # the writer's own scores, on the actors (not on a stopped run)
    }
    config = job_config(
        tmp_path,
        tiny_model_dir,
        scifact_dir,
        "sync",
        stages="score",
        updates={
            "data": {"path": str(out), "hub_id": None},
            "synthesis": synthesis,
            "actors": {"num_actors": 1, "max_model_len": 512, "max_chunks_in_flight": 1},
            "learner": {"num_ranks": 1},
            "train": {"dev_queries": 4, "max_train_queries": None},
            "score": {"negatives_from": "bm25", "dev_every": 0, "checkpoint_every": 0},
        },
    )
    log = out / "generations.jsonl"

    # SIGTERM: the synthesis stops cleanly, keeping what was written (exit 143, the report says so).
    tag = uuid.uuid4().hex
    first = _synthesize(config, tag)
    _wait_for_lines(first, log, 2)
    first.send_signal(signal.SIGTERM)
    said, _ = first.communicate(timeout=120)
    assert first.returncode == 143 and "stopped (SIGTERM received) after" in said, said[-3000:]
    assert "Traceback" not in said and not leftovers(tag)  # all ended when the command returned
    stopped = json.loads((out / "synthesis.json").read_text())
    assert stopped["stopped"] == "SIGTERM received" and not stopped["complete"]
    after_term = _doc_ids(log)

    # SIGKILL to every process of the next run (a crashed node): a line may be cut, none is lost twice.
    tag = uuid.uuid4().hex
    second = _synthesize(config, tag)
    _wait_for_lines(second, log, len(after_term) + 2)
    _kill_all(tag)
    said, _ = second.communicate(timeout=60)
    assert second.returncode == -signal.SIGKILL, said[-3000:]
    assert not gone(tag, timeout=60)
    before = _doc_ids(log)
    assert before[: len(after_term)] == after_term and len(after_term) < len(before) < DOCUMENTS, before

    # The same config's training job finishes the synthesis first, then trains on what it wrote.
    tag = uuid.uuid4().hex
    job = start_job(config, tag)
    output, _ = job.communicate(timeout=900)
    assert job.returncode == 0, output[-4000:]
    assert not leftovers(tag)
    records = [json.loads(x) for x in log.read_text().splitlines()]
    written = [r["doc_id"] for r in records]
    assert len(written) == len(set(written)) == DOCUMENTS and written[: len(before)] == before
    drawn = pick_documents(load_corpus(scifact_dir), SynthesisConfig(**synthesis))
    assert set(written) == set(drawn)

    report = json.loads((out / "synthesis.json").read_text())
    queries = report["queries"]
    assert report["complete"] and report["documents"]["written_this_run"] == DOCUMENTS - len(before)
    assert queries["written"] == 2 * DOCUMENTS == sum(len(r["texts"]) for r in records)
    assert queries["kept"] + sum(queries["dropped"].values()) == queries["written"]
    assert "model_score" in queries["filters"] and "model_score" not in stopped["queries"]["filters"]
    assert queries["kept"] >= DOCUMENTS // 2, queries  # SmolLM2's claims mostly find their abstract again
    assert report["examples"] and report["writer_model"] == str(smollm2_dir)

    dataset = load_dataset(DataConfig(path=str(out), split="train"))
    assert len(dataset.queries) == queries["kept"] and (out / "corpus.jsonl").is_symlink()
    assert all(q.startswith("syn-") and set(docs) <= set(drawn) for q, docs in dataset.qrels.items())
    summary = json.loads((tmp_path / "run-sync" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["stages"] == ["score"]
    assert set(summary["dev_query_ids"]) <= set(dataset.queries)  # model selection on synthetic queries
