"""The committed gRPC/protobuf code is exactly what scripts/generate_proto.py makes from proto/."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def test_generated_code_matches_the_proto_files(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate_proto.py"), str(tmp_path)],
        check=True,
        capture_output=True,
    )
    generated = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert generated, "the generator produced nothing"
    for relative, content in generated.items():
        committed = ROOT / "src" / relative
        assert committed.exists(), f"{relative} is generated but not committed: run scripts/generate_proto.py"
        assert committed.read_bytes() == content, (
            f"{relative} drifted from proto/: run scripts/generate_proto.py"
        )
    committed_files = {p.relative_to(ROOT / "src") for p in (ROOT / "src").rglob("*_pb2*.py*")}
    assert committed_files == set(generated), "generated files without a .proto behind them"


def test_removed_fields_stay_reserved() -> None:
    """A field number once used is never given to another field: an older peer would read
    the new field's value as the old one."""
    from google.protobuf import descriptor_pb2

    from xcha.v1 import xcha_pb2 as pb

    message = descriptor_pb2.DescriptorProto()
    pb.MemberStatus.DESCRIPTOR.CopyToProto(message)
    assert "postmaster_state" not in pb.MemberStatus.DESCRIPTOR.fields_by_name
    assert "postmaster_state" in message.reserved_name
    assert any(r.start <= 13 < r.end for r in message.reserved_range)
