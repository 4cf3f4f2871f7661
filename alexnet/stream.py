"""Each Ray Train worker's training input: one Ray Data pipeline of its own that runs across all of its epochs.

Epoch e puts the training row groups in a seeded order (seed, e) and cuts their rows, in that order, into
`world` contiguous parts: N // world rows each, the first N % world parts one more. Worker `rank` reads its part
in read tasks of about `shuffle_mb` MiB of stored JPEGs. Each task reads its row groups (where a part ends, a
row group is cut in two), shuffles their rows and decodes, crops and flips them, all drawn from (seed, e, rank,
task). So every stored image is read exactly once per epoch across the workers, and a resumed run reads in each
epoch the same rows, with the same crops, as an unbroken one.

Ray Train's `streaming_split` restarted its execution every epoch behind a barrier across all workers: 3.4-4.9 s
before each epoch's first batch on 2 cores. Here no worker waits for another, and a worker's pipeline goes on from
one epoch's read tasks to the next one's: the next epoch's first batches are made while this epoch ends and while
validation runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from alexnet.augment import gpu_train_batch, patches_nchw, train_batch, train_draws
from alexnet.config import TrainConfig
from alexnet.exits import UsageError

# Output blocks: ~430 patches of 224 px. Each block costs Ray Data object store traffic of its own: on 2 cores,
# one-row-group blocks kept each worker process idle half of the epoch (README "Benchmarks").
BLOCK_BYTES = 64 << 20

Group = tuple[str, int, int, int]  # (file, row group index, rows, first row's index in the training set)


def row_groups(files: list[str]) -> tuple[list[Group], int]:
    """The training set's row groups in file order, from the Parquet footers, and their stored bytes."""
    groups, stored, first = [], 0, 0
    for path in files:
        meta = pq.read_metadata(path)
        for i in range(meta.num_row_groups):
            rows = meta.row_group(i).num_rows
            groups.append((path, i, rows, first))
            stored += meta.row_group(i).total_byte_size
            first += rows
    return groups, stored


def part(total: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of worker `rank`'s rows in an epoch's order."""
    base, extra = divmod(total, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def steps_per_epoch(total: int, world: int, batch_size: int) -> int:
    """Steps every worker takes per epoch (DDP: the same on all): `batch_size` rows each, the last takes the rest
    of the worker's part (1 to batch_size + 1 rows), so no row is dropped."""
    return max(1, math.ceil(total // world / batch_size))


def epoch_tasks(groups: list[Group], stored_bytes: int, seed: int, epoch: int, world: int, rank: int,
                task_bytes: int) -> list[list[tuple]]:
    """Worker `rank`'s read tasks of `epoch`: each a list of (file, row group, first, stop, first row's index)."""
    rows = np.array([g[2] for g in groups])
    order = np.random.default_rng([seed, epoch]).permutation(len(groups))
    ends = np.cumsum(rows[order])
    start, stop = part(int(ends[-1]), world, rank)
    per_row = stored_bytes / max(int(ends[-1]), 1)
    count = max(1, min(stop - start, math.ceil((stop - start) * per_row / task_bytes)))
    cuts = [start + (stop - start) * k // count for k in range(count + 1)]
    tasks = []
    for lo, hi in zip(cuts, cuts[1:]):
        pieces = []
        for j in range(int(np.searchsorted(ends, lo, side="right")), len(order)):
            group_start = int(ends[j] - rows[order[j]])
            if group_start >= hi:
                break
            path, index, _, first = groups[order[j]]
            a, b = max(lo, group_start) - group_start, min(hi, int(ends[j])) - group_start
            pieces.append((path, index, a, b, first))
        if pieces:
            tasks.append(pieces)
    return tasks


def read_task(batch: dict, *, groups: list[Group], stored_bytes: int, seed: int, world: int, rank: int,
              task_bytes: int, decode: str, augment: dict, block_bytes: int = BLOCK_BYTES) -> Iterator[dict]:
    """Ray Data map_batches, one read task a call: its row pieces read, shuffled, decoded and augmented.

    Each output holds a little over `block_bytes` of patches (of JPEG bytes with --decode gpu), so that Ray Data
    emits it as one block of one piece (it emits a block once it holds more than its target size). Blocks of
    many small outputs were copied into one array again on the worker: 11% of its time, measured with py-spy.
    """
    transform = train_draws if decode == "gpu" else train_batch
    total = sum(g[2] for g in groups)
    per_row = stored_bytes / max(total, 1) if decode == "gpu" else 3 * augment["crop"] ** 2
    step = block_bytes // max(int(per_row), 1) + 1
    for epoch, task in zip(batch["epoch"].tolist(), batch["task"].tolist()):
        pieces = epoch_tasks(groups, stored_bytes, seed, epoch, world, rank, task_bytes)[task]
        rng = np.random.default_rng([seed, epoch, rank, task])
        tables, ids = [], []
        for path, index, a, b, first in pieces:
            tables.append(pq.ParquetFile(path).read_row_group(index, columns=["image", "label"]).slice(a, b - a))
            ids.append(np.arange(first + a, first + b))
        table = pa.concat_tables(tables)
        order = rng.permutation(table.num_rows)
        stored = table.column("image")
        images = (stored.to_numpy(zero_copy_only=False) if decode == "gpu" else jpeg_views(stored))[order]
        labels = table.column("label").to_numpy()[order]
        rows = np.concatenate(ids)[order]
        for s in range(0, len(order), step):
            out = transform({"image": images[s:s + step], "label": labels[s:s + step]}, rng=rng, **augment)
            yield out | {"row": rows[s:s + step], "epoch": np.full(len(out["label"]), epoch, np.int32)}


def jpeg_views(column: pa.ChunkedArray) -> np.ndarray:
    """A binary column's values as uint8 views of its Arrow buffers, no copy: what the CPU decoder reads. Its
    `to_numpy` makes a bytes object of each, in fresh memory: 7% of a read task's time (py-spy, here)."""
    views = []
    for chunk in column.chunks:
        width = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
        offsets = np.frombuffer(chunk.buffers()[1], width)[chunk.offset:chunk.offset + len(chunk) + 1].tolist()
        data = np.frombuffer(chunk.buffers()[2] or b"", np.uint8)
        views += [data[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    out = np.empty(len(views), object)
    out[:] = views
    return out


def worker_dataset(groups: list[Group], stored_bytes: int, epochs: range, *, seed: int, world: int, rank: int,
                   task_bytes: int, decode: str, augment: dict, cpus: float | None = None,
                   object_store_bytes: float | None = None) -> ray.data.Dataset:
    """All of one worker's epochs in `epochs` as one Ray Data pipeline, one read task after another.

    The task list grows one epoch at a time, so planning costs the same for 1 epoch or 90, and tasks are launched
    in order: epoch e + 1's first tasks take the CPUs that epoch e's last ones leave. `cpus` caps this worker's
    tasks, so that no worker's reading ahead holds the CPUs another worker's current epoch needs.
    """
    from ray.data import ExecutionResources

    count = len(epoch_tasks(groups, stored_bytes, seed, epochs[0], world, rank, task_bytes))
    items = [{"epoch": e, "task": k} for e in epochs for k in range(count)]
    ds = (ray.data.from_items(items, override_num_blocks=len(epochs))
          .repartition(target_num_rows_per_block=1)  # one read task per row, made as the stream reaches it
          .map_batches(read_task, batch_size=1, batch_format="numpy",
                       fn_kwargs=dict(groups=groups, stored_bytes=stored_bytes, seed=seed, world=world, rank=rank,
                                      task_bytes=task_bytes, decode=decode, augment=augment)))
    ds.context.target_max_block_size = BLOCK_BYTES
    # Ray Data launches tasks only within these limits (its resource allocator stays on: without it every task of
    # every epoch was submitted at once, and Ray ran them in no particular order; the first batch came after 64 s).
    ds.context.execution_options.resource_limits = ExecutionResources(cpu=cpus, object_store_memory=object_store_bytes)
    # ...all of them for the read tasks: the task list's repartitioning runs no tasks, and a share reserved for it
    # left one of two CPUs idle (measured).
    ds.context.op_resource_reservation_ratio = 0.0
    # A task whose outputs wait to be read finishes anyway instead of pausing on its CPU: paused tasks held the CPUs
    # that validation, or another epoch's tasks, needed, and the run stopped.
    ds.context._max_num_blocks_in_streaming_gen_buffer = None
    return ds


def _rows(piece: dict) -> int:
    return len(piece["epoch"])


def _concat(pieces: list[dict]) -> dict:
    if len(pieces) == 1:
        return pieces[0]
    join = torch.cat if isinstance(pieces[0]["epoch"], torch.Tensor) else np.concatenate
    return {k: join([p[k] for p in pieces]) for k in pieces[0]}


class EpochStream:
    """A worker's training batches, epoch by epoch, cut from one stream of blocks that runs across epochs.

    Every epoch gives `steps` batches of `batch_size` rows but the last, which takes the rest of the worker's
    `rows` (see steps_per_epoch). Blocks of a later epoch that arrive early are kept for it. `finish` turns a cut
    batch into the model's input (the --decode gpu path decodes it there).
    """

    def __init__(self, blocks: Callable[[], Iterator[dict]], rows: int, steps: int, batch_size: int,
                 finish: Callable[[dict], dict] = lambda b: b):
        self.open_blocks, self._blocks = blocks, None
        self._sizes = [batch_size] * (steps - 1) + [rows - (steps - 1) * batch_size]
        self.finish = finish
        self._pending: dict[int, list[dict]] = {}

    def _pull(self, epoch: int) -> None:
        """One more block from the stream, its rows filed under their epochs."""
        if self._blocks is None:
            self._blocks = iter(self.open_blocks())
        block = next(self._blocks, None)
        if block is None:
            raise RuntimeError(f"epoch {epoch + 1}: the training input ended early: the shards changed while "
                               "training?")
        tags = block["epoch"]
        tags = tags.cpu().numpy() if isinstance(tags, torch.Tensor) else np.asarray(tags)
        if (tags == tags[0]).all():  # a read task's blocks hold one epoch
            self._pending.setdefault(int(tags[0]), []).append(block)
            return
        for e in np.unique(tags):
            keep = np.flatnonzero(tags == e)
            if isinstance(block["epoch"], torch.Tensor):
                keep = torch.from_numpy(keep).to(block["epoch"].device)
            self._pending.setdefault(int(e), []).append({k: v[keep] for k, v in block.items()})

    def _take(self, epoch: int, size: int) -> dict:
        pending = self._pending.setdefault(epoch, [])
        while sum(map(_rows, pending)) < size:
            self._pull(epoch)
        taken, need = [], size
        while need:
            head = pending[0]
            if _rows(head) <= need:
                taken.append(pending.pop(0))
                need -= _rows(head)
            else:
                taken.append({k: v[:need] for k, v in head.items()})
                pending[0] = {k: v[need:] for k, v in head.items()}
                need = 0
        return _concat(taken)

    def epoch(self, epoch: int) -> Iterator[dict]:
        for size in self._sizes:
            yield self.finish(self._take(epoch, size))
        extra = self._pending.pop(epoch, [])
        if extra:
            raise RuntimeError(f"epoch {epoch + 1}: the training input gave {sum(map(_rows, extra))} rows more than "
                               f"this worker's {sum(self._sizes)}")

    def close(self) -> None:
        close = getattr(self._blocks, "close", None)
        if close:
            close()


def train_plan(prepared, world: int) -> dict:
    """What each worker needs to build its epochs (driver side, one footer read per shard)."""
    groups, stored = row_groups(prepared.train_files)
    total = sum(g[2] for g in groups)
    if total < world:
        raise UsageError(f"--data {prepared.path} holds {total} training images, fewer than --num-workers {world}")
    return {"groups": groups, "stored_bytes": stored, "size": prepared.size,
            "eigenvalues": prepared.eigenvalues, "eigenvectors": prepared.eigenvectors}


def stream_per_worker(cfg: TrainConfig, plan: dict, rank: int, world: int, batch_size: int, device,
                      first_epoch: int) -> EpochStream:
    """This worker's training batches from `first_epoch` on, as tensors on `device` (decoded there with
    --decode gpu)."""
    groups, stored, size = plan["groups"], plan["stored_bytes"], plan["size"]
    total = sum(g[2] for g in groups)
    augment = dict(crop=cfg.image_size, eigenvalues=plan["eigenvalues"], eigenvectors=plan["eigenvectors"],
                   sigma=cfg.lighting_sigma if cfg.pca_lighting else 0.0, size=size)
    resources = ray.cluster_resources()
    # this worker's share of the CPUs that the training workers leave
    cpus = max(1.0, (resources.get("CPU", 1) - world * cfg.cpus_per_worker) / world)
    # Read ahead by about two rounds of read tasks (their output: patches, or the stored bytes with --decode gpu):
    # enough that no task waits for room, and a bounded lead (Ray Data's default budget held ~1.4 epochs of
    # 16,000 images here), within this worker's share of Ray Data's half of the object store.
    task_bytes = cfg.shuffle_mb << 20
    per_row = stored / total if cfg.decode == "gpu" else 3 * cfg.image_size ** 2
    ahead = (2 * math.ceil(cpus) + 2) * task_bytes * total / stored * per_row
    store = min(resources.get("object_store_memory", 0) * 0.5 / world, ahead) or None
    ds = worker_dataset(groups, stored, range(first_epoch, cfg.epochs), seed=cfg.seed, world=world, rank=rank,
                        task_bytes=task_bytes, decode=cfg.decode, augment=augment, cpus=cpus,
                        object_store_bytes=store)
    start, stop = part(total, world, rank)
    if cfg.decode == "gpu":
        return EpochStream(lambda: ds.iter_batches(batch_size=None, batch_format="numpy"), stop - start,
                           steps_per_epoch(total, world, batch_size), batch_size,
                           finish=lambda b: gpu_train_batch(b, size, cfg.image_size, device))
    return EpochStream(lambda: ds.iter_torch_batches(batch_size=None, device=device), stop - start,
                       steps_per_epoch(total, world, batch_size), batch_size,
                       finish=lambda b: b | {"image": patches_nchw(b["image"])})
