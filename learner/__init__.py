"""The DeepSpeed ZeRO learner: GRPO prompt warmup, then fine-grained score learning."""
