"""The committed generated code must be exactly what protoc makes of the .proto files."""

from __future__ import annotations

from pathlib import Path

from palm_rlhf.proto import codegen

PACKAGE_DIR = Path(codegen.__file__).resolve().parent / "v1"


def test_generated_code_matches_the_protos(tmp_path):
    fresh = codegen.generate(tmp_path)
    assert fresh, "protoc produced nothing"
    fresh_names = {p.name for p in fresh}
    committed = {p.name for p in PACKAGE_DIR.iterdir() if "_pb2" in p.name and p.suffix in (".py", ".pyi")}
    assert fresh_names == committed, "run `python -m palm_rlhf.proto.codegen` and commit the result"
    stale = [p.name for p in fresh if p.read_text() != (PACKAGE_DIR / p.name).read_text()]
    assert not stale, f"stale generated files {stale}: run `python -m palm_rlhf.proto.codegen`"


def test_every_proto_field_and_rpc_is_documented():
    """Each field, enum value, message and rpc line is preceded by a comment."""
    undocumented = []
    for proto in sorted((codegen.PROTO_ROOT / codegen.PROTO_SUBDIR).glob("*.proto")):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            s = line.strip()
            is_field = s.endswith(";") and "=" in s and not s.startswith(("syntax", "package", "option", "//"))
            if is_field or s.startswith(("rpc ", "service ")):
                prev = lines[i - 1].strip() if i else ""
                if not prev.startswith("//"):
                    undocumented.append(f"{proto.name}:{i + 1}: {s}")
    assert not undocumented, "\n".join(undocumented)
