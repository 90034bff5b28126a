"""One live vLLM engine that turns (query, document) requests into groups of G sampled judgments (and,
for query synthesis, document prompts into sampled queries).

Plain Python, so it can be tested and benchmarked directly; `actors.pool` runs it as a Ray actor.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import safetensors.torch

from prorank.corpus.query_writing import QueryRequest, WrittenQueries
from prorank.model.lora import base_weights, merge_into, vllm_rank, write_adapter
from prorank.model.models import load_tokenizer, safetensors_views
from prorank.model.prompt import PromptBuilder, parse_judgment
from prorank.run.rollout import Completion, GroupResult, RolloutRequest
from prorank.run.weight_transport import WeightReceiver
from prorank.settings.config import ActorConfig, PromptConfig, SamplingConfig

if TYPE_CHECKING:
    import torch

    from prorank.settings.config import LoraSettings

log = logging.getLogger(__name__)


class RolloutEngine:
    """`weights`: this actor's end of the weight transport (None: the engine serves its start weights only).
    When its versions are LoRA adapters (`weights.lora`), the engine serves `model` with the newest one:
    as vLLM's LoRA on every request (`actors_serve: adapter`), or added to its base weights, which are then
    reloaded in place (`merged`: vLLM's CPU LoRA kernels are slow). Before the first version, the base
    alone (a fresh adapter is zero)."""

    def __init__(
        self,
        model: str,
        actors: ActorConfig,
        sampling: SamplingConfig,
        prompt: PromptConfig,
        name: str = "engine",
        seed_offset: int = 0,
        weights: WeightReceiver | None = None,
    ):
        # Read by vLLM at import: the engine stays in this process (on CPU: 2-3 s and 1.7 GB to start
        # instead of ~20 s and 4 processes), with a bounded KV cache.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(actors.kv_cache_gib))
        from vllm import LLM, SamplingParams  # noqa: PLC0415 vLLM: heavy (~5 s), optional extra, needed only by the rollout actors

        if actors.enforce_eager:
            # Eager in the whole process: with enforce_eager vLLM still torch.compiles its logprob rank counter
            # at the first generate, which on CPU cost 10.9 s of CPU cold and 1.1 s warm at every engine start
            # (inductor checks each vector ISA with a compiler). Eager counts the same ranks.
            import torch  # noqa: PLC0415 torch: heavy, loaded with vLLM above

            torch.compiler.set_stance("force_eager")
        engine_args = dict(
            model=model,
            dtype=actors.dtype,
            max_model_len=actors.max_model_len,
            tensor_parallel_size=actors.tensor_parallel_size,
            seed=sampling.seed + seed_offset,
            enable_prefix_caching=True,
            enforce_eager=actors.enforce_eager,
            logprobs_mode="processed_logprobs",  # after temperature: what the learner recomputes
        )
        if weights is not None:  # the class vLLM's workers load to apply a version in place
            engine_args["worker_extension_cls"] = weights.vllm_extension
            weights.bind(model, actors.dtype)
        self.lora = weights.lora if weights is not None else None
        self.serve = None  # with LoRA versions: "adapter" (vLLM's LoRA) or "merged" (into the base weights)
        if self.lora is not None:
            self.serve = self.lora.actors_serve
            if self.serve == "auto":
                self.serve = "adapter" if actors.num_gpus > 0 else "merged"
        if self.serve == "adapter" and self.lora is not None:
            # One adapter slot: each version replaces the last (its files are written under adapter_root).
            engine_args.update(enable_lora=True, max_lora_rank=vllm_rank(self.lora.r), max_loras=1)
            self.adapter_root = Path(tempfile.mkdtemp(prefix=f"prorank-{name}-adapters-"))
            atexit.register(shutil.rmtree, self.adapter_root, True)
        self.lora_request = None  # the served adapter's vllm LoRARequest (None: the base model)
        self.model, self.dtype = model, actors.dtype
        # Merged serving: the base weights of the adapted modules, and a full-weight blob (with views into it)
        # that each version is merged into in place; made at the first version.
        self._base: dict[str, torch.Tensor] | None = None
        self._blob: bytearray | None = None
        self._views: dict[str, torch.Tensor] = {}
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
            n=sampling.group_size,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            logprobs=0,
        )
        self.name = name
        self.seed, self.per_request_seed = sampling.seed, sampling.per_request_seed
        self.weights = weights
        self.busy_seconds = 0.0  # generating, scoring and applying weights, since start-up

    @property
    def version(self) -> int:
        """The weights version served (0: the start weights)."""
        return self.weights.version if self.weights is not None else 0

    def info(self) -> dict[str, object]:
        import ray  # noqa: PLC0415 Ray: heavy, needed only by the job and its actors

        return {
            "name": self.name,
            "version": self.version,
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
        }

    def generate(self, requests: list[RolloutRequest]) -> list[GroupResult]:
        from vllm.inputs import TokensPrompt  # noqa: PLC0415 vLLM: heavy (~5 s), optional extra, needed only by the rollout actors

        start = time.perf_counter()
        prompts = self.builder.encode_batch([(r.query, r.document) for r in requests])
        params = self.params
        if self.per_request_seed:
            params = [self.params.clone() for _ in requests]
            for p, r in zip(params, requests):
                p.seed = request_seed(self.seed, r.request_id)
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False, lora_request=self.lora_request
        )
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
            results.append(
                GroupResult(
                    req.request_id, req.query_id, req.doc_id, prompt_ids, completions, self.version, self.name, seconds
                )
            )
        return results

    def write_queries(self, requests: list[QueryRequest]) -> list[WrittenQueries]:
        """Query synthesis: `n` sampled answers to each request's prompt (built by the driver in this model's
        chat template), under the weights served now. Sampled from the engine's seeded generator: vLLM 0.32's
        CPU runner fails on per-request seeds once a prefill is split over steps (set_offset on a CPU generator)."""
        from vllm import SamplingParams  # noqa: PLC0415 vLLM: heavy (~5 s), optional extra, needed only by the rollout actors
        from vllm.inputs import TokensPrompt  # noqa: PLC0415 vLLM: heavy (~5 s), optional extra, needed only by the rollout actors

        start = time.perf_counter()
        params = [
            SamplingParams(
                n=r.n,
                temperature=r.temperature,
                top_p=r.top_p,
                max_tokens=r.max_tokens,
            )
            for r in requests
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=r.prompt_ids) for r in requests],
            params,
            use_tqdm=False,
            lora_request=self.lora_request,
        )
        seconds = time.perf_counter() - start
        self.busy_seconds += seconds
        return [
            WrittenQueries(
                r.request_id,
                r.doc_id,
                [c.text for c in out.outputs],
                [c.finish_reason for c in out.outputs],
                self.version,
                self.name,
                seconds,
            )
            for r, out in zip(requests, outputs)
        ]

    def score(self, pairs: list[tuple[str, str]], judge: list[tuple[str, str]] | None = None) -> dict:
        """Relevance scores, logit("1") - logit("0") at the answer position, of (query, document text)
        pairs under the weights this engine serves now, and that version: the dev evaluation runs here,
        where the model already is. One generated token per prompt, with the logprobs of exactly the two
        answer tokens; at temperature 1 their difference is the difference of the logits. `judge`: more
        pairs whose greedy answer (the rollouts' prompt and max_tokens, temperature 0) comes back as text,
        under "judgments" (the warmup's judgment accuracy)."""
        from vllm import SamplingParams  # noqa: PLC0415 vLLM: heavy (~5 s), optional extra, needed only by the rollout actors
        from vllm.inputs import TokensPrompt  # noqa: PLC0415 vLLM: heavy (~5 s), optional extra, needed only by the rollout actors

        start = time.perf_counter()
        zero, one = self.score_builder.answer_ids
        prompts = self.score_builder.encode_batch(pairs)
        params = SamplingParams(n=1, temperature=1.0, max_tokens=1, logprob_token_ids=[zero, one])
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False, lora_request=self.lora_request
        )
        scores = []
        for out in outputs:
            first = out.outputs[0].logprobs[0]  # token id -> Logprob, for the answer tokens
            scores.append(first[one].logprob - first[zero].logprob)
        judgments = []
        if judge:
            greedy = SamplingParams(n=1, temperature=0.0, max_tokens=self.params.max_tokens)
            prompts = [TokensPrompt(prompt_token_ids=p) for p in self.builder.encode_batch(judge)]
            outputs = self.llm.generate(prompts, greedy, use_tqdm=False, lora_request=self.lora_request)
            judgments = [out.outputs[0].text for out in outputs]
        seconds = time.perf_counter() - start
        self.busy_seconds += seconds
        return {
            "scores": scores,
            "judgments": judgments,
            "version": self.version,
            "seconds": seconds,
            "actor": self.name,
        }

    def sync_weights(
        self, address: str, upstream: str | None = None, version: int | None = None, wait_seconds: float | None = None
    ) -> dict:
        """Pull the newest version above the one served from the sender at `address` (or from `upstream`,
        the previous actor's relay, falling back to `address`), verify it and apply it in place. A bad
        transfer is refused and reported; the engine keeps its last good version. `version`: the version
        the caller wants served; an engine already there (an actor that started while it was being
        published and pulled it then) answers at once instead of waiting for a newer one."""
        if self.weights is None:
            raise RuntimeError(f"{self.name} was started without a weight receiver: it cannot sync weights")
        if version is not None and self.version >= version:
            return {"version": self.version, "applied": True, "error": "", "source": "served already"}
        answer = self.weights.sync(address, self._apply, upstream, wait_seconds)
        if answer["applied"]:
            self.busy_seconds += answer["seconds"]
        return answer

    def relay_address(self) -> str:
        """Start this actor's relay (if not yet) and return the address the next actor pulls from."""
        if self.weights is None:
            raise RuntimeError(f"{self.name} was started without a weight receiver: it relays nothing")
        return self.weights.relay_address()

    def _apply(self, version: int, blob: bytearray) -> None:
        """Apply a complete version (a safetensors blob) in place, in every vLLM worker; an adapter version
        becomes the LoRA every request is served with."""
        if self.serve == "adapter":
            return self._apply_adapter(version, blob)
        if self.serve == "merged":
            blob = self._merged(blob)
        self.llm.collective_rpc("prorank_load_weights", args=(blob,))
        self.llm.reset_prefix_cache()  # cached prompt activations belong to the old weights

    def _lora(self) -> LoraSettings:
        if self.lora is None:  # versions are adapters only with learner.lora: a full-weight version never gets here
            raise RuntimeError("an adapter version reached an actor started without LoRA")
        return self.lora

    def _merged(self, adapter_blob: bytearray) -> bytearray:
        """The full weights with an adapter version added (W + (alpha/r) B A), as the blob a full-weight
        version would be: the wire carried the adapter alone, the engine serves at the base's speed. The
        blob is made once; each version overwrites the adapted weights in it."""

        adapter, lora = safetensors_views(adapter_blob), self._lora()
        if self._blob is None or self._base is None:
            base = base_weights(self.model, self.dtype)
            self._blob = bytearray(safetensors.torch.save(base))
            self._views = safetensors_views(self._blob)
            merged = merge_into(base, adapter, lora)
            self._base = {name: base[name] for name in merged}  # the rest stays as the blob holds it
        else:
            merged = merge_into(self._base, adapter, lora)
        for name, weight in merged.items():
            self._views[name].copy_(weight)
        return self._blob

    def _apply_adapter(self, version: int, blob: bytearray) -> None:
        """Write the adapter as a peft folder and load it into the engine now (a bad one fails here, not in
        the next request), then drop the previous one. The prefix cache keys on the adapter: no reset."""
        from vllm.lora.request import LoRARequest  # noqa: PLC0415 vLLM: heavy (~5 s), optional extra, needed only by the rollout actors

        folder = write_adapter(self.adapter_root / f"v{version}", self._lora(), self.model, blob=blob)
        request = LoRARequest(lora_name=f"v{version}", lora_int_id=version, lora_path=str(folder))
        try:
            if not self.llm.llm_engine.add_lora(request):
                raise RuntimeError(f"vLLM did not load the adapter of version {version} from {folder}")
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        old, self.lora_request = self.lora_request, request
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)


def request_seed(seed: int, request_id: str) -> int:
    """A request's own sampling seed: stable across processes (not Python's salted hash)."""

    return int.from_bytes(hashlib.blake2b(f"{seed}:{request_id}".encode(), digest_size=8).digest(), "big") >> 1
