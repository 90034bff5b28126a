"""Run in the clients venv (transformers 4.x): a tiny random model saved the way the released ProRank models
(mixedbread-ai/mxbai-rerank-base-v2, large-v2) are: Qwen2ForCausalLM in bfloat16 with `rope_theta` and
`torch_dtype` in its config and a `Qwen2Tokenizer` tokenizer, written by transformers 4, no prorank.json.

argv: the source folder (prorank's tiny model: its tokenizer.json and weights), the output folder.
"""

import json
import sys
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2TokenizerFast

source, out = Path(sys.argv[1]), Path(sys.argv[2])
tokenizer = Qwen2TokenizerFast(
    tokenizer_file=str(source / "tokenizer.json"),
    eos_token="<|im_end|>",
    pad_token="<|endoftext|>",
    unk_token=None,
    bos_token=None,
)
config = json.loads((source / "config.json").read_text())
rope = config.pop("rope_parameters", {}) or {}
config.pop("dtype", None)
config.pop("transformers_version", None)
config["rope_theta"] = rope.get("rope_theta", 10000.0)
model = Qwen2ForCausalLM.from_pretrained(source, config=Qwen2Config(**config), torch_dtype=torch.float32)
model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
tokenizer.save_pretrained(out)
print(
    json.dumps(
        {
            "tokenizer_class": json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"],
            "rope_theta": json.loads((out / "config.json").read_text()).get("rope_theta"),
        }
    )
)
