"""Fewer bytes on the wire: only the changed tensors, and bfloat16. What each saves, and what bf16 costs.

    .venv/bin/python -m bench.wire_bytes --model models/SmolLM2-135M-Instruct [--trainable-layers 4] [--pairs 64]

Only changed tensors: a version in which only the top `--trainable-layers` decoder layers and the final
norm changed (what `learner.trainable_layers` trains), fetched over gRPC on loopback by a receiver that
holds the previous version, against the same version fetched whole: bytes and seconds, as ratios.

bfloat16 (`weights.wire_dtype: bfloat16`): a float32 model's weights are published as bfloat16 and cast back to
float32 by the receivers, so the actors run the bf16-rounded weights while the learner keeps float32.
Printed, in one run:
- bytes on the wire and the time to pack a version, bf16 over float32 (ratios);
- at the answer position of real SciFact prompts: |difference| of logprob("0"), logprob("1") and of the
  score logit("1") - logit("0"), and the KL(learner || actor) of the next-token distributions, the
  sampler/learner mismatch the GRPO step would see on top of the engines' own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from prorank.corpus.data import load_local
from prorank.model.models import load_tokenizer
from prorank.model.prompt import PromptBuilder, document_text

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    parser.add_argument("--data", default=str((ROOT / ".." / "shared" / "data" / "scifact").resolve()))
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--trainable-layers", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error("--pairs: at least 1")
    if args.trainable_layers < 1:
        parser.error("--trainable-layers: at least 1")
    if not Path(args.model, "config.json").is_file():
        parser.error(f"--model {args.model}: no model folder there")

    import torch  # noqa: PLC0415 torch: heavy (~1.6 s), imported where tensors are used so the CLI and core stay light
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 transformers: heavy, loaded only where a model or tokenizer is

    from prorank.weights.codec import pack  # noqa: PLC0415 pulls torch, which importing this module does not

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    state = model.state_dict()
    delta = changed_tensors(state, args.trainable_layers)
    timings = {}
    for name, wire in (("float32", None), ("bfloat16", torch.bfloat16)):
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            packed = pack(1, state, 2**20, wire_dtype=wire)
            best = min(best, time.perf_counter() - start)
        timings[name] = (best, packed.manifest.total_bytes)
        del packed

    data = load_local(args.data, "test")
    docs = list(data.corpus.values())
    pairs = []
    for i, qid in enumerate(data.query_ids):
        relevant = data.corpus[next(iter(data.qrels[qid]))]
        pairs.append((data.queries[qid], document_text(relevant.title, relevant.text)))
        other = docs[(i * 97) % len(docs)]
        pairs.append((data.queries[qid], document_text(other.title, other.text)))
        if len(pairs) >= args.pairs:
            break
    builder = PromptBuilder(load_tokenizer(args.model), 176)
    zero, one = builder.answer_ids
    rounded = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in state.items()})
    d0, d1, dscore, kl = [], [], [], []
    with torch.no_grad():
        for ids in builder.encode_batch(pairs):
            x = torch.tensor([ids])
            p = torch.log_softmax(model(x).logits[0, -1].float(), -1)
            q = torch.log_softmax(rounded(x).logits[0, -1].float(), -1)
            d0.append(abs(p[zero] - q[zero]).item())
            d1.append(abs(p[one] - q[one]).item())
            dscore.append(abs((p[one] - p[zero]) - (q[one] - q[zero])).item())
            kl.append(torch.sum(p.exp() * (p - q)).item())
    report = {
        "model": args.model,
        "pairs": len(pairs),
        "changed_tensors": delta,
        "bytes_ratio_bf16_over_fp32": timings["bfloat16"][1] / timings["float32"][1],
        "pack_seconds_ratio_bf16_over_fp32": timings["bfloat16"][0] / timings["float32"][0],
        "abs_dlogprob_0": {"mean": statistics.fmean(d0), "max": max(d0)},
        "abs_dlogprob_1": {"mean": statistics.fmean(d1), "max": max(d1)},
        "abs_dscore": {"mean": statistics.fmean(dscore), "max": max(dscore)},
        "kl_learner_actor": {"mean": statistics.fmean(kl), "max": max(kl)},
    }
    print(
        f"only changed tensors (top {args.trainable_layers} layers + norm): bytes {delta['bytes_ratio']:.3f}x, "
        f"fetch seconds {delta['seconds_ratio']:.3f}x of the whole version"
    )
    print(
        f"bytes on the wire, bf16/fp32: {report['bytes_ratio_bf16_over_fp32']:.3f}  "
        f"pack time, bf16/fp32: {report['pack_seconds_ratio_bf16_over_fp32']:.2f}x"
    )
    for key in ("abs_dlogprob_0", "abs_dlogprob_1", "abs_dscore", "kl_learner_actor"):
        print(f"{key}: mean {report[key]['mean']:.2e}  max {report[key]['max']:.2e}  ({len(pairs)} prompts)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


def changed_tensors(state: dict, trainable_layers: int) -> dict[str, float]:
    """Bytes and fetch seconds of a version that changed only the top layers, over the whole version."""
    from prorank.weights.codec import sent_bytes  # noqa: PLC0415 pulls torch, which importing this module does not
    from prorank.weights.receiver import fetch_version  # noqa: PLC0415 pulls torch, which importing this module does not
    from prorank.weights.server import WeightServer  # noqa: PLC0415 pulls torch, which importing this module does not

    layers = sorted({int(n.split(".")[2]) for n in state if n.startswith("model.layers.")})
    if trainable_layers > len(layers):
        raise SystemExit(f"--trainable-layers {trainable_layers}: the model has {len(layers)} layers")
    top = tuple(f"model.layers.{i}." for i in layers[-trainable_layers:])
    server = WeightServer("bench").start()
    try:
        server.publisher.publish(1, state)
        _, blob = fetch_version(server.address, "bench", 0, "r", timeout=600)
        held = bytearray(blob)
        version, full_s, delta_s = 1, float("inf"), float("inf")
        for _ in range(3):
            version += 1
            changed = {n: (t + 1e-3 if n.startswith(top) or n == "model.norm.weight" else t) for n, t in state.items()}
            server.publisher.publish(version, changed)
            start = time.perf_counter()
            fetch_version(server.address, "bench", version - 1, "whole", timeout=600, buffer=blob)
            full_s = min(full_s, time.perf_counter() - start)
            start = time.perf_counter()
            manifest, held = fetch_version(
                server.address, "bench", version - 1, "r", timeout=600, buffer=held, base_version=version - 1
            )
            delta_s = min(delta_s, time.perf_counter() - start)
            state = changed
        return {
            "bytes_ratio": sent_bytes(manifest) / manifest.total_bytes,
            "seconds_ratio": delta_s / full_s,
            "tensors": sum(s.changed_at > manifest.base_version for s in manifest.tensors),
        }
    finally:
        server.stop(0)


if __name__ == "__main__":
    main()
