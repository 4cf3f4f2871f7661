"""Ensembles of trained members on the validation set: the paper's Table 2, Figure 4, in MLflow.

1. Members are finished `pipelines/train.py` runs (MLflow run ids, or an experiment + filter);
   they must share the data's class list and one image size.
2. Each member's softmax over the validation set (centre patch and/or the paper's 10 patches)
   is computed once, by Ray Data batch inference on an actor pool (one model per actor), and
   stored as a Parquet artifact of that member's run; later evaluations download it instead.
3. An ensemble averages its members' softmax outputs (the paper's rule). Size 1 reports the
   mean, std and best over the members; a size below the member count uses a seeded subset.
4. MLflow: a summary run in the `ensembles` experiment (Markdown/HTML table next to Table 2,
   bar chart, Figure 4) with one nested run per (size, crops).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from alexnet.config import EvalConfig, TrainConfig, UsageError
from alexnet.train import Prepared, classes_digest, read_prepared, read_shards, read_state

Log = Callable[[str], None]

# Table 2 of the paper, ILSVRC-2012 validation error in % (10 patches averaged); * = pre-trained with a
# sixth conv layer on ImageNet Fall 2011, then fine-tuned.
PAPER_TABLE2 = {1: ("1 CNN", 40.7, 18.2), 5: ("5 CNNs", 38.1, 16.4), 7: ("7 CNNs*", 36.7, 15.4)}
PAPER_STARRED_SINGLE = ("1 CNN*", 39.0, 16.6)
TOP_K = 5


@dataclasses.dataclass(frozen=True)
class Member:
    run_id: str
    name: str
    checkpoint: str
    cfg: TrainConfig
    num_classes: int
    pretrained: bool  # fine-tuned from other weights (--init-from), as the paper's starred members


# ---------------------------------------------------------------- members


def _member_from_run(run, prepared: Prepared) -> Member:
    from alexnet.train import checkpoint_location

    tags, params = run.data.tags, run.data.params
    name = tags.get("mlflow.runName", run.info.run_id)
    if tags.get("stage") != "train":
        raise UsageError(f"MLflow run {run.info.run_id} ({name}) is not a pipelines/train.py run")
    if run.info.status != "FINISHED":
        raise UsageError(f"MLflow run {run.info.run_id} ({name}) is {run.info.status}, not FINISHED")
    checkpoint = checkpoint_location(run)
    state = read_state(checkpoint)  # weights only; an unreadable checkpoint is a UsageError naming it
    num_classes = int(params.get("num_classes", -1))
    digest = tags.get("data.classes")
    if num_classes != prepared.num_classes or (digest and digest != classes_digest(prepared.wnids)):
        raise UsageError(f"member {name} ({run.info.run_id}) was trained on another class list "
                         f"({num_classes} classes) than {prepared.path} ({prepared.num_classes})")
    return Member(run.info.run_id, name, checkpoint, TrainConfig.from_dict(state["config"]), num_classes,
                  bool(tags.get("init_from_checkpoint")))


def find_members(cfg: EvalConfig, uri: str, prepared: Prepared) -> list[Member]:
    """The members named by --runs or --experiment/--filter, checked against the data and each other."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    if cfg.runs:
        runs = []
        for run_id in cfg.runs:
            try:
                runs.append(client.get_run(run_id))
            except MlflowException as err:
                raise UsageError(f"MLflow run {run_id} not found in {uri}") from err
    else:
        experiment = client.get_experiment_by_name(cfg.experiment)
        if experiment is None:
            raise UsageError(f"MLflow experiment {cfg.experiment!r} not found in {uri}")
        query = "attributes.status = 'FINISHED' and tags.stage = 'train'"
        if cfg.filter:
            query += f" and {cfg.filter}"
        try:
            runs = client.search_runs([experiment.experiment_id], filter_string=query, order_by=["attributes.start_time ASC"],
                                      max_results=10_000)
        except MlflowException as err:
            raise UsageError(f"--filter {cfg.filter!r}: {err.message}") from err
        runs = [r for r in runs if r.data.tags.get("best_checkpoint")]
        if not runs:
            raise UsageError(f"no finished training run in experiment {cfg.experiment!r}"
                             + (f" matches {cfg.filter!r}" if cfg.filter else ""))
    members = [_member_from_run(run, prepared) for run in runs]
    if len({m.run_id for m in members}) != len(members):
        raise UsageError("a run is listed twice in --runs")
    sizes = {m.cfg.image_size for m in members}
    if len(sizes) > 1:
        raise UsageError("members differ in image size: " + ", ".join(f"{m.name}={m.cfg.image_size}" for m in members))
    if max(sizes) > prepared.size:
        raise UsageError(f"members take {max(sizes)} px crops but {prepared.path} stores {prepared.size} px images")
    too_big = [k for k in cfg.sizes if k > len(members)]
    if too_big:
        raise UsageError(f"--sizes {' '.join(map(str, too_big))} need more members than the {len(members)} found "
                         f"(train more with pipelines/train.py --seeds K, or use --sizes up to {len(members)})")
    return members


# ---------------------------------------------------------------- per-member outputs


def val_fingerprint(prepared: Prepared) -> str:
    """Names the validation set a stored output belongs to (shard names and sizes, preprocessing run)."""
    h = hashlib.sha1(str(prepared.summary.get("mlflow_run_id")).encode())
    for f in sorted(prepared.val_files):
        h.update(f"{Path(f).name}:{Path(f).stat().st_size}".encode())
    return h.hexdigest()[:12]


def _artifact_dir(prepared: Prepared) -> str:
    return f"eval/{val_fingerprint(prepared)}"


class MemberPredictor:
    """Ray Data actor: one member's model; whole stored images in, softmax per test-view mode out."""

    def __init__(self, checkpoint: str, num_classes: int, mean_image: np.ndarray, size: int,
                 modes: tuple[str, ...], use_gpu: bool):
        from alexnet.augment import Normalizer
        from alexnet.model import build_model

        state = read_state(checkpoint)
        self.cfg = TrainConfig.from_dict(state["config"])
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = build_model(num_classes=num_classes, devices=[self.device], **self.cfg.model_options())
        self.model.load_state_dict(state["model"])
        self.model.eval()
        self.normalizer = Normalizer(mean_image, self.device, self.cfg.pixel_scale)
        self.size, self.modes = size, modes

    def __call__(self, batch: dict) -> dict:
        from alexnet.train import view_probs

        out = {"path": batch["path"], "label": batch["label"]}
        images = torch.from_numpy(np.require(batch["image"], requirements="W"))
        with torch.no_grad():
            for mode in self.modes:
                probs = view_probs(self.model, images, self.normalizer, self.cfg, self.size, mode, self.device)
                out[f"probs_{mode}"] = probs.cpu().numpy()
        return out


def _actor_pool(cfg: EvalConfig) -> dict:
    """map_batches arguments of the inference actors: how many, and what each holds."""
    import ray

    if cfg.gpus_per_actor > 0:
        gpus = ray.cluster_resources().get("GPU", 0.0)
        if gpus < cfg.gpus_per_actor:
            raise UsageError(f"--gpus-per-actor {cfg.gpus_per_actor:g} but the cluster has {gpus:g} GPU(s)")
        actors = cfg.actors or max(1, int(gpus // cfg.gpus_per_actor))
        return {"concurrency": actors, "num_gpus": cfg.gpus_per_actor, "num_cpus": 1}
    cpus = ray.cluster_resources().get("CPU", 1.0)
    # leave a CPU for the decoding tasks
    return {"concurrency": cfg.actors or max(1, int(cpus) - 1), "num_cpus": 1}


def _val_dataset(prepared: Prepared):
    import ray

    from alexnet.augment import eval_batch

    ds = read_shards(prepared.val_files, ["image", "label", "path"])
    return ds.map_batches(eval_batch, batch_size=32, num_cpus=1)


def infer_member(member: Member, prepared: Prepared, modes: tuple[str, ...], cfg: EvalConfig) -> dict[str, pa.Table]:
    """Ray Data batch inference of one member over the val split: {mode: table(path, label, probs)}, sorted by path."""
    pool = _actor_pool(cfg)
    ds = _val_dataset(prepared).map_batches(
        MemberPredictor, batch_size=cfg.batch_size,
        fn_constructor_kwargs={"checkpoint": member.checkpoint, "num_classes": member.num_classes,
                               "mean_image": prepared.mean_image, "size": prepared.size, "modes": modes,
                               "use_gpu": cfg.gpus_per_actor > 0}, **pool)
    parts: dict[str, list] = {"path": [], "label": []} | {m: [] for m in modes}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        parts["path"].append(batch["path"].astype(str))
        parts["label"].append(batch["label"])
        for m in modes:
            parts[m].append(batch[f"probs_{m}"].astype(np.float32))
    if not parts["path"]:
        raise UsageError(f"{prepared.path} has no validation images")
    paths = np.concatenate(parts["path"])
    order = np.argsort(paths, kind="stable")
    labels = np.concatenate(parts["label"])[order]
    return {m: output_table(paths[order], labels, np.concatenate(parts[m])[order]) for m in modes}


def output_table(paths: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> pa.Table:
    flat = pa.array(probs.reshape(-1).astype(np.float32), pa.float32())
    return pa.table({"path": pa.array(paths, pa.string()), "label": pa.array(labels, pa.int32()),
                     "probs": pa.FixedSizeListArray.from_arrays(flat, probs.shape[1])})


def table_arrays(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(paths, labels, probs (N, C) float32) of a stored member output."""
    probs = table["probs"].combine_chunks()
    n, c = len(probs), probs.type.list_size
    return (np.asarray(table["path"].to_pylist()), table["label"].to_numpy(),
            probs.flatten().to_numpy().reshape(n, c))


def member_outputs(members: list[Member], prepared: Prepared, cfg: EvalConfig, uri: str,
                   log: Log) -> dict[str, dict[str, pa.Table]]:
    """{run id: {mode: output table}}: downloaded where stored, else inferred once and stored."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    folder = _artifact_dir(prepared)
    outputs: dict[str, dict[str, pa.Table]] = {}
    for i, m in enumerate(members, 1):
        stored = {Path(a.path).name for a in client.list_artifacts(m.run_id, folder)}
        have = {} if cfg.recompute else {
            mode: _download_table(client, m.run_id, f"{folder}/softmax-{mode}.parquet")
            for mode in cfg.modes if f"softmax-{mode}.parquet" in stored}
        missing = tuple(mode for mode in cfg.modes if mode not in have)
        if missing:
            start = time.perf_counter()
            log(f"  member {i}/{len(members)} {m.name}: inference ({', '.join(missing)})")
            fresh = infer_member(m, prepared, missing, cfg)
            with tempfile.TemporaryDirectory() as tmp:
                for mode, table in fresh.items():
                    path = Path(tmp) / f"softmax-{mode}.parquet"
                    pq.write_table(table, path, compression="zstd")
                    client.log_artifact(m.run_id, str(path), artifact_path=folder)
            log(f"  member {i}/{len(members)} {m.name}: {len(next(iter(fresh.values()))):,} images in "
                f"{time.perf_counter() - start:.1f}s, stored under {folder}/")
            have |= fresh
        else:
            log(f"  member {i}/{len(members)} {m.name}: stored outputs reused ({folder}/)")
        outputs[m.run_id] = have
    _check_aligned(outputs, prepared)
    return outputs


def _download_table(client, run_id: str, artifact: str) -> pa.Table:
    with tempfile.TemporaryDirectory() as tmp:
        return pq.read_table(client.download_artifacts(run_id, artifact, tmp))


def _check_aligned(outputs: dict[str, dict[str, pa.Table]], prepared: Prepared) -> None:
    expected = prepared.summary["rows_written"].get("val", 0)
    reference = None
    for run_id, tables in outputs.items():
        for mode, table in tables.items():
            if table.num_rows != expected:
                raise RuntimeError(f"member {run_id} {mode}: {table.num_rows} outputs for {expected} val images")
            if reference is None:
                reference = table.select(["path", "label"])
            elif not table.select(["path", "label"]).equals(reference):
                raise RuntimeError(f"member {run_id} {mode}: outputs are not aligned with the other members'")


# ---------------------------------------------------------------- ensembles


def topk_errors(probs: np.ndarray, labels: np.ndarray, k: int = TOP_K) -> tuple[float, float]:
    """(top-1 error, top-k error) of class scores (N, C) against labels (N,)."""
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    hits = top == labels[:, None]
    return float(1 - hits[:, 0].mean()), float(1 - hits.any(1).mean())


def choose_members(run_ids: list[str], size: int, seed: int) -> list[str]:
    """All members, or a seeded subset of `size` of them (the same for every crop mode)."""
    if size >= len(run_ids):
        return list(run_ids)
    pick = np.random.default_rng([seed, size]).choice(len(run_ids), size, replace=False)
    return [run_ids[i] for i in sorted(pick)]


def ensemble_rows(probs: dict[str, dict[str, np.ndarray]], labels: np.ndarray, sizes: tuple[int, ...],
                  modes: tuple[str, ...], seed: int) -> list[dict]:
    """One row per (size, mode): the averaged-softmax errors (size 1: mean, std and best over members)."""
    run_ids = list(probs)
    rows = []
    for size in sizes:
        for mode in modes:
            chosen = choose_members(run_ids, size, seed)
            row = {"size": size, "crops": mode, "members": chosen,
                   "selection": "all" if size == len(run_ids) else (
                       "each member alone" if size == 1 else f"seeded subset (seed {seed})")}
            if size == 1:
                each = np.array([topk_errors(probs[r][mode], labels) for r in run_ids])
                best = int(np.argmin(each[:, 0]))
                row |= {"members": run_ids, "top1": float(each[:, 0].mean()), "top5": float(each[:, 1].mean()),
                        "top1_std": float(each[:, 0].std()), "top5_std": float(each[:, 1].std()),
                        "top1_best": float(each[best, 0]), "top5_best": float(each[best, 1]),
                        "best_member": run_ids[best]}
            else:
                mean = np.mean([probs[r][mode] for r in chosen], axis=0)
                row["top1"], row["top5"] = topk_errors(mean, labels)
            rows.append(row)
    return rows


def markdown_table(rows: list[dict], members: list[Member]) -> str:
    names = {m.run_id: m.name for m in members}
    starred = any(m.pretrained for m in members)
    lines = ["| ensemble | crops | top-1 val err (%) | top-5 val err (%) | members | paper (Table 2) | "
             "paper top-1 | paper top-5 |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        label = f"{r['size']} CNN{'s' if r['size'] > 1 else ''}{'*' if starred else ''}"
        if r["size"] == 1:
            top1 = f"{100 * r['top1']:.2f} ± {100 * r['top1_std']:.2f} (best {100 * r['top1_best']:.2f})"
            top5 = f"{100 * r['top5']:.2f} ± {100 * r['top5_std']:.2f} (best {100 * r['top5_best']:.2f})"
            who = f"each of {len(r['members'])}, mean ± std"
        else:
            top1, top5 = f"{100 * r['top1']:.2f}", f"{100 * r['top5']:.2f}"
            who = ", ".join(names[i] for i in r["members"])
        paper = PAPER_STARRED_SINGLE if (starred and r["size"] == 1) else PAPER_TABLE2.get(r["size"])
        ref = (paper[0], f"{paper[1]:.1f}", f"{paper[2]:.1f}") if paper else ("—", "—", "—")
        lines.append(f"| {label} | {r['crops']} | {top1} | {top5} | {who} | {' | '.join(ref)} |")
    lines.append("")
    lines.append("Paper: ILSVRC-2012 validation, 1000 classes, 10 patches averaged; * = pre-trained on ImageNet "
                 "Fall 2011 with a sixth conv layer, then fine-tuned. Ours: the validation split of the data named "
                 "in the run's tags; the same rule (members' softmax outputs averaged).")
    return "\n".join(lines)


def html_table(markdown: str) -> str:
    import html

    rows = [line.strip("|").split("|") for line in markdown.splitlines() if line.startswith("|")]
    head, body = rows[0], rows[2:]
    cells = "".join(f"<th>{html.escape(c.strip())}</th>" for c in head)
    out = [f"<table border='1' cellpadding='4'><tr>{cells}</tr>"]
    for row in body:
        out.append("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in row) + "</tr>")
    note = [line for line in markdown.splitlines() if line and not line.startswith("|")]
    return "".join(out) + "</table>" + "".join(f"<p>{html.escape(n)}</p>" for n in note)


def bar_chart_png(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(rows) + 2), 4))
    x = np.arange(len(rows))
    ax.bar(x - 0.3, [100 * r["top1"] for r in rows], 0.2, label="top-1 (ours)",
           yerr=[100 * r.get("top1_std", 0) for r in rows])
    ax.bar(x - 0.1, [100 * r["top5"] for r in rows], 0.2, label="top-5 (ours)",
           yerr=[100 * r.get("top5_std", 0) for r in rows])
    paper = [PAPER_TABLE2.get(r["size"]) for r in rows]
    ax.bar(x + 0.1, [p[1] if p else 0 for p in paper], 0.2, label="top-1 (paper)", hatch="//", alpha=0.5)
    ax.bar(x + 0.3, [p[2] if p else 0 for p in paper], 0.2, label="top-5 (paper)", hatch="//", alpha=0.5)
    ax.set_xticks(x, [f"{r['size']} CNN{'s' * (r['size'] > 1)}\n{r['crops']}" for r in rows])
    ax.set_ylabel("validation error (%)")
    ax.set_title("Ensembles vs the paper's Table 2")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- Figure 4


class NeighbourSearch:
    """Ray Data actor: fc7 features of training images' centre patches; per batch, each query's nearest six."""

    def __init__(self, checkpoint: str, num_classes: int, mean_image: np.ndarray, size: int,
                 queries: np.ndarray, k: int, use_gpu: bool):
        predictor = MemberPredictor(checkpoint, num_classes, mean_image, size, ("center",), use_gpu)
        self.p, self.k = predictor, k
        self.queries = torch.as_tensor(queries, device=predictor.device)

    def __call__(self, batch: dict) -> dict:
        from alexnet.augment import eval_views

        p = self.p
        (top, left, flip), = eval_views(p.size, p.cfg.image_size, "center")
        with torch.no_grad():
            x = p.normalizer.view(torch.from_numpy(np.require(batch["image"], requirements="W")), top, left, flip, p.cfg.image_size)
            dist = torch.cdist(self.queries, p.model.fc7_features(x).float()).cpu().numpy()  # (Q, B)
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

    return eval_batch(batch) | {"jpeg": batch["image"]}


def figure4(member: Member, prepared: Prepared, cfg: EvalConfig, path: Path, k: int = 6) -> list[dict]:
    """The paper's Figure 4: `cfg.figure4` val images and the k training images nearest in fc7 (Euclidean)."""
    import ray

    from alexnet.augment import decode_images, eval_views
    from alexnet.visualize import neighbour_grid_png

    val = pq.read_table(prepared.val_files, columns=["path", "image"]).sort_by("path")
    rng = np.random.default_rng(cfg.seed)
    picks = sorted(rng.choice(val.num_rows, min(cfg.figure4, val.num_rows), replace=False))
    chosen = val.take(picks)
    images = decode_images(chosen["image"].to_pylist())
    p = MemberPredictor(member.checkpoint, member.num_classes, prepared.mean_image, prepared.size, ("center",), False)
    (top, left, flip), = eval_views(p.size, p.cfg.image_size, "center")
    with torch.no_grad():
        queries = p.model.fc7_features(p.normalizer.view(torch.from_numpy(images), top, left,
                                                         flip, p.cfg.image_size)).float().numpy()
    ds = read_shards(prepared.train_files, ["image", "label", "path"])
    ds = ds.map_batches(_decode_keep_jpeg, batch_size=32, num_cpus=1)
    ds = ds.map_batches(NeighbourSearch, batch_size=cfg.batch_size,
                        fn_constructor_kwargs={"checkpoint": member.checkpoint, "num_classes": member.num_classes,
                                               "mean_image": prepared.mean_image, "size": prepared.size,
                                               "queries": queries, "k": k, "use_gpu": cfg.gpus_per_actor > 0},
                        **_actor_pool(cfg))
    best: list[list[tuple[float, str, bytes]]] = [[] for _ in picks]
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for q, d, p_, jpeg in zip(batch["query"], batch["distance"], batch["path"], batch["jpeg"]):
            best[int(q)].append((float(d), str(p_), bytes(jpeg)))
        best = [sorted(b)[:k] for b in best]
    rows = [{"query": str(chosen["path"][i]), "query_jpeg": chosen["image"][i].as_py(),
             "neighbours": [{"path": p_, "distance": d, "jpeg": j} for d, p_, j in best[i]]}
            for i in range(len(picks))]
    neighbour_grid_png(rows, p.cfg.image_size, path)
    return [{"query": r["query"], "neighbours": [(n["path"], round(n["distance"], 4)) for n in r["neighbours"]]}
            for r in rows]


# ---------------------------------------------------------------- the job


def run_evaluation(cfg: EvalConfig, log: Log = print) -> dict:
    """Members -> stored per-member outputs -> ensembles -> MLflow runs; raises UsageError before any inference."""
    import mlflow

    from alexnet.cluster import connect_ray
    from alexnet.tracking import absolute_uri, check_tracking_uri, resolve_tracking_uri

    prepared = read_prepared(cfg.data)
    if not prepared.val_files or not prepared.summary["rows_written"].get("val"):
        raise UsageError(f"{prepared.path} has no validation images to evaluate on")
    uri = absolute_uri(resolve_tracking_uri(cfg.tracking_uri))
    check_tracking_uri(uri)
    members = find_members(cfg, uri, prepared)
    log(f"{len(members)} member(s): " + ", ".join(f"{m.name} ({m.run_id[:8]})" for m in members))
    connect_ray(cfg.address, min_cpus=2)

    outputs = member_outputs(members, prepared, cfg, uri, log)
    first = next(iter(outputs.values()))
    _, labels, _ = table_arrays(next(iter(first.values())))
    probs = {run_id: {mode: table_arrays(t)[2] for mode, t in tables.items()} for run_id, tables in outputs.items()}
    rows = ensemble_rows(probs, labels, cfg.sizes, cfg.modes, cfg.seed)
    table = markdown_table(rows, members)

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(cfg.ensemble_experiment)
    name = cfg.run_name or time.strftime("ensembles-%Y%m%d-%H%M%S")
    common = {"data.path": str(prepared.path), "data.val_fingerprint": val_fingerprint(prepared),
              "data.classes": classes_digest(prepared.wnids), "seed": str(cfg.seed)}
    by_id = {m.run_id: m for m in members}
    with mlflow.start_run(run_name=name, tags=common | {"stage": "evaluate", "members": ",".join(by_id)}) as parent:
        mlflow.log_params({k: " ".join(map(str, v)) if isinstance(v, list) else v
                           for k, v in cfg.to_dict().items() if v not in (None, [])})
        mlflow.log_metrics({"members": len(members), "val/images": len(labels)})
        for r in rows:
            run_name = f"{r['size']}cnn-{r['crops']}"
            tags = common | {"ensemble_size": str(r["size"]), "crops": r["crops"], "members": ",".join(r["members"]),
                             "member_names": ",".join(by_id[i].name for i in r["members"]),
                             "selection": r["selection"]}
            with mlflow.start_run(run_name=run_name, nested=True, tags=tags) as child:
                metrics = {"val/top1_err": r["top1"], "val/top5_err": r["top5"]}
                metrics |= {f"val/{k}_err_{s}": r[f"{k}_{s}"] for k in ("top1", "top5") for s in ("std", "best")
                            if f"{k}_{s}" in r}
                mlflow.log_metrics(metrics)
                r["mlflow_run_id"] = child.info.run_id
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            (tmp / "ensembles.md").write_text(table + "\n")
            (tmp / "ensembles.html").write_text(html_table(table))
            (tmp / "ensembles.json").write_text(json.dumps(rows, indent=1))
            bar_chart_png(rows, tmp / "ensembles.png")
            neighbours = None
            if cfg.figure4:
                best = min(members, key=lambda m: topk_errors(probs[m.run_id][cfg.modes[0]], labels)[0])
                log(f"Figure 4: nearest training images in fc7 of {best.name}")
                neighbours = figure4(best, prepared, cfg, tmp / "figure4_neighbours.png")
                (tmp / "figure4_neighbours.json").write_text(json.dumps(neighbours, indent=1))
                mlflow.set_tag("figure4_member", best.run_id)
            mlflow.log_artifacts(str(tmp), artifact_path="evaluate")
    return {"mlflow_run_id": parent.info.run_id, "rows": rows, "table": table, "members": [m.run_id for m in members],
            "figure4": neighbours}
