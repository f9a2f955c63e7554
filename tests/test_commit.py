"""pipeline.run.commit's reader: `read_marked` is the one way a committed file is read (report
and tests alike): the file its marker names, its sha256, its schema version."""
import json

import pyarrow as pa
import pytest

from pipeline import schema
from pipeline.run import commit
from pipeline.run.commit import CommitError
from tests.test_report import _row

MARKER = {"source": "/data/s.tar", "samples": 2, "config_hash": "h"}


def _commit(out, sid="s", stage="evaluate"):
    rows = [_row("a", 0, shard=sid), _row("b", 0, shard=sid, correct=False)]
    return commit.commit_records(str(out), stage, sid, rows, MARKER)


def test_read_marked_columns_and_dictionary(tmp_path):
    marker = _commit(tmp_path)
    table = commit.read_marked(str(tmp_path), "evaluate", "s", marker, ["key", "attack_name", "not_a_column"],
                               read_dictionary=["attack_name"])
    assert table.column_names == ["key", "attack_name"] and table.column("key").to_pylist() == ["a", "b"]
    assert pa.types.is_dictionary(table.schema.field("attack_name").type)
    assert commit.read_committed(str(tmp_path), "evaluate", "s").schema.equals(schema.SCHEMA)


def test_a_file_that_does_not_match_its_marker_is_refused(tmp_path):
    marker = _commit(tmp_path)
    other = _commit(tmp_path / "other", "t")          # a whole Parquet file, but not the one vouched for
    (tmp_path / "evaluate" / marker["parquet"]).write_bytes(
        (tmp_path / "other" / "evaluate" / other["parquet"]).read_bytes())
    with pytest.raises(CommitError, match=r"s\.done\.json: the Parquet file does not match its commit marker"):
        commit.read_committed(str(tmp_path), "evaluate", "s")


def test_schema_version_is_checked_per_kind_of_records(tmp_path):
    marker = _commit(tmp_path)
    readable = rf"2 or 3 or 4 or {schema.SCHEMA_VERSION}"
    with pytest.raises(ValueError, match=rf"schema version 1; this advpure reads {readable}"):
        commit.read_marked(str(tmp_path), "evaluate", "s", {**marker, "schema_version": 1})
    # corpus records carry a version of their own, and read as such
    rows = [{"schema_version": schema.CORPUS_SCHEMA_VERSION, "shard": "c", "key": "k", "status": "ok"}]
    corpus = commit.commit_records(str(tmp_path), "purify_corpus", "c", rows, MARKER, schema.CORPUS_SCHEMA)
    assert corpus["schema_version"] == schema.CORPUS_SCHEMA_VERSION != schema.SCHEMA_VERSION
    assert commit.read_committed(str(tmp_path), "purify_corpus", "c").column("key").to_pylist() == ["k"]


def test_load_records_reads_every_marked_shard_and_nothing_else(tmp_path):
    _commit(tmp_path, "s1")
    _commit(tmp_path, "s2")
    (tmp_path / "evaluate" / "s3.deadbeef.parquet").write_bytes(b"an attempt that never committed")
    assert commit.load_records(str(tmp_path)).column("shard").to_pylist() == ["s1", "s1", "s2", "s2"]
    assert [sid for sid, _, _ in commit.iter_marked(str(tmp_path), "evaluate", ["key"])] == ["s1", "s2"]
    with pytest.raises(CommitError, match="no committed results under"):
        commit.load_records(str(tmp_path), "purify")
    assert json.loads((tmp_path / "evaluate" / "s1.done.json").read_text())["rows"] == 2


def test_version_2_records_without_final_evaluated_still_read_and_report(tmp_path):
    """Records of the previous schema (2: every row's final R runs evaluated, no
    `final_evaluated` column) stay readable: results written before the upgrade are not lost."""
    import hashlib
    import io

    import pyarrow.parquet as pq

    from pipeline import report

    marker = _commit(tmp_path)
    _commit(tmp_path / "new")
    path = tmp_path / "evaluate" / marker["parquet"]
    old = pq.read_table(path).drop_columns(["final_evaluated"])
    buf = io.BytesIO()
    pq.write_table(old, buf)
    path.write_bytes(buf.getvalue())
    old_marker = {**marker, "schema_version": 2, "sha256": hashlib.sha256(buf.getvalue()).hexdigest()}
    (tmp_path / "evaluate" / "s.done.json").write_text(json.dumps(old_marker))
    table = commit.read_committed(str(tmp_path), "evaluate", "s")
    assert "final_evaluated" not in table.column_names and table.num_rows == 2
    doc, new = report.summarize(table), report.summarize(commit.read_committed(str(tmp_path / "new"), "evaluate", "s"))
    assert [a["final_skipped"] for a in doc["attacks"]] == [0] * len(doc["attacks"])
    assert doc["worst_case"] == new["worst_case"] and doc["attacks"][0]["robust"] == new["attacks"][0]["robust"]
