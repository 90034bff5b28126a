"""The same GRPO step in one process with plain torch: the baseline of bench/learner.py and the
reference the DeepSpeed ranks are tested against."""

from __future__ import annotations

import time

import torch
from torch.optim.lr_scheduler import LambdaLR

from prorank.learner.step import lr_lambda, micro_batch_loss, step_normalizer
from prorank.run.rollout import ScoredGroup
from prorank.settings.config import StageLearnerConfig


class TorchLearner:
    def __init__(self, model, ref_model, cfg: StageLearnerConfig, pad_id: int, temperature: float = 1.0):
        self.model, self.ref, self.cfg, self.pad_id, self.temperature = model, ref_model, cfg, pad_id, temperature
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = LambdaLR(self.optimizer, lr_lambda(cfg))

    def step(self, groups: list[ScoredGroup]) -> dict[str, float]:
        cfg = self.cfg
        start = time.perf_counter()
        self.model.train()
        normalizer = step_normalizer(groups, cfg)
        totals: dict[str, float] = {}
        for i in range(0, len(groups), cfg.micro_batch_groups):
            loss, stats = micro_batch_loss(
                self.model,
                self.ref,
                groups[i : i + cfg.micro_batch_groups],
                normalizer,
                cfg,
                self.pad_id,
                self.temperature,
            )
            loss.backward()
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value
        totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        totals["lr"] = self.scheduler.get_last_lr()[0]
        totals["seconds"] = time.perf_counter() - start
        return totals
