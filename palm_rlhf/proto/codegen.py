"""Regenerate the Python code for the palm_rlhf.v1 contracts from protos/.

The generated modules are committed so that installing the package needs no code generator;
tests/services/test_proto_codegen.py regenerates into a temporary directory and diffs, so the
committed code can never drift from the .proto files.

Run ``python -m palm_rlhf.proto.codegen`` after editing a .proto file.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
PROTO_SUBDIR = Path("palm_rlhf") / "proto" / "v1"


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """The .proto files of the current contract version, relative to ``proto_root``."""
    return sorted(p.relative_to(proto_root) for p in (proto_root / PROTO_SUBDIR).glob("*.proto"))


def generate(out_dir: str | Path, proto_root: str | Path = PROTO_ROOT) -> list[Path]:
    """Run protoc (from grpcio-tools) and write ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py``.

    Files land under ``out_dir/palm_rlhf/proto/v1/``; with ``out_dir`` the repository root this
    is the package itself. Returns the generated file paths.
    """
    import grpc_tools
    from grpc_tools import protoc  # only needed by developers, so imported lazily

    proto_root = Path(proto_root)
    out_dir = Path(out_dir)
    files = proto_files(proto_root)
    if not files:
        raise FileNotFoundError(f"no .proto files under {proto_root / PROTO_SUBDIR}")
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(f) for f in files],
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit status {rc}")
    target = out_dir / PROTO_SUBDIR
    return sorted(p for p in target.iterdir() if p.name.endswith((".py", ".pyi")) and "_pb2" in p.name)


def main() -> int:
    written = generate(REPO_ROOT)
    for path in written:
        print(path.relative_to(REPO_ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
