"""Ray Data over the preprocessing shards: training and validation inputs, and how Ray Train splits them."""

from __future__ import annotations

import ray
from ray.train import DataConfig

from alexnet.augment import eval_batch, train_batch, train_draws
from alexnet.config import TrainConfig
from alexnet.prepared import ROW_GROUP_BYTES, Prepared

DECODE_BATCH = 32  # rows per Ray Data decoding task call
# Training blocks: ~4 row groups in, ~430 patches of 224 px out. Each block costs Ray Data a task and object
# store traffic of its own: on 2 cores, one-row-group blocks kept each worker process idle half of the epoch
# (1,300 img/s delivered), 64 MiB blocks 2,000 img/s (measured with bench/input_speed.py, README "Benchmarks").
TRAIN_BLOCK_BYTES = 64 << 20


def one_stage(ds: ray.data.Dataset) -> ray.data.Dataset:
    """A one-operator Dataset needs no per-operator resource reservation. With it on, Ray Data
    holds back half the CPUs for about a second and leaves gaps between tasks (measured on 2 CPUs:
    the second task started 1.0 s after the first; without it, both at once)."""
    ds.context.op_resource_reservation_enabled = False
    return ds


def read_shards(files: list[str], columns: list[str], shuffle: str | None = None,
                block_bytes: int = ROW_GROUP_BYTES) -> ray.data.Dataset:
    """Ray Data over preprocessing shards, in blocks of `block_bytes` (default: one row group).

    Ray's default 128 MiB blocks would read a whole shard as one block: one task decodes it,
    and a pass's first batch waits for ~1000 images instead of ~100.
    """
    ds = ray.data.read_parquet(files, shuffle=shuffle).select_columns(columns)
    ds.context.target_max_block_size = block_bytes
    return ds


def decoded_images(files: list[str], size: int, columns: list[str] = ("image", "label"),
                   **map_args) -> ray.data.Dataset:
    """Whole stored images decoded to (N, 3, S, S) uint8 with `valid` (test views are cropped on the device)."""
    return read_shards(files, list(columns)).map_batches(eval_batch, batch_size=DECODE_BATCH, batch_format="numpy",
                                                         fn_kwargs={"size": size}, **map_args)


def build_datasets(cfg: TrainConfig, prepared: Prepared) -> dict[str, ray.data.Dataset]:
    """Lazy Ray Data pipelines: re-executed every epoch, so the random crops, flips and lighting are new each time."""
    sigma = cfg.lighting_sigma if cfg.pca_lighting else 0.0
    # File order reshuffled every epoch (streaming; a block-level shuffle would wait for the whole read),
    # rows mixed further in each worker's local shuffle buffer.
    # --decode gpu: the tasks only read bytes and draw the crops; each worker decodes its batch on its GPU
    train = (read_shards(prepared.train_files, ["image", "label"], shuffle="files", block_bytes=TRAIN_BLOCK_BYTES)
             .map_batches(train_draws if cfg.decode == "gpu" else train_batch, batch_size=DECODE_BATCH,
                          batch_format="numpy",
                          fn_kwargs=dict(crop=cfg.image_size, eigenvalues=prepared.eigenvalues,
                                         eigenvectors=prepared.eigenvectors, sigma=sigma, size=prepared.size)))
    datasets = {"train": train}
    if prepared.val_files:
        datasets["val"] = decoded_images(prepared.val_files, prepared.size)
    return datasets


class ValSplitUnequally(DataConfig):
    """Train is split in equal parts (DDP steps in lockstep); val in unequal parts, so no image is dropped."""

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
