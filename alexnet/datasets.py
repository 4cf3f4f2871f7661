"""Ray Data over the preprocessing shards: whole decoded images (validation, evaluation), and how Ray Train splits
validation."""

from __future__ import annotations

import ray
from ray.train import DataConfig

from alexnet.augment import eval_batch
from alexnet.prepared import ROW_GROUP_BYTES, Prepared

DECODE_BATCH = 32  # rows per Ray Data decoding call


def one_stage(ds: ray.data.Dataset) -> ray.data.Dataset:
    """A one-operator Dataset needs no per-operator resource reservation. With it on, Ray Data
    holds back half the CPUs for about a second and leaves gaps between tasks (measured on 2 CPUs:
    the second task started 1.0 s after the first; without it, both at once)."""
    ds.context.op_resource_reservation_enabled = False
    return ds


def read_shards(files: list[str], columns: list[str]) -> ray.data.Dataset:
    """Ray Data over preprocessing shards, in blocks of one row group.

    Ray's default 128 MiB blocks would read a whole shard as one block: one task decodes it,
    and a pass's first batch waits for ~1000 images instead of ~100.
    """
    ds = ray.data.read_parquet(files).select_columns(columns)
    ds.context.target_max_block_size = ROW_GROUP_BYTES
    return ds


def decoded_images(files: list[str], size: int, columns: list[str] = ("image", "label"),
                   **map_args) -> ray.data.Dataset:
    """Whole stored images decoded to (N, 3, S, S) uint8 with `valid` (test views are cropped on the device)."""
    return read_shards(files, list(columns)).map_batches(eval_batch, batch_size=DECODE_BATCH, batch_format="numpy",
                                                         fn_kwargs={"size": size}, **map_args)


def build_datasets(prepared: Prepared) -> dict[str, ray.data.Dataset]:
    """The datasets Ray Train splits: validation only (each worker builds its own training epochs: alexnet.stream)."""
    return {"val": decoded_images(prepared.val_files, prepared.size)} if prepared.val_files else {}


class ValSplitUnequally(DataConfig):
    """Val in unequal parts, so no image is dropped."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        val = datasets.get("val")
        rest = {k: v for k, v in datasets.items() if k != "val"}
        output = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
        if val is not None:
            val = val.copy(val)
            val.set_name("val")
            val.context.execution_options = self.default_ingest_options()
            for i, split in enumerate(val.streaming_split(world_size, equal=False)):
                output[i]["val"] = split
        return output
