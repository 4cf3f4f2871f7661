"""The paper's Figure 4: validation images and the training images nearest to them in fc7 (Euclidean)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from alexnet.cluster import watched
from alexnet.config import EvalConfig
from alexnet.inference import MemberModel, actor_needs, actor_pool
from alexnet.members import Member
from alexnet.prepared import Prepared, load_mean_image


class NeighbourSearch:
    """Ray Data actor: fc7 features of training images' centre patches; per batch, each query's nearest k."""

    def __init__(self, member: Member, data: str, size: int, queries: np.ndarray, k: int, use_gpu: bool):
        self.net, self.k = MemberModel(member, load_mean_image(data), size, use_gpu), k
        self.queries = torch.as_tensor(queries, device=self.net.device)

    def __call__(self, batch: dict) -> dict:
        dist = torch.cdist(self.queries, self.net.fc7(batch["image"])).cpu().numpy()  # (Q, B)
        keep = np.argsort(dist, axis=1)[:, : self.k]
        rows = {"query": [], "distance": [], "path": [], "jpeg": []}
        for q, idx in enumerate(keep):
            for i in idx:
                rows["query"].append(q)
                rows["distance"].append(float(dist[q, i]))
                rows["path"].append(str(batch["path"][i]))
                rows["jpeg"].append(batch["jpeg"][i])
        return {k: np.asarray(v, dtype=object if k in ("path", "jpeg") else None) for k, v in rows.items()}


def _decode_keep_jpeg(batch: dict) -> dict:
    from alexnet.augment import eval_batch

    out = eval_batch(batch) | {"jpeg": np.asarray(batch["image"], dtype=object)}
    return {k: v[out["valid"]] for k, v in out.items()}  # a damaged image is nobody's neighbour


def figure4(member: Member, prepared: Prepared, cfg: EvalConfig, path: Path, k: int = 6) -> list[dict]:
    """`cfg.figure4` val images and the k training images nearest in fc7, as a PNG at `path` and as rows."""
    from alexnet.augment import decode_images
    from alexnet.datasets import read_shards
    from alexnet.visualize import neighbour_grid_png

    val = pq.read_table(prepared.val_files, columns=["path", "image", "label"]).sort_by("path")
    rng = np.random.default_rng(cfg.seed)
    picks = sorted(rng.choice(val.num_rows, min(cfg.figure4, val.num_rows), replace=False))
    chosen = val.take(picks)
    net = MemberModel(member, prepared.mean_image, prepared.size)
    images = decode_images(chosen["image"].to_pylist())
    queries = net.fc7(images).numpy()
    probs = net.probs(images, "center")  # the paper's left panel: the five most likely classes of each query
    names = prepared.class_names()
    ds = read_shards(prepared.train_files, ["image", "label", "path"])
    ds = ds.map_batches(_decode_keep_jpeg, batch_size=32, num_cpus=1)
    ds = ds.map_batches(NeighbourSearch, batch_size=cfg.batch_size,
                        fn_constructor_kwargs={"member": member, "data": str(prepared.path),
                                               "size": prepared.size, "queries": queries, "k": k,
                                               "use_gpu": cfg.gpus_per_actor > 0},
                        **actor_pool(cfg))
    best: list[list[tuple[float, str, bytes]]] = [[] for _ in picks]
    for batch in watched(ds.iter_batches(batch_size=None, batch_format="numpy"), cfg.resource_wait_s,
                         actor_needs(cfg), "the neighbour-search actors"):
        for q, d, p, jpeg in zip(batch["query"], batch["distance"], batch["path"], batch["jpeg"]):
            best[int(q)].append((float(d), str(p), bytes(jpeg)))
        best = [sorted(b)[:k] for b in best]
    labels = chosen["label"].to_pylist()
    top = [np.argsort(-p)[:5] for p in probs]
    rows = [{"query": str(chosen["path"][i]), "query_jpeg": chosen["image"][i].as_py(),
             "truth": names[labels[i]], "label": prepared.wnids[labels[i]],
             "top5": [(names[c], float(probs[i][c]), int(c) == labels[i]) for c in top[i]],
             "top5_wnids": [prepared.wnids[c] for c in top[i]],
             "neighbours": [{"path": p, "distance": d, "jpeg": j} for d, p, j in best[i]]}
            for i in range(len(picks))]
    neighbour_grid_png(rows, member.cfg.image_size, path)
    return [{"query": r["query"], "label": r["label"], "truth": r["truth"],
             "top5": [[w, n, round(p, 4)] for w, (n, p, _) in zip(r["top5_wnids"], r["top5"])],
             "neighbours": [(n["path"], round(n["distance"], 4)) for n in r["neighbours"]]} for r in rows]
