"""Build DeepSpeed's CPU shared-memory collectives op once, at install. Every learner rank on the CPU
accelerator loads it in `deepspeed.init_distributed` and, when it is not built yet, compiles it there with
ninja and g++ (torch's JIT extensions, cached in ~/.cache/torch_extensions, or TORCH_EXTENSIONS_DIR):
measured on 2 AVX2 cores, 59 s of CPU and 48 s of wall inside a job's first rank start, which the other
rank and the whole job wait for. Built here, that start only loads the .so. The cache is keyed by the
build's sources and flags (the include paths of this environment's torch), so a second environment on the
same machine builds its own again. scripts/install.sh runs it with the cpu extra; running it again is quick."""

from __future__ import annotations

from deepspeed.comm.torch import build_shm_op

if __name__ == "__main__":
    op = build_shm_op()  # None where the accelerator has no such op: nothing to build
    print(f"DeepSpeed shared-memory op: {'ready' if op is not None else 'not used here'}")
