from pathlib import Path

from prorank.protocol.generate import HERE, PROTOS, generate


def test_committed_stubs_match_the_proto_files(tmp_path):
    generate(tmp_path)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated, "protoc produced nothing"
    for rel in generated:
        committed = HERE / rel
        assert committed.is_file(), f"{rel} is not committed: run python -m prorank.protocol.generate"
        assert committed.read_text() == (tmp_path / rel).read_text(), (
            f"{rel} drifted: run python -m prorank.protocol.generate"
        )
    assert {Path(p).stem for p in PROTOS} == {"reward", "weights"}
