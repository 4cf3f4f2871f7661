"""summary.json's shard manifest against the shards on disk (check_shards), without Ray."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alexnet.config import UsageError
from alexnet.prepared import check_shards, shard_manifest


def _output(tmp_path, rows=(3, 2)):
    shards = []
    for i, n in enumerate(rows):
        (tmp_path / "train").mkdir(exist_ok=True)
        pq.write_table(pa.table({"label": list(range(n))}), tmp_path / "train" / f"part-{i:05d}.parquet")
        shards.append({"split": "train", "shard": i})
    manifest = shard_manifest(tmp_path, shards, {f"train/part-{i:05d}.parquet": n for i, n in enumerate(rows)})
    return {"shard_files": manifest}


def test_an_intact_output_passes_and_the_manifest_records_rows_and_sizes(tmp_path):
    summary = _output(tmp_path)
    check_shards(tmp_path, summary)
    assert summary["shard_files"]["train/part-00001.parquet"]["rows"] == 2
    assert summary["shard_files"]["train/part-00000.parquet"]["bytes"] == (tmp_path / "train/part-00000.parquet").stat().st_size


def test_a_shard_with_other_rows_at_the_recorded_size_is_named(tmp_path):
    summary = _output(tmp_path)
    summary["shard_files"]["train/part-00001.parquet"]["rows"] = 7  # as if another output's shard of equal size
    with pytest.raises(UsageError, match=r"shard train/part-00001.parquet holds 2 rows, summary.json says 7"):
        check_shards(tmp_path, summary)


def test_an_output_without_a_manifest_is_not_checked(tmp_path):
    _output(tmp_path)
    check_shards(tmp_path, {})
