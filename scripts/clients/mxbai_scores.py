"""Run in the clients venv (transformers 4.x, `mxbai-rerank`): the real `MxbaiRerankV2` on a model folder.

stdin: {"model": folder, "pairs": [[query, document], ...],
        "runs": [{"max_length": int, "instruction": str | null, "scores": bool}, ...]}
stdout: {"runs": [{"ids": the token ids `prepare_inputs` gives each pair (padding removed), "scores":
`predict`'s scores (float32), when asked}, ...], "rope_theta": the RoPE base transformers 4 read,
"transformers": its version}
"""

import json
import sys

import torch
import transformers
from mxbai_rerank import MxbaiRerankV2

job = json.load(sys.stdin)
model = MxbaiRerankV2(job["model"], device="cpu", torch_dtype=torch.float32)
queries = [q for q, _ in job["pairs"]]
documents = [d for _, d in job["pairs"]]
runs = []
for run in job["runs"]:
    # What __init__ does with its max_length argument, without loading the model again.
    model.max_length = run["max_length"]
    model.prepare_predefined_inputs()
    inputs = model.prepare_inputs(queries, documents, instruction=run["instruction"])
    out = {"ids": [row[mask.bool()].tolist() for row, mask in zip(inputs["input_ids"], inputs["attention_mask"])]}
    if run["scores"]:
        # In batches of 8: predict() runs whatever it is given as one batch, and the vocabulary logits of
        # 100 long pairs at once do not fit in memory.
        out["scores"] = [
            s
            for at in range(0, len(queries), 8)
            for s in model.predict(
                queries[at : at + 8], documents[at : at + 8], instruction=run["instruction"]
            ).tolist()
        ]
    runs.append(out)
json.dump(
    {
        "runs": runs,
        "rope_theta": getattr(model.model.config, "rope_theta", None),
        "transformers": transformers.__version__,
    },
    sys.stdout,
)
