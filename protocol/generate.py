"""Regenerate the committed Python stubs from the .proto files: `python -m protocol.generate`.

tests/test_protocol.py fails when the committed stubs drift from the .proto files.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "protocol").glob("*.proto"))


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    args = ["protoc", f"-I{ROOT}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *PROTOS]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTOS}")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
