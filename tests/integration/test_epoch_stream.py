"""Each worker's training epochs on real Ray Data over real shards (alexnet.stream): every stored image once per
epoch across the workers, each patch cut from its own stored image, and a resumed run reading what an unbroken
one reads."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from alexnet.augment import decode_hwc
from alexnet.config import TrainConfig
from alexnet.prepared import read_prepared
from alexnet.stream import stream_per_worker, train_plan

pytestmark = pytest.mark.integration
CROP, EPOCHS, WORLD, PER_WORKER = 64, 3, 2, 12


def _epochs(cfg, plan, rank, first_epoch) -> dict[int, list[dict]]:
    stream = stream_per_worker(cfg, plan, rank, WORLD, PER_WORKER, torch.device("cpu"), first_epoch=first_epoch)
    try:
        return {e: list(stream.epoch(e)) for e in range(first_epoch, EPOCHS)}
    finally:
        stream.close()


def _patches(batches) -> dict[int, tuple]:
    """row -> (offset, flip, light, patch) of one worker's epoch."""
    return {int(r): (tuple(b["offset"][i].tolist()), bool(b["flip"][i]), tuple(b["light"][i].tolist()),
                     b["image"][i].numpy())
            for b in batches for i, r in enumerate(b["row"])}


def test_every_image_once_per_epoch_each_patch_from_its_image_and_a_resume_reads_the_same(prepared, ray_cluster):
    prep = read_prepared(prepared[0])
    cfg = TrainConfig(data=prepared[0], image_size=CROP, epochs=EPOCHS, batch_size=WORLD * PER_WORKER,
                      num_workers=WORLD, seed=3)
    plan = train_plan(prep, WORLD)
    # the training set in file order: the row ids index it
    table = pa.concat_tables([pq.read_table(f, columns=["image", "label"]) for f in prep.train_files])
    total = table.num_rows
    assert total > WORLD * PER_WORKER  # several steps per epoch
    runs = {rank: _epochs(cfg, plan, rank, 0) for rank in range(WORLD)}

    orders = []
    for epoch in range(EPOCHS):
        rows = [int(r) for rank in range(WORLD) for b in runs[rank][epoch] for r in b["row"]]
        assert Counter(rows) == Counter(range(total))  # none twice, none dropped, at every epoch
        assert len({len(runs[rank][epoch]) for rank in range(WORLD)}) == 1  # DDP: the same steps on every worker
        orders.append(rows)
        for rank in range(WORLD):
            for b in runs[rank][epoch]:
                for i, row in enumerate(b["row"].tolist()):
                    assert int(b["label"][i]) == table["label"][row].as_py()
                    image = decode_hwc(table["image"][row].as_py())
                    y, x = b["offset"][i].tolist()
                    patch = image[y:y + CROP, x:x + CROP]
                    patch = patch[:, ::-1] if b["flip"][i] else patch
                    assert np.array_equal(b["image"][i].numpy(), patch.transpose(2, 0, 1))
    assert orders[0] != orders[1] != orders[2]  # a new order every epoch

    resumed = _epochs(cfg, plan, 1, first_epoch=1)  # worker 1 restarted at epoch 2 (after a lost node)
    for epoch in (1, 2):
        again, before = _patches(resumed[epoch]), _patches(runs[1][epoch])
        assert again.keys() == before.keys()
        for row, (offset, flip, light, patch) in before.items():
            assert again[row][:3] == (offset, flip, light) and np.array_equal(again[row][3], patch)
