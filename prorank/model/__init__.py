"""The model and its prompt: loading and building models, the released prompt, the one scorer, padding and LoRA."""
