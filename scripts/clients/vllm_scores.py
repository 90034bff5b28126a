"""vLLM's score API on an exported model folder, called as its model card says (in its own process: the
engine's start-up state stays out of the test process).

stdin: {"model": folder, "queries": [{"query": str, "documents": [str, ...]}, ...]}
stdout, on a line starting with RESULT: {"scores": per query, the API's default output (sigmoid of the class
logit), "logits": per query, the same with use_activation=False}
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

if __name__ == "__main__":
    from vllm import LLM, PoolingParams

    job = json.load(sys.stdin)
    folder = Path(job["model"])
    settings = json.loads((folder / "prorank.json").read_text())
    llm = LLM(
        model=str(folder),
        runner="pooling",
        dtype="float32",
        max_model_len=2048,
        hf_overrides=settings["vllm_hf_overrides"],
        enforce_eager=True,
    )
    template = (folder / "chat_template.jinja").read_text()
    result: dict[str, list] = {"scores": [], "logits": []}
    for item in job["queries"]:
        outputs = llm.score(item["query"], item["documents"], chat_template=template, use_tqdm=False)
        raw = llm.score(
            item["query"],
            item["documents"],
            chat_template=template,
            use_tqdm=False,
            pooling_params=PoolingParams(use_activation=False),
        )
        result["scores"].append([o.outputs.score for o in outputs])
        result["logits"].append([o.outputs.score for o in raw])
    print("RESULT " + json.dumps(result), flush=True)
