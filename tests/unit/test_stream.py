"""How each worker's training epochs are cut (alexnet.stream), without Ray: the row split, the read tasks, and the
batches handed to the training loop across epoch boundaries."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
import torch

from alexnet.stream import EpochStream, epoch_tasks, part, steps_per_epoch

# 23 row groups of uneven sizes over 4 files: (file, index, rows, first row)
SIZES = [37, 5, 64, 64, 1, 12, 40, 40, 40, 3, 9, 70, 18, 18, 2, 33, 61, 7, 7, 50, 11, 26, 4]


def _groups(sizes=SIZES):
    groups, first = [], 0
    for k, rows in enumerate(sizes):
        groups.append((f"part-{k % 4}.parquet", k // 4, rows, first))
        first += rows
    return groups, first


def _rows(tasks) -> list[int]:
    return [i for pieces in tasks for _, _, a, b, first in pieces for i in range(first + a, first + b)]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_every_row_is_read_once_per_epoch_across_the_workers(world):
    groups, total = _groups()
    for epoch in range(3):
        seen = []
        for rank in range(world):
            rows = _rows(epoch_tasks(groups, total * 1000, seed=5, epoch=epoch, world=world, rank=rank,
                                     task_bytes=60_000))
            start, stop = part(total, world, rank)
            assert len(rows) == stop - start
            seen += rows
        assert Counter(seen) == Counter(range(total))  # none twice, none left out


def test_the_order_is_seeded_by_epoch_and_tasks_hold_about_task_bytes():
    groups, total = _groups()
    order = {e: _rows(epoch_tasks(groups, total * 1000, 5, e, 2, 0, 60_000)) for e in range(3)}
    assert order[0] != order[1] != order[2]
    assert order[1] == _rows(epoch_tasks(groups, total * 1000, 5, 1, 2, 0, 60_000))  # a resumed epoch: the same
    assert order[1] != _rows(epoch_tasks(groups, total * 1000, 6, 1, 2, 0, 60_000))  # another seed: another
    tasks = epoch_tasks(groups, total * 1000, 5, 0, 2, 0, 60_000)
    sizes = [sum(b - a for _, _, a, b, _ in pieces) for pieces in tasks]
    assert len(tasks) == 6 and max(sizes) - min(sizes) <= 1  # 311 rows x 1000 bytes in tasks of <= 60 kB


def test_a_part_ends_inside_a_row_group():
    groups, total = _groups([10, 10])
    first = epoch_tasks(groups, 20, 0, 0, 3, 0, 1 << 20)
    second = epoch_tasks(groups, 20, 0, 0, 3, 1, 1 << 20)
    assert [(a, b) for _, _, a, b, _ in first[0]] == [(0, 7)]
    assert [(a, b) for _, _, a, b, _ in second[0]] == [(7, 10), (0, 4)]


def _blocks(epochs: dict[int, list[int]], block: int, mixed: bool = False):
    """A worker's stream: each epoch's rows in blocks of `block` rows; `mixed` lets each epoch's last block arrive
    after the next epoch's first and puts the two in one block, as out-of-order read tasks would."""
    out = []
    for e, rows in epochs.items():
        out += [{"row": torch.tensor(rows[i:i + block]), "epoch": torch.full((len(rows[i:i + block]),), e)}
                for i in range(0, len(rows), block)]
    if mixed:
        for k in range(len(out) - 1, 0, -1):
            if out[k]["epoch"][0] != out[k - 1]["epoch"][0]:
                last, first = out[k - 1], out[k]
                out[k - 1] = {key: torch.cat([first[key], last[key]]) for key in first}
                del out[k]
    return out


@pytest.mark.parametrize("total,world,batch", [(200, 2, 32), (65, 2, 32), (64, 2, 32), (129, 2, 64), (7, 3, 2),
                                               (100, 1, 100), (101, 1, 100), (5, 5, 8)])
@pytest.mark.parametrize("mixed", [False, True])
def test_every_worker_takes_the_same_steps_and_no_row_is_dropped(total, world, batch, mixed):
    steps = steps_per_epoch(total, world, batch)
    for rank in range(world):
        start, stop = part(total, world, rank)
        epochs = {e: list(np.random.default_rng(e).permutation(np.arange(start, stop))) for e in range(3)}
        stream = EpochStream(lambda: iter(_blocks(epochs, 7, mixed)), stop - start, steps, batch)
        for e in range(3):
            got = list(stream.epoch(e))
            sizes = [len(b["row"]) for b in got]
            assert len(sizes) == steps and all(s == batch for s in sizes[:-1]) and 1 <= sizes[-1] <= batch + 1
            assert all((b["epoch"] == e).all() for b in got)  # no row of another epoch crosses the boundary
            assert torch.cat([b["row"] for b in got]).tolist() == epochs[e] or mixed
            assert sorted(torch.cat([b["row"] for b in got]).tolist()) == sorted(epochs[e])
        stream.close()


def test_a_stream_that_ends_early_or_gives_too_much_is_named():
    short = EpochStream(lambda: iter(_blocks({0: list(range(10))}, 4)), rows=12, steps=2, batch_size=6)
    with pytest.raises(RuntimeError, match="epoch 1: the training input ended early"):
        list(short.epoch(0))
    long = EpochStream(lambda: iter(_blocks({0: list(range(14))}, 14)), rows=12, steps=2, batch_size=6)
    with pytest.raises(RuntimeError, match="gave 2 rows more than this worker's 12"):
        list(long.epoch(0))


def test_the_stream_is_started_once_and_read_across_epochs():
    starts = []

    def blocks():
        starts.append(1)
        return iter(_blocks({0: list(range(10)), 1: list(range(10, 20))}, 10))

    stream = EpochStream(blocks, rows=10, steps=2, batch_size=5, finish=lambda b: b | {"finished": True})
    assert [b["row"].tolist() for b in stream.epoch(0)] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert all(b["finished"] for b in stream.epoch(1)) and starts == [1]


@pytest.mark.parametrize("decode", ["cpu", pytest.param("gpu", id="jpeg-bytes")])  # runs without a GPU
def test_a_read_task_gives_each_of_its_rows_once_in_block_sized_outputs(tmp_path, decode):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from alexnet.augment import decode_hwc
    from alexnet.imaging import encode_jpeg
    from alexnet.stream import read_task, row_groups

    size, crop, rng = 20, 16, np.random.default_rng(0)
    files = []
    for k, rows in enumerate((13, 8)):  # two shards, row groups of 5 rows
        jpegs = [encode_jpeg(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), 95) for _ in range(rows)]
        files.append(str(tmp_path / f"train-{k}.parquet"))
        pq.write_table(pa.table({"image": jpegs, "label": list(range(k * 100, k * 100 + rows))}), files[-1],
                       row_group_size=5)
    groups, stored = row_groups(files)
    table = pa.concat_tables([pq.read_table(f) for f in files])
    per_row = stored / table.num_rows if decode == "gpu" else 3 * crop ** 2
    block = int(4 * per_row)  # 5 rows an output: the first count over the block
    augment = dict(crop=crop, eigenvalues=np.ones(3), eigenvectors=np.eye(3), sigma=0.1, size=size)
    kwargs = dict(groups=groups, stored_bytes=stored, seed=1, world=1, rank=0, task_bytes=stored, decode=decode,
                  augment=augment, block_bytes=block)
    outs = list(read_task({"epoch": np.array([2]), "task": np.array([0])}, **kwargs))
    assert [len(o["row"]) for o in outs] == [5, 5, 5, 5, 1]  # each output but the last: just over one block
    rows = np.concatenate([o["row"] for o in outs])
    assert sorted(rows.tolist()) == list(range(21)) and rows.tolist() != list(range(21))  # all, once, shuffled
    for o in outs:
        assert (o["epoch"] == 2).all()
        np.testing.assert_array_equal(o["label"], [table["label"][int(r)].as_py() for r in o["row"]])
        if decode == "gpu":  # the stored bytes, untouched
            assert list(o["jpeg"]) == [table["image"][int(r)].as_py() for r in o["row"]]
            continue
        for i, r in enumerate(o["row"]):
            y, x = o["offset"][i]
            patch = decode_hwc(table["image"][int(r)].as_py())[y:y + crop, x:x + crop]
            np.testing.assert_array_equal(o["image"][i], patch[:, ::-1] if o["flip"][i] else patch)


@pytest.mark.parametrize("kind", [pa.binary(), pa.large_binary()], ids=["binary", "large_binary"])
def test_jpeg_views_are_each_stored_value_in_order_from_sliced_chunks(kind):
    from alexnet.stream import jpeg_views

    values = [bytes([i]) * (i % 7) for i in range(40)]  # empty values too
    chunks = [pa.array(values[:25], kind).slice(3, 20), pa.array(values[25:], kind), pa.array([], kind)]
    views = jpeg_views(pa.chunked_array(chunks, kind))
    assert [bytes(v) for v in views] == values[3:23] + values[25:]
    assert all(v.dtype == np.uint8 and v.ndim == 1 for v in views)
