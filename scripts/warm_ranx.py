"""Compile ranx's numba kernels once, into the virtual environment: numba caches them beside ranx's own
files, keyed by them. Without this each fresh environment compiles them on first use: ~80 s of CPU on 2
cores (measured: the fusion and comparison tests took 97 s cold, 18 s warm), paid by the first
`prorank eval --fusion`, `prorank export --fusion` or `prorank compare`, and in CI by every test process
that fuses. Runs our own fusion and comparison code on a tiny pair of runs, so what is compiled is what
those commands call. numba compiles a kernel per width of a run's longest document id (a fixed-width
string array): warmed for 1 character (hand-made runs) and 8 and 9 (SciFact's ids); other widths compile
on first use, once. scripts/install.sh runs it; running it again is harmless and quick."""

from __future__ import annotations

import tempfile
from pathlib import Path

from prorank.eval.compare import compare_runs, p_values
from prorank.eval.runs import write_run
from prorank.release.fusion import FusionSettings, fuse, fuse_lists, tune


def warm(width: int) -> None:
    a, b, c, d = (str(n).rjust(width, "1") for n in range(1, 5))
    qrels = {f"q{i}": {a: 1, c: 2} for i in range(6)}
    first = {q: {a: 3.0, b: 2.0, c: 1.0, d: 0.5} for q in qrels}
    model = {q: {a: 0.2, b: -1.0, c: 2.5, d: 0.1} for q in qrels}
    for method in ("wsum", "rrf"):
        fuse(first, model, tune(qrels, first, model, method, weight_step=0.25))
    fuse_lists([3.0, 1.0], [0.5, 2.0], FusionSettings(method="wsum", params={"weights": [0.5, 0.5]}, norm="min-max"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "qrels.txt").write_text(
            "".join(f"{q} 0 {d} {g}\n" for q, docs in qrels.items() for d, g in docs.items())
        )
        for name, run in (("first", first), ("model", model)):
            write_run(
                folder / f"{name}.trec", {q: sorted(s.items(), key=lambda x: -x[1]) for q, s in run.items()}, name
            )
        for test in ("student", "fisher"):
            p_values(compare_runs(folder / "qrels.txt", [folder / "first.trec", folder / "model.trec"], test, 0.05))


if __name__ == "__main__":
    for width in (1, 8, 9):
        warm(width)
