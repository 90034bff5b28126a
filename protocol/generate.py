"""Regenerate the committed Python stubs from the .proto files: `python -m prorank.protocol.generate`.

The stubs import each other as `prorank.protocol.*` (the folder installs as that package), so protoc is run
on a copy of the .proto files laid out under prorank/protocol/. tests/unit/test_protocol.py fails when the
committed stubs drift from the .proto files.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "protocol"
PROTOS = sorted(p.name for p in HERE.glob("*.proto"))
PACKAGE = Path("prorank/protocol")  # where the stubs are imported from


def generate(out_dir: Path) -> None:
    """Write the stubs of every .proto file into `out_dir` (flat, as they are committed in protocol/)."""

    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        (src / PACKAGE).mkdir(parents=True)
        (out / PACKAGE).mkdir(parents=True)
        for name in PROTOS:
            shutil.copy(HERE / name, src / PACKAGE / name)
        args = [
            "protoc",
            f"-I{src}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *(str(PACKAGE / name) for name in PROTOS),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTOS}")
        out_dir.mkdir(parents=True, exist_ok=True)
        for stub in (out / PACKAGE).iterdir():
            shutil.copy(stub, out_dir / stub.name)


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
