"""One data-parallel rank of the learner: a DeepSpeed ZeRO engine in its own process.

Ranks run as Ray actors rather than under a torch launcher: the training job already runs on Ray, so one
scheduler places learner ranks, rollout actors and reward replicas on their own node types (custom
resources), the driver sees a rank that dies, and no second launcher has to be started on every node.
Each rank sets the usual torch.distributed variables itself and joins the group (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import socket
import time
from pathlib import Path

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR

from prorank.learner.objectives import Objective
from prorank.learner.precision import (
    bf16_weights,
    fold_head_input,
    forward_precision,
    masters,
    set_masters,
    trainable_copies,
    uses_bf16,
)
from prorank.learner.step import lr_lambda
from prorank.model.lora import adapter_state, add_adapter, merged_state, write_adapter
from prorank.model.models import load_tokenizer, save_model_dir
from prorank.run.weight_transport import WeightSender
from prorank.settings.config import StageLearnerConfig


def freeze_below(model, trainable_layers: int, frozen_dtype: torch.dtype | None = None) -> None:
    """Leave only the top `trainable_layers` decoder layers and the final norm trainable.

    The frozen bottom runs outside autograd (none of its inputs or weights needs a gradient), so a step
    costs the full forward plus the backward of the top layers only. Tied input/output embeddings stay
    frozen with the bottom. `frozen_dtype` (bf16 under mixed precision): the frozen weights are stored in
    it, since they need no float32 master copy, and autocast then has nothing to cast on every forward
    (about 15% of a SmolLM2 step on a 2-core CPU).
    """
    decoder = model.get_decoder()
    layers = decoder.layers
    if trainable_layers > len(layers):
        raise ValueError(f"learner.trainable_layers {trainable_layers}: the model has {len(layers)} layers")
    model.requires_grad_(False)
    for layer in layers[len(layers) - trainable_layers :]:
        layer.requires_grad_(True)
    decoder.norm.requires_grad_(True)
    if frozen_dtype is not None:
        for module in [decoder.embed_tokens, *layers[: len(layers) - trainable_layers]]:
            module.to(frozen_dtype)


class PhaseClock:
    """Seconds spent in each named phase: `with clock("forward"): ...` adds to clock.seconds["forward"]."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def rank_threads(cfg: StageLearnerConfig) -> int:
    """The compute threads of each rank: `learner.threads`, else its `num_cpus`, at least 1."""
    return cfg.threads or max(1, int(cfg.num_cpus))


def attention_kernel(setting: str, device: str) -> str:
    """transformers' attn_implementation for `learner.attention` on `device` ("cpu"/"cuda")."""
    if setting == "auto":
        return "sdpa" if device == "cuda" else "eager"
    return setting


class LearnerRank:
    """`objective`: what a step optimises (learner/objectives.py: GRPO, or the ranking losses). `sender`:
    the weight transport's learner end (prorank/run/weight_transport.py), used on rank 0. With `cfg.lora` the
    model is wrapped by peft and only its adapter trains, from `adapter` (a peft folder) or fresh; a weight
    version is then the adapter alone, and checkpoints hold it beside the merged model (prorank/model/lora.py)."""

    def __init__(
        self,
        rank: int,
        world: int,
        model_path: str,
        cfg: StageLearnerConfig,
        objective: Objective,
        sender: WeightSender | None = None,
        adapter: str | None = None,
    ):
        self.rank, self.world, self.model_path, self.cfg, self.adapter = rank, world, model_path, cfg, adapter
        self.objective = objective
        self.sender = sender  # the weight transport's learner end: rank 0 serves and publishes the versions
        self.gpu = cfg.num_gpus > 0
        if not self.gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")

    def node(self) -> str:
        import ray  # noqa: PLC0415 Ray: heavy, needed only by the job and its actors

        return ray.get_runtime_context().get_node_id()

    def master_address(self) -> tuple[str, int]:
        """This node's address and a free port, for rank 0 to host the process group."""
        import ray  # noqa: PLC0415 Ray: heavy, needed only by the job and its actors

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def setup(self, master_addr: str, master_port: int) -> None:
        os.environ.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world),
            LOCAL_RANK="0",
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
        )
        import deepspeed  # noqa: PLC0415 DeepSpeed: heavy, needed only by the learner ranks
        from transformers import AutoModelForCausalLM  # noqa: PLC0415 transformers: heavy, loaded only where a model or tokenizer is

        cfg = self.cfg
        # Explicit: two torch processes that each spin all cores' threads slow each other down many times over.
        torch.set_num_threads(rank_threads(cfg))
        deepspeed.init_distributed(dist_backend="nccl" if self.gpu else "gloo", auto_mpi_discovery=False)
        torch.manual_seed(cfg.seed)
        dtype = getattr(torch, cfg.dtype)
        # Resolved once here ("auto" reads the CPU's flags), not on every micro-batch.
        self.device_type = "cuda" if self.gpu else "cpu"
        model = AutoModelForCausalLM.from_pretrained(
            self.model_path, dtype=dtype, attn_implementation=attention_kernel(cfg.attention, self.device_type)
        )
        bf16 = uses_bf16(cfg.mixed_precision, self.device_type)
        self.bf16_weights = bf16_weights(cfg, self.device_type)  # else autocast, when bf16
        self.autocast = bf16 and not self.bf16_weights
        if cfg.trainable_layers is not None:
            freeze_below(model, cfg.trainable_layers, torch.bfloat16 if bf16 else None)
        if cfg.lora is not None:
            model = add_adapter(model, cfg.lora, self.adapter)
        start_values = {}
        if self.bf16_weights:
            fold_head_input(model)
            start_values = trainable_copies(model)
        objective = self.objective
        objective.prepare(self.model_path, load_tokenizer(self.model_path), dtype, self.gpu)
        self.micro_batches = objective.batch_size // (self.world * objective.micro_batch)
        # DeepSpeed 0.19.8's ZeRO-3 got gradient accumulation across engine steps wrong here (updates
        # differed from the single-process run; one micro-batch per step matched it exactly). Under
        # ZeRO-3 a rank therefore sums its micro-batch losses into one backward and one step.
        self.accumulation = 1 if cfg.zero_stage == 3 else self.micro_batches
        ds_config = {
            "train_batch_size": objective.batch_size,
            "train_micro_batch_size_per_gpu": objective.batch_size // (self.world * self.accumulation),
            "gradient_accumulation_steps": self.accumulation,
            "gradient_clipping": cfg.grad_clip,
            "zero_optimization": {"stage": cfg.zero_stage},
            # torch's AdamW: the same update as the single-process loop, no DeepSpeed kernel to build. Its
            # fused form updates in one pass over the float32 state instead of one per operation
            # (bench/score_profile.py: a score step's optimizer step 0.25 s -> 0.13 s on 2 cores).
            "optimizer": {
                "type": "AdamW",
                "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "torch_adam": True, "fused": True},
            },
            "bf16": {"enabled": cfg.dtype == "bfloat16" or self.bf16_weights},
            "steps_per_print": 2**31 - 1,
        }
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=ds_config,
            lr_scheduler=lambda opt: LambdaLR(opt, lr_lambda(cfg)),
        )
        if start_values:
            set_masters(self.engine.module, start_values)

    def train_step(self, groups: list, normalizer: float) -> dict[str, float]:
        """This rank's share of one step: micro-batches with accumulation (ZeRO-3: one summed backward),
        then the optimizer step.

        The loss of each micro-batch is scaled back up by accumulation * world, because DeepSpeed divides
        by both (gradient accumulation, data-parallel mean): the sum over all ranks and micro-batches is
        then exactly the batch loss over the global `normalizer`.
        """
        engine = self.engine
        engine.train()
        start = time.perf_counter()
        totals: dict[str, float] = {}
        size = self.objective.micro_batch
        micro = [groups[i : i + size] for i in range(0, len(groups), size)]
        if len(micro) != self.micro_batches:
            raise ValueError(f"rank {self.rank}: got {len(groups)} items, expected {self.micro_batches * size}")
        pending = None  # ZeRO-3: the summed loss of this rank's micro-batches
        clock = PhaseClock()  # where the step's seconds go: the job logs them beside its own step time
        for batch in micro:
            with clock("forward"), forward_precision(self.autocast, self.device_type):
                loss, stats = self.objective.loss(engine.module, batch, normalizer)
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value
            if self.accumulation < self.micro_batches:  # folded into one backward (ZeRO-3)
                pending = loss if pending is None else pending + loss
                continue
            with clock("backward"):
                engine.backward(loss * self.accumulation * self.world)
            with clock("optimizer"):
                engine.step()
        if pending is not None:
            with clock("backward"):
                engine.backward(pending * self.world)
            with clock("optimizer"):
                engine.step()
        grad_norm = engine.get_global_grad_norm()
        totals["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        totals["lr"] = self.scheduler.get_last_lr()[0]
        totals["seconds"] = time.perf_counter() - start
        totals.update({f"{phase}_seconds": seconds for phase, seconds in clock.seconds.items()})
        return totals

    def _full_parameters(self, trainable_only: bool = False):
        """A context in which the module holds its full parameters (or its trainable ones: a LoRA adapter):
        ZeRO-3 gathers them (a collective); under ZeRO-2 every rank already holds them, so nothing is
        gathered or copied."""
        if self.cfg.zero_stage == 3:
            import deepspeed  # noqa: PLC0415 DeepSpeed: heavy, needed only by the learner ranks

            params = [p for p in self.engine.module.parameters() if p.requires_grad or not trainable_only]
            return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        return contextlib.nullcontext()

    def _masters(self) -> dict[str, torch.Tensor]:
        """With bf16 weights, the trained weights' float32 masters (else none). A collective: each rank
        holds a partition of them."""
        return masters(self.engine.module) if self.bf16_weights else {}

    def _model_state(self, trained_masters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The plain model's weights (with LoRA: merged), the trained ones as `_masters()` gave them,
        inside `_full_parameters()`."""
        if self.cfg.lora is not None:
            return merged_state(self.engine.module)
        return {**self.engine.module.state_dict(), **trained_masters}

    def _version_state(self) -> dict[str, torch.Tensor]:
        """What a weight version carries (with LoRA: the adapter alone), inside `_full_parameters(lora)`."""
        if self.cfg.lora is not None:
            return adapter_state(self.engine.module)
        return self.engine.module.state_dict()

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """A copy of the full weights (with LoRA: merged) as named CPU tensors on rank 0 (None elsewhere).
        A collective."""
        with self._full_parameters():
            trained = self._masters()
            if self.rank != 0:
                return None
            return {k: v.detach().to("cpu", copy=True) for k, v in self._model_state(trained).items()}

    def memory(self) -> dict[str, float]:
        """This rank's peak resident memory and optimizer state in bytes, and its trainable parameters."""

        inner = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)  # ZeRO wraps torch's AdamW
        state = sum(
            t.numel() * t.element_size() for s in inner.state.values() for t in s.values() if torch.is_tensor(t)
        )
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters() if p.requires_grad)
        return {
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0,
            "optimizer_state_bytes": float(state),
            "trainable_parameters": float(trainable),
        }

    def _sender(self) -> WeightSender:
        if self.sender is None:
            raise RuntimeError("this learner was made without a weight sender: it serves no weights")
        return self.sender

    def serve_weights(self) -> str:
        """Start rank 0's end of the weight transport (the actors pull every version from it); its address."""
        return self._sender().start()

    def publish(self, version: int, receivers: list[str] | None = None) -> dict[str, float] | None:
        """Publish the weights as `version` from rank 0, read from the parameters where they lie (the gRPC
        sender copies them once, into the chunk messages; tensors unchanged since the last version not at
        all). A collective under ZeRO-3. `receivers`: the actor names whose reports are accepted."""
        with self._full_parameters(trainable_only=self.cfg.lora is not None):
            if self.rank != 0:
                return None
            return self._sender().publish(version, self._version_state(), receivers)

    def save_model(self, folder: str, adapter_folder: str | None = None) -> None:
        """The full weights (with LoRA: merged) as a plain model folder, and with LoRA the adapter as a peft
        folder in `adapter_folder` (rank 0 writes them). A collective under ZeRO-3."""

        with self._full_parameters():
            trained = self._masters()
            if self.rank == 0:
                save_model_dir(self._model_state(trained), self.model_path, folder)
                if self.cfg.lora is not None and adapter_folder:
                    write_adapter(adapter_folder, self.cfg.lora, self.model_path, self._version_state())

    def save(self, folder: str) -> None:
        """Model, optimizer and scheduler (DeepSpeed's checkpoint) plus this rank's RNG states. With LoRA
        the frozen base is not written: it is the start model's."""
        self.engine.save_checkpoint(folder, tag="state", exclude_frozen_parameters=self.cfg.lora is not None)
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, Path(folder) / f"rng-rank{self.rank}.pt")
        torch.distributed.barrier()

    def load(self, folder: str) -> None:
        path, _ = self.engine.load_checkpoint(
            folder,
            tag="state",
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
            load_module_strict=self.cfg.lora is None,
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {folder}")
        rng = torch.load(Path(folder) / f"rng-rank{self.rank}.pt", weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
