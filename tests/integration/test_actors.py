"""The rollout actor pool with real Ray and real vLLM (CPU) on a tiny model; one pool for the module."""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager

import pytest
import torch

ray = pytest.importorskip("ray")
# Found, not imported: importing vLLM here cost every pytest process of the suite ~2 s at collection.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (scripts/install.sh cpu installs it)"
)

from prorank.actors.pool import ActorPool  # noqa: E402
from prorank.corpus.bm25 import bm25_search  # noqa: E402
from prorank.eval.rerank import candidate_pairs, rerank, rerank_by_scores  # noqa: E402
from prorank.model.models import load_tokenizer  # noqa: E402
from prorank.model.prompt import INVALID, PromptBuilder, parse_judgment  # noqa: E402
from prorank.model.scoring import score_query  # noqa: E402
from prorank.run.rollout import RolloutRequest  # noqa: E402
from prorank.settings.config import ActorConfig, BM25Config, PromptConfig, SamplingConfig, WeightSyncConfig  # noqa: E402
from prorank.weights.server import WeightServer  # noqa: E402
from prorank.weights.transport import GrpcTransport  # noqa: E402

G = 4
TOKEN = "sync-token"


@pytest.fixture(scope="module")
def pool(ray_local, tiny_model_dir):
    cfg = ActorConfig(num_actors=2, num_cpus=1, max_model_len=384, kv_cache_gib=1, chunk_size=3)
    sampling = SamplingConfig(group_size=G, max_tokens=3, seed=1, per_request_seed=True)
    # A relay hop waits relay_wait_seconds for its upstream actor: 10 s, not 30, so that a check in which no
    # newer version exists (test_weights_update_in_place) does not wait out the default.
    receivers = GrpcTransport(TOKEN, WeightSyncConfig(wait_seconds=30, relay_wait_seconds=10)).receiver
    pool = ActorPool(str(tiny_model_dir), cfg, sampling, PromptConfig(max_length=176), receivers)
    pool.start()
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def server():
    """A learner's weight server for the tests that only need a version served."""
    srv = WeightServer(TOKEN).start()
    yield srv
    srv.stop(0)


def serve(pool, server, version: int, state) -> dict[str, dict]:
    """Publish `state` as `version` and have every actor pull it; the actors' answers. As in the job, the
    version is named: an actor that already serves it (one that started meanwhile) answers at once."""
    server.publisher.publish(version, state)
    return pool.sync_weights(server.address, version)


def requests_from(dataset, n: int, tag: str = "r") -> list[RolloutRequest]:
    out: list[RolloutRequest] = []
    for qid in dataset.query_ids:
        for did in dataset.qrels[qid]:
            doc = dataset.corpus[did]
            out.append(RolloutRequest(f"{tag}{len(out)}", qid, did, dataset.queries[qid], f"{doc.title} {doc.text}"))
            if len(out) == n:
                return out
    return out


def hf_logprobs(model, prompt_ids, token_ids):
    ids = torch.tensor([prompt_ids + token_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1]
    return torch.log_softmax(logits.float(), -1)[torch.arange(len(token_ids)), token_ids]


def _updated(model, state):
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 transformers: heavy, loaded only where a model or tokenizer is

    updated = AutoModelForCausalLM.from_config(model.config).eval()
    updated.load_state_dict(state)
    return updated


def _check_logprobs(pool, model, scifact_test, version, tag):
    for res in pool.generate(requests_from(scifact_test, 2, tag)):
        assert res.version == version
        for c in res.completions:
            assert torch.allclose(torch.tensor(c.logprobs), hf_logprobs(model, res.prompt_ids, c.token_ids), atol=1e-4)


def _perturbed(model, seed: int) -> dict:
    """The model's weights, each moved by a little noise."""
    torch.manual_seed(seed)
    return {k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()}


def test_groups_have_the_promised_shape(pool, scifact_test, tiny_model_dir):

    longest = 176 + PromptBuilder(load_tokenizer(str(tiny_model_dir)), 176).overhead
    reqs = requests_from(scifact_test, 10)
    results = pool.generate(reqs)
    assert [r.request_id for r in results] == [r.request_id for r in reqs]
    for req, res in zip(reqs, results):
        assert (res.query_id, res.doc_id) == (req.query_id, req.doc_id)
        assert len(res.completions) == G and 0 < res.prompt_len <= longest
        assert res.version == pool.latest_version and res.actor.startswith("rollout-")
        for c in res.completions:
            assert 1 <= len(c.token_ids) == len(c.logprobs) <= 3
            assert all(lp <= 0 for lp in c.logprobs)
            assert c.judgment == parse_judgment(c.text) and c.judgment in (0, 1, INVALID)
    assert {r.actor for r in results} == set(pool.versions())  # both actors got work


def test_sampled_logprobs_match_transformers(pool, tiny_model, scifact_test):
    model = tiny_model[0]
    for res in pool.generate(requests_from(scifact_test, 3, "lp")):
        for c in res.completions:
            expected = hf_logprobs(model, res.prompt_ids, c.token_ids)
            assert torch.allclose(torch.tensor(c.logprobs), expected, atol=1e-4), (c.logprobs, expected)


def test_a_request_samples_the_same_whatever_actor_or_batch(pool, scifact_test):
    """Per-request seeds: the judgments of a request do not depend on which actor answers it or on the
    requests batched with it (what lets a job that lost an actor, or was resumed, match an uninterrupted one)."""
    reqs = requests_from(scifact_test, 12, "seed")
    together = {r.request_id: r for r in pool.generate(reqs)}
    alone = {r.request_id: r for r in pool.generate(reqs[5:7][::-1])}
    assert {together[i].actor for i in together} == set(pool.versions())  # spread over both actors
    for rid, res in alone.items():
        assert [c.token_ids for c in res.completions] == [c.token_ids for c in together[rid].completions]
    assert len({tuple(map(tuple, (c.token_ids for c in r.completions))) for r in together.values()}) > 1


def test_long_prompt_is_truncated_not_rejected(pool):
    long = RolloutRequest("long", "q", "d", "a query " * 100, "a very long document " * 2000)
    (res,) = pool.generate([long])
    assert res.prompt_len <= 384 - 3 and len(res.completions) == G


def test_weights_update_in_place(pool, server, tiny_model, scifact_test):
    model = tiny_model[0]
    req = requests_from(scifact_test, 1, "w")
    before = pool.generate(req)[0]
    new = _perturbed(model, 0)
    version = pool.latest_version + 1
    assert {a["version"] for a in serve(pool, server, version, new).values()} == {version}
    updated = _updated(model, new)
    after = pool.generate(req)[0]
    assert after.version == version and after.prompt_ids == before.prompt_ids
    for c in after.completions:
        assert torch.allclose(torch.tensor(c.logprobs), hf_logprobs(updated, after.prompt_ids, c.token_ids), atol=1e-4)
    old_view = hf_logprobs(model, after.prompt_ids, after.completions[0].token_ids)
    assert not torch.allclose(torch.tensor(after.completions[0].logprobs), old_view, atol=1e-3)
    older = WeightServer(TOKEN).start()
    try:  # a server with no newer version than the actors serve: nothing arrives, and they keep theirs
        older.publisher.publish(version, _perturbed(model, 3))
        assert not any(a["applied"] for a in pool.sync_weights(older.address, wait_seconds=1).values())
    finally:
        older.stop(0)
    assert set(pool.versions().values()) == {version}


@contextmanager
def published(pool, model, seed: int, **server_args):
    """A weight server of its own, with a new version (every tensor moved) published on it:
    (server, version, weights)."""
    server = WeightServer(TOKEN, **server_args).start()
    try:
        version = pool.latest_version + 1
        new = _perturbed(model, seed)
        server.publisher.publish(version, new)
        yield server, version, new
    finally:
        server.stop(0)


def test_weight_sync_over_grpc_into_live_engines(pool, tiny_model, scifact_test):
    model = tiny_model[0]
    with published(pool, model, 1) as (server, version, new):
        answers = pool.sync_weights(server.address)
        assert answers and all(a["version"] == version and a["applied"] and not a["error"] for a in answers.values())
        # A pipeline: the first actor pulls from the learner, the second from the first actor's relay.
        first, second = (pool.slots[name] for name in sorted(answers))
        assert answers[first.name]["source"] == server.address
        assert answers[second.name]["source"] == first.relay_address != server.address
        assert server.publisher.wait_for(set(answers), version, timeout=5)  # the learner knows who serves what
        _check_logprobs(pool, _updated(model, new), scifact_test, version, "g")

        packed = server.publisher.publish(version + 1, {k: v + 0.01 for k, v in new.items()})
        chunks = packed.chunks[packed.manifest.tensors[0].name]
        corrupt = bytearray(chunks[0])
        corrupt[-100] ^= 0x01  # a byte of the first chunk, flipped after its checksum was taken
        chunks[0] = bytes(corrupt)
        answers = pool.sync_weights(server.address)
        assert all(not a["applied"] and "checksum" in a["error"] for a in answers.values())
        assert set(pool.versions().values()) == {version}  # still serving the last good version
        assert all("checksum" in error for _, error in server.publisher.receivers.values())


def test_scale_up_and_down_while_streaming(pool, server, tiny_model, scifact_test):
    version = pool.latest_version + 1
    serve(pool, server, version, tiny_model[0].state_dict())
    first, second = requests_from(scifact_test, 60, "s")[:24], requests_from(scifact_test, 60, "s")[24:]
    seen = []
    for res in pool.stream(first):  # grow while a stream runs
        seen.append(res)
        if len(seen) == 1:
            pool.scale(3)
            assert pool.size == 3
    # rollout-2 is most likely still starting: an update now reaches it queued behind its start-up.
    serve(pool, server, version + 1, tiny_model[0].state_dict())
    pool.wait_ready()
    assert pool.versions() == {"rollout-0": version + 1, "rollout-1": version + 1, "rollout-2": version + 1}
    for res in pool.stream(second):  # shrink while a stream runs
        seen.append(res)
        if len(seen) == len(first) + 6:
            pool.scale(1)
            assert pool.size == 1
    assert sorted(r.request_id for r in seen) == sorted(r.request_id for r in first + second)  # once each
    assert {r.actor for r in seen[len(first) :]} >= {"rollout-2"}  # the added actor took work
    assert {r.version for r in seen[: len(first)]} == {version}
    assert {r.version for r in seen[len(first) :]} == {version + 1}  # each actor served the latest
    assert pool.size == 1 and len(pool.slots) == 1  # the removed ones were stopped once drained


def test_killed_actor_is_replaced_and_its_work_redone(pool, scifact_test):
    reqs = requests_from(scifact_test, 15, "k")
    replaced, seen, killed = pool.replaced, [], None
    for res in pool.stream(reqs):
        seen.append(res.request_id)
        if killed is None:
            victim = next(s for s in pool.slots.values() if s.inflight)
            killed = victim.name
            ray.kill(victim.handle)
    assert sorted(seen) == sorted(r.request_id for r in reqs)
    assert pool.replaced == replaced + 1 and killed not in pool.slots and pool.size == 1
    assert set(pool.versions().values()) == {pool.latest_version}


def test_sync_without_waiting_sends_changed_tensors_and_bfloat16(pool, tiny_model, scifact_test):
    """The job's sync: actors pull after the chunks they have in flight, while a stream runs, every
    request answered once; a version that changed one tensor sends that tensor alone; bfloat16 on the
    wire lands in the float32 engines as the bfloat16-rounded values."""
    model = tiny_model[0]
    with published(pool, model, 2) as (server, version, new):
        reqs, seen = requests_from(scifact_test, 24, "nw"), []
        for res in pool.stream(reqs):
            if not seen:
                queued = pool.sync_weights(server.address, version=version, wait=False)
                assert queued == {}
            seen.append(res)
        assert sorted(r.request_id for r in seen) == sorted(r.request_id for r in reqs)
        # Applied between two chunks while the stream ran: each actor's results go from the old version to the new.
        for actor in {r.actor for r in seen}:
            versions = [r.version for r in seen if r.actor == actor]
            assert versions == sorted(versions), (actor, versions)
        assert version in {r.version for r in seen} and min(r.version for r in seen) < version
        pool.wait_synced(timeout=60)
        assert set(pool.versions().values()) == {version}
        _check_logprobs(pool, _updated(model, new), scifact_test, version, "nw2")

        name = "model.norm.weight"
        changed = {**new, name: new[name] + 0.5}
        received = pool.received_bytes
        server.publisher.publish(version + 1, changed)
        answers = pool.sync_weights(server.address)
        assert all(a["applied"] and a["bytes"] == new[name].numel() * 4 for a in answers.values()), answers
        assert pool.received_bytes - received == len(answers) * new[name].numel() * 4
        _check_logprobs(pool, _updated(model, changed), scifact_test, version + 1, "nw3")

    with published(pool, model, 2, wire_dtype=torch.bfloat16) as (server, version, new):  # a server sending bf16
        answers = pool.sync_weights(server.address)
        assert all(a["applied"] for a in answers.values()), answers
        rounded = {k: v.to(torch.bfloat16).float() for k, v in new.items()}
        _check_logprobs(pool, _updated(model, rounded), scifact_test, version, "bf")


def test_dev_scores_on_an_actor_equal_prorank_evals(pool, server, tiny_model, scifact_test):
    """The dev evaluation's scores (vLLM, logprobs of "0" and "1") equal `prorank eval`'s (transformers,
    logit("1") - logit("0")) on the same weights within 1e-3, so the rankings are the same."""

    # Every tensor new: the actors last held another server's version, so none is kept from their blobs.
    new = _perturbed(tiny_model[0], 4)
    version = pool.latest_version + 1
    serve(pool, server, version, new)
    queries = scifact_test.query_ids[:6]
    ranking = bm25_search(scifact_test, queries, BM25Config(top_k=8))
    pairs = candidate_pairs(scifact_test, ranking, 8)
    ref, actor = pool.score([p for q in queries for p in pairs[q]])
    answer = pool.scored(ray.get(ref))
    assert answer["actor"] == actor
    assert answer["version"] == version and answer["actor"] in pool.slots and answer["seconds"] > 0

    model = _updated(tiny_model[0], new)
    builder = PromptBuilder(tiny_model[1], 176)  # the pool's prompt settings, as `prorank eval` builds them
    expected = {}

    with torch.no_grad():
        for q in queries:
            expected[q] = score_query(model, builder, scifact_test.queries[q], [d for _, d in pairs[q]])
    got, at = {}, 0
    for q in queries:
        got[q], at = answer["scores"][at : at + len(pairs[q])], at + len(pairs[q])
        assert got[q] == pytest.approx(expected[q], abs=1e-3)
    assert rerank_by_scores(ranking, 8, got) == rerank(model, builder, scifact_test, ranking, 8, progress=False)
