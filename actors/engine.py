"""One live vLLM engine that turns (query, document) requests into groups of G sampled judgments.

Plain Python, so it can be tested and benchmarked directly; `actors.pool` runs it as a Ray actor.
"""

from __future__ import annotations

import logging
import os
import time

from prorank.config import ActorConfig, PromptConfig, SamplingConfig, WeightSyncConfig
from prorank.models import load_tokenizer, weights_to_bytes
from prorank.prompt import PromptBuilder, parse_judgment
from prorank.rollout import Completion, GroupResult, RolloutRequest

log = logging.getLogger(__name__)


class RolloutEngine:
    def __init__(self, model: str, actors: ActorConfig, sampling: SamplingConfig, prompt: PromptConfig,
                 name: str = "engine", seed_offset: int = 0):
        # Read by vLLM at import: the engine stays in this process (on CPU: 2-3 s and 1.7 GB to start
        # instead of ~20 s and 4 processes), with a bounded KV cache.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(actors.kv_cache_gib))
        from vllm import LLM, SamplingParams

        engine_args = dict(
            model=model, dtype=actors.dtype, max_model_len=actors.max_model_len,
            tensor_parallel_size=actors.tensor_parallel_size, seed=sampling.seed + seed_offset,
            enable_prefix_caching=True, enforce_eager=actors.enforce_eager,
            logprobs_mode="processed_logprobs",  # after temperature: what the learner recomputes
            worker_extension_cls="actors.vllm_extension.WeightLoaderExtension",
        )
        if actors.block_size:
            engine_args["block_size"] = actors.block_size
        if actors.num_gpus > 0:
            engine_args["gpu_memory_utilization"] = actors.gpu_memory_utilization
        self.llm = LLM(**engine_args)
        # Leave room for the answer: a prompt is cut by the prompt module, never rejected by the engine.
        tokenizer = load_tokenizer(model)
        self.builder = PromptBuilder.from_config(tokenizer, prompt, actors.max_model_len - sampling.max_tokens)
        # Scoring generates one token: prompts as long as `prorank eval` builds them fit.
        self.score_builder = PromptBuilder.from_config(tokenizer, prompt, actors.max_model_len - 1)
        self.params = SamplingParams(
            n=sampling.group_size, temperature=sampling.temperature, top_p=sampling.top_p,
            max_tokens=sampling.max_tokens, logprobs=0,
        )
        self.name = name
        self.seed, self.per_request_seed = sampling.seed, sampling.per_request_seed
        self.model, self.dtype = model, actors.dtype
        self.version = 0
        self.expected = None  # names, dtypes and shapes a weight version must have; read on first sync
        self._relay = None  # this actor's weight server for the next actor, see sync_weights
        self._buffer = None  # the last version's blob: the next one is received into it (no new 0.5 GB)
        self._held = 0  # the version whose complete blob `_buffer` holds (0: none): only changes are sent
        self.busy_seconds = 0.0  # generating, scoring and applying weights, since start-up
        self.relay_address = ""

    def info(self) -> dict[str, object]:
        import ray

        return {"name": self.name, "version": self.version, "pid": os.getpid(),
                "node": ray.get_runtime_context().get_node_id()}

    def generate(self, requests: list[RolloutRequest]) -> list[GroupResult]:
        from vllm.inputs import TokensPrompt

        start = time.perf_counter()
        prompts = self.builder.encode_batch([(r.query, r.document) for r in requests])
        params = self.params
        if self.per_request_seed:
            params = [self.params.clone() for _ in requests]
            for p, r in zip(params, requests):
                p.seed = request_seed(self.seed, r.request_id)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        seconds = time.perf_counter() - start
        self.busy_seconds += seconds
        results = []
        for req, prompt_ids, out in zip(requests, prompts, outputs):
            completions = [
                Completion(
                    token_ids=list(c.token_ids),
                    logprobs=[step[tok].logprob for tok, step in zip(c.token_ids, c.logprobs)],
                    text=c.text,
                    judgment=parse_judgment(c.text),
                    finish_reason=c.finish_reason,
                )
                for c in out.outputs
            ]
            results.append(GroupResult(req.request_id, req.query_id, req.doc_id, prompt_ids, completions,
                                       self.version, self.name, seconds))
        return results

    def score(self, pairs: list[tuple[str, str]]) -> dict:
        """Relevance scores, logit("1") - logit("0") at the answer position, of (query, document text)
        pairs under the weights this engine serves now, and that version: the dev evaluation runs here,
        where the model already is. One generated token per prompt, with the logprobs of exactly the two
        answer tokens; at temperature 1 their difference is the difference of the logits."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        start = time.perf_counter()
        zero, one = self.score_builder.answer_ids
        prompts = self.score_builder.encode_batch(pairs)
        params = SamplingParams(n=1, temperature=1.0, max_tokens=1, logprob_token_ids=[zero, one])
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        scores = []
        for out in outputs:
            first = out.outputs[0].logprobs[0]  # token id -> Logprob, for the answer tokens
            scores.append(first[one].logprob - first[zero].logprob)
        seconds = time.perf_counter() - start
        self.busy_seconds += seconds
        return {"scores": scores, "version": self.version, "seconds": seconds, "actor": self.name}

    def sync_weights(self, address: str, token: str, tls_ca: str | None = None, wait_seconds: float = 300.0,
                     upstream: str | None = None, relay: WeightSyncConfig | None = None,
                     version: int | None = None) -> dict:
        """Pull the newest version above the one served, verify it, apply it in place, and report back
        to the learner's weight server at `address`. With `upstream` (the previous actor's relay), pull
        from there and fall back to `address` if it fails; with `relay`, serve the chunks onwards while
        they arrive. A bad transfer is refused and reported; the engine keeps its last good version.
        `version`: the version the caller wants served; an engine already there (an actor that started
        while it was being published and pulled it then) answers at once instead of waiting for a newer one."""
        from actors.weight_receiver import pull_newest, report
        from protocol import weights_pb2
        from protocol.weights_codec import WeightError, sent_bytes

        if version is not None and self.version >= version:
            return {"version": self.version, "applied": True, "error": "", "source": "served already"}
        if self.expected is None:
            self.expected = _expected_specs(self.model, self.dtype)
        publisher = self._relay_server(token, relay).publisher if relay and relay.relay else None

        source = ""

        source, received = "", 0
        start = time.perf_counter()

        def tell(applied: bool, error: str = "") -> dict:
            try:  # the learner's table is informative: failing to update it must not fail the actor
                report(address, token, weights_pb2.Ack(version=self.version, applied=applied, error=error,
                                                       receiver=self.name), tls_ca)
            except Exception as err:  # noqa: BLE001 - grpc raises several types
                log.warning("%s: could not report version %d to %s: %s", self.name, self.version, address, err)
            return {"version": self.version, "applied": applied, "error": error, "source": source,
                    "bytes": received, "seconds": time.perf_counter() - start}

        sources = [(upstream, relay.relay_wait_seconds if relay else wait_seconds)] if upstream else []
        try:
            got, source = pull_newest(sources + [(address, wait_seconds)], token, self.version, self.name,
                                      self.expected, tls_ca, publisher, self._buffer, base_version=self._held)
        except WeightError as err:
            self._held, source = 0, address  # the blob may be half written
            return tell(False, str(err))
        if got is None:
            return {"version": self.version, "applied": False, "error": "", "source": "", "bytes": 0, "seconds": 0.0}
        manifest, self._buffer = got
        self._held, received = manifest.version, sent_bytes(manifest)
        self.load_weights(manifest.version, self._buffer)
        self.busy_seconds += time.perf_counter() - start
        return tell(True)

    def _relay_server(self, token: str, cfg: WeightSyncConfig):
        """This actor's weight server for the next actor in the pipeline, started on first use."""
        if self._relay is None:
            from protocol.weight_service import WeightServer
            from prorank.guarded_server import ServerLimits

            self._relay = WeightServer(token, host=cfg.relay_host, tls_cert=cfg.tls_cert, tls_key=cfg.tls_key,
                                       limits=ServerLimits.of(cfg)).start()
            self.relay_address = self._relay.address  # the node's IP for a wildcard bind
        return self._relay

    def relay_info(self, token: str, relay: WeightSyncConfig) -> str:
        """Start the relay (if not yet) and return the address the next actor pulls from."""
        self._relay_server(token, relay)
        return self.relay_address

    def load_weights(self, version: int, weights) -> int:
        """Apply a complete set of named tensors (a dict, or a safetensors blob) as `version`, in place.

        An older or equal version is ignored: an engine never goes back. Returns the version served.
        """
        if version <= self.version:
            return self.version
        if not isinstance(weights, (bytes, bytearray)):
            weights = weights_to_bytes(weights)
        self.llm.collective_rpc("prorank_load_weights", args=(weights,))
        self.llm.reset_prefix_cache()  # cached prompt activations belong to the old weights
        self.version = version
        return version


def request_seed(seed: int, request_id: str) -> int:
    """A request's own sampling seed: stable across processes (not Python's salted hash)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(f"{seed}:{request_id}".encode(), digest_size=8).digest(), "big") >> 1


def _expected_specs(model: str, dtype: str):
    """The named tensors of the model's state dict (tied ones included), built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from protocol.weights_codec import expected_specs

    config = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    return expected_specs(skeleton.state_dict())

