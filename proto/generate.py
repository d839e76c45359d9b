"""Regenerates the Python stubs for proto/vitscope (v1 and the Open Inference Protocol) into
client/vitscope.

The stubs are committed; tests regenerate into a scratch folder and fail when
the committed copies drift from the protos.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
DEFAULT_OUT = REPO_ROOT / "client"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "vitscope").glob("*/*.proto"))


def generate(out_dir: Path) -> None:
    """Writes *_pb2.py, *_pb2_grpc.py and their .pyi files under out_dir/vitscope/<folder>."""
    mypy_plugin = shutil.which("protoc-gen-mypy") or str(
        Path(sys.executable).parent / "protoc-gen-mypy"
    )
    mypy_grpc_plugin = shutil.which("protoc-gen-mypy_grpc") or str(
        Path(sys.executable).parent / "protoc-gen-mypy_grpc"
    )
    for proto in proto_files():
        (out_dir / proto.parent.relative_to(PROTO_ROOT)).mkdir(parents=True, exist_ok=True)
    grpc_include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{grpc_include}",
        f"--plugin=protoc-gen-mypy={mypy_plugin}",
        f"--plugin=protoc-gen-mypy_grpc={mypy_grpc_plugin}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
