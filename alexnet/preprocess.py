"""ImageNet (a tree, the ILSVRC2012 archives or the HF Parquet) -> Parquet shards + mean image + RGB PCA, on Ray
Data, resumable.

1. List every class folder, per-class tar or Parquet file in parallel (one Ray Data task per batch of them).
2. Plan: a seeded shuffle of each split, cut into shards by a byte budget; the plan is saved,
   so a restarted job rebuilds exactly the same shards.
3. One Ray Data task per unfinished shard decodes, resizes, re-encodes, accumulates the
   pixel moments, and commits its Parquet file by an atomic rename (the commit marker).
4. The driver reduces the moments and writes the statistics, rejects and summary.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import alexnet
from alexnet.cluster import connect_ray, watched
from alexnet.config import Log, PreprocessConfig, UsageError
from alexnet.datasets import one_stage
from alexnet.imagenet import INPUT_KINDS, ImageReader, Layout, classes_all_rejected, detect_layout, list_files
from alexnet.imaging import BadImage, decode_rgb, encode_jpeg, resize_center_crop
from alexnet.prepared import (CLASSES, MEAN_IMAGE, MEAN_IMAGE_PNG, PCA, REJECTS, ROW_GROUP_BYTES, SHARD_SCHEMA,
                              SPLITS, SUMMARY, WORK_DIR, atomic_write, check_claimable, classes_text, output_lock,
                              prepare_output, rejects_text, save_npy, shard_manifest, shard_name)
from alexnet.stats import PixelMoments


# ---------------------------------------------------------------- planning


def _fingerprint(cfg: PreprocessConfig, files: dict[str, pa.Table]) -> str:
    h = hashlib.sha256()
    keys = ("size", "quality", "shard_mb", "seed", "limit", "classes", "stats", "draft") + (
        ("chroma",) if cfg.chroma != "420" else ())  # outputs made before --chroma keep their fingerprint
    h.update(json.dumps({k: getattr(cfg, k) for k in keys}, sort_keys=True).encode())
    h.update(str(Path(cfg.input).resolve()).encode())
    for split in SPLITS:
        t = files[split]
        where = ([""] * t.num_rows if not pc.any(pc.not_equal(t["source"], "")).as_py() else
                 [f"\0{s}\0{a}\0{b}" for s, a, b in zip(*(t[c].to_pylist() for c in ("source", "start", "length")))])
        for path, label, at in zip(t["path"].to_pylist(), t["label"].to_pylist(), where):
            h.update(f"{split}\0{path}\0{label}{at}\n".encode())
    return h.hexdigest()


def _estimate_bytes_per_image(root: Path, train: pa.Table, cfg: PreprocessConfig) -> float:
    """Mean stored JPEG size over a seeded sample, to turn --shard-mb into rows per shard."""
    rng, reader = np.random.default_rng(cfg.seed), ImageReader(root)
    sizes = []
    for i in rng.permutation(train.num_rows)[:16]:
        row = {k: v[0] for k, v in train.slice(int(i), 1).to_pydict().items()}
        try:
            data = reader.read(row["path"], row["source"], row["start"], row["length"])
            pixels = resize_center_crop(decode_rgb(data, cfg.size, cfg.draft), cfg.size)
            sizes.append(len(encode_jpeg(pixels, cfg.quality, cfg.chroma)))
        except (BadImage, OSError):
            continue
    return float(np.mean(sizes)) if sizes else 0.4 * cfg.size * cfg.size


def make_plan(cfg: PreprocessConfig, files: dict[str, pa.Table], cpus: int) -> dict:
    """Shards as lists of row indices into `files`, in a seeded shuffled order."""
    total = sum(t.num_rows for t in files.values())
    est = _estimate_bytes_per_image(Path(cfg.input), files["train"], cfg)
    rows_by_budget = max(1, int(cfg.shard_mb * (1 << 20) / est))
    # Enough shards to keep every CPU busy (and balanced) on small inputs; the byte budget rules on large ones.
    rows_per_shard = max(1, min(rows_by_budget, math.ceil(total / (2 * cpus))))
    shards = []
    for k, split in enumerate(SPLITS):
        order = shuffled_order(files[split], np.random.default_rng([cfg.seed, k]))
        if len(order) == 0:
            continue
        # Equal shards of at most rows_per_shard rows: no small tail shard.
        for i, rows in enumerate(np.array_split(order, math.ceil(len(order) / rows_per_shard))):
            shards.append({"split": split, "shard": i, "rows": rows.tolist()})
    return {"rows_per_shard": rows_per_shard, "bytes_per_image_estimate": est, "shards": shards}


def shuffled_order(files: pa.Table, rng: np.random.Generator) -> np.ndarray:
    """A random order of the rows in which each Parquet row group's rows stay together (a shard task then reads
    a row group once, not once per row); every other row is its own unit, and the order a plain permutation."""
    in_groups = pc.and_(pc.ends_with(files["source"], ".parquet"), pc.not_equal(files["source"], ""))
    if not pc.any(in_groups).as_py():
        return rng.permutation(files.num_rows)
    keys = pc.if_else(in_groups, pc.binary_join_element_wise(files["source"], pc.cast(files["start"], pa.string()),
                                                             "#"), files["path"])
    _, unit = np.unique(keys.to_numpy(zero_copy_only=False), return_inverse=True)
    rank = np.empty(unit.max() + 1, np.int64)
    rank[rng.permutation(len(rank))] = np.arange(len(rank))
    return np.lexsort((rng.random(files.num_rows), rank[unit]))


# ---------------------------------------------------------------- per-shard work


def process_shard_per_worker(row: dict, *, root: str, out: str, size: int, quality: int,
                             draft: bool, stats: bool, chroma: str = "420") -> dict:
    """Ray Data task: one shard's files -> one committed Parquet file + its moments and rejects.

    Rows stream into the file in row groups of ~ROW_GROUP_BYTES, so a task's memory does not
    grow with the shard size.
    """
    start = time.perf_counter()
    split, shard = str(row["split"]), int(row["shard"])
    reader = ImageReader(root)
    moments = PixelMoments.zeros(size) if stats and split == "train" else None
    final = Path(out) / shard_name(split, shard)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
    rows, image_bytes, rejects = 0, 0, []
    buffer: dict[str, list] = {name: [] for name in SHARD_SCHEMA.names}
    buffered = 0
    try:
        with pq.ParquetWriter(tmp, SHARD_SCHEMA, use_dictionary=["wnid"],
                              compression={"image": "none", "label": "zstd", "wnid": "zstd", "path": "zstd"}) as writer:
            for path, label, wnid, source, start, length in zip(row["paths"], row["labels"], row["wnids"],
                                                                row["sources"], row["starts"], row["lengths"]):
                try:
                    data = reader.read(str(path), str(source), int(start), int(length))
                    pixels = resize_center_crop(decode_rgb(data, size, draft), size)
                except (BadImage, OSError) as err:
                    rejects.append([str(path), f"{err}{reader.where(str(source), int(start), int(length))}"])
                    continue
                jpeg = encode_jpeg(pixels, quality, chroma)
                for name, value in zip(SHARD_SCHEMA.names, (jpeg, int(label), str(wnid), str(path))):
                    buffer[name].append(value)
                buffered += len(jpeg)
                if moments is not None:
                    moments.add(pixels)
                if buffered >= ROW_GROUP_BYTES:
                    rows, image_bytes = rows + len(buffer["path"]), image_bytes + buffered
                    writer.write_table(pa.table(buffer, schema=SHARD_SCHEMA), row_group_size=len(buffer["path"]))
                    buffer, buffered = {name: [] for name in SHARD_SCHEMA.names}, 0
            if buffer["path"] or rows == 0:
                rows, image_bytes = rows + len(buffer["path"]), image_bytes + buffered
                writer.write_table(pa.table(buffer, schema=SHARD_SCHEMA), row_group_size=max(1, len(buffer["path"])))
        work = Path(out) / WORK_DIR
        result = {"split": split, "shard": shard, "rows": rows, "bytes": image_bytes, "rejects": rejects,
                  "seconds": time.perf_counter() - start, "node": _node_id()}
        # Side files first, the Parquet rename last: a shard counts as done only once it is visible.
        if moments is not None:
            atomic_write(work / f"{split}-{shard:05d}.npz", moments.save)
        atomic_write(work / f"{split}-{shard:05d}.json", lambda p: p.write_text(json.dumps(result)))
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return {"split": split, "shard": shard, "rows": rows, "rejects": len(rejects), "seconds": result["seconds"]}


def _node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _shard_done(out: Path, split: str, shard: int) -> bool:
    return (out / shard_name(split, shard)).is_file() and (out / WORK_DIR / f"{split}-{shard:05d}.json").is_file()


# ---------------------------------------------------------------- the job


def run_preprocess(cfg: PreprocessConfig, log: Log = print) -> dict:
    """The whole job; returns the summary also written to OUT/summary.json."""
    from alexnet.tracking import check_tracking_uri, resolve_tracking_uri

    started = time.perf_counter()
    out = Path(cfg.output)
    layout = detect_layout(Path(cfg.input), out, cfg.val_labels)
    tracking_uri = resolve_tracking_uri(cfg.tracking_uri)
    check_tracking_uri(tracking_uri)
    check_claimable(out, cfg.overwrite)  # before a lock file lands in someone else's folder
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out, log):
        prepare_output(out, cfg.overwrite)
        return _run(cfg, layout, out, tracking_uri, started, log)


def _run(cfg: PreprocessConfig, layout: Layout, out: Path, tracking_uri: str, started: float, log: Log) -> dict:
    import ray

    connect_ray(cfg.address, log=log)
    phases = {"start": time.perf_counter() - started}
    files, listing_rejects, hidden = list_files(layout, cfg.classes, cfg.limit, cfg.resource_wait_s)
    phases["listing"] = time.perf_counter() - started - sum(phases.values())
    if files["train"].num_rows == 0:
        raise UsageError("no training files left after --classes/--limit")
    log(f"listed {sum(t.num_rows for t in files.values()):,} images in {len(layout.wnids)} classes from "
        f"{INPUT_KINDS[layout.kind]} (val: {layout.val or 'none'}) in {time.perf_counter() - started:.1f}s")

    fingerprint = _fingerprint(cfg, files)
    plan_path = out / WORK_DIR / "plan.json"
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text())
        if plan["fingerprint"] != fingerprint:
            raise UsageError(f"{out} holds an unfinished job with other arguments or input files; "
                             "rerun it with the same arguments, or pass --overwrite")
        log(f"resuming: {sum(_shard_done(out, s['split'], s['shard']) for s in plan['shards'])} "
            f"of {len(plan['shards'])} shards already written")
    else:
        plan = make_plan(cfg, files, max(1, int(ray.cluster_resources().get("CPU", 1))))
        plan["fingerprint"] = fingerprint
        atomic_write(plan_path, lambda p: p.write_text(json.dumps(plan)))

    phases["planning"] = time.perf_counter() - started - sum(phases.values())
    todo = [s for s in plan["shards"] if not _shard_done(out, s["split"], s["shard"])]
    items = []
    for s in todo:
        t = files[s["split"]].take(s["rows"])
        items.append({"split": s["split"], "shard": s["shard"], **{
            key: t[column].to_pylist() for key, column in (("paths", "path"), ("labels", "label"), ("wnids", "wnid"),
                                                          ("sources", "source"), ("starts", "start"),
                                                          ("lengths", "length"))}})
    _run_shards(items, cfg, out, log)
    phases["shards"] = time.perf_counter() - started - sum(phases.values())
    return _finish(cfg, layout, files, (listing_rejects, hidden), plan, out, tracking_uri, started, phases, log)


def _run_shards(items: list[dict], cfg: PreprocessConfig, out: Path, log: Log) -> None:
    import ray

    if not items:
        return
    total_files = sum(len(i["paths"]) for i in items)
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map(
        process_shard_per_worker,
        fn_kwargs={"root": str(Path(cfg.input).resolve()), "out": str(out.resolve()), "size": cfg.size,
                   "quality": cfg.quality, "draft": cfg.draft, "stats": cfg.stats, "chroma": cfg.chroma},
        num_cpus=1)
    ds = one_stage(ds)
    start, files_done, shards_done, last_log = time.perf_counter(), 0, 0, 0.0
    for result in watched(ds.iter_rows(), cfg.resource_wait_s, {"CPU": 1.0}, "the preprocessing tasks"):
        shards_done += 1
        files_done += result["rows"] + result["rejects"]
        now = time.perf_counter() - start
        if now - last_log >= 2.0 or shards_done == len(items):
            rate = files_done / max(now, 1e-9)
            eta = (total_files - files_done) / max(rate, 1e-9)
            log(f"  shards {shards_done}/{len(items)}  files {files_done:,}/{total_files:,}  "
                f"{rate:,.0f} img/s  eta {eta:,.0f}s")
            last_log = now


def _finish(cfg: PreprocessConfig, layout: Layout, files: dict[str, pa.Table], listing: tuple[list, int],
            plan: dict, out: Path, tracking_uri: str, started: float, phases: dict, log: Log) -> dict:
    from alexnet.tracking import Runs
    from alexnet.visualize import image_to_png

    listing_rejects, hidden = listing
    work = out / WORK_DIR
    rows = {s: 0 for s in SPLITS}
    rejects_by_split = {s: [] for s in SPLITS}
    shards_per_node: dict[str, int] = {}
    moments = PixelMoments.zeros(cfg.size) if cfg.stats else None
    rows_by_shard: dict[str, int] = {}
    for s in plan["shards"]:
        result = json.loads((work / f"{s['split']}-{s['shard']:05d}.json").read_text())
        rows[s["split"]] += result["rows"]
        rows_by_shard[shard_name(s["split"], s["shard"])] = result["rows"]
        node = result.get("node") or "unknown"
        shards_per_node[node] = shards_per_node.get(node, 0) + 1
        rejects_by_split[s["split"]] += [tuple(r) for r in result["rejects"]]
        if moments is not None and s["split"] == "train":
            moments.merge(PixelMoments.load(work / f"train-{s['shard']:05d}.npz"))
    for path, reason in listing_rejects:
        rejects_by_split["train" if path.startswith("train/") else "val"].append((path, reason))

    found = {s: files[s].num_rows + sum(1 for p, _ in listing_rejects if p.split("/")[0] == s) for s in SPLITS}
    for s in SPLITS:
        if found[s] != rows[s] + len(rejects_by_split[s]):
            raise RuntimeError(f"{s}: {found[s]} files found but {rows[s]} rows + "
                               f"{len(rejects_by_split[s])} rejects: shards are inconsistent")
    if rows["train"] == 0:
        raise RuntimeError("every training file was rejected; see the reasons above")
    lost = classes_all_rejected(files["train"], rejects_by_split["train"], layout.wnids)
    for wnid, n in lost.items():
        log(f"WARNING: class {wnid}: all {n} of its training files were rejected (see {REJECTS}); it has no "
            "training images")
    listed = set(files["train"]["wnid"].to_pylist())
    for wnid in (w for w in (layout.wnids[: cfg.classes] if cfg.classes else layout.wnids) if w not in listed):
        if not cfg.limit:  # --limit cuts classes off on purpose
            log(f"WARNING: class {wnid} has no training images in {cfg.input}; it stays in the class index")

    names = layout.names
    keep = layout.wnids[: cfg.classes] if cfg.classes else layout.wnids
    all_rejects = sorted(r for s in SPLITS for r in rejects_by_split[s])
    outputs = {CLASSES: classes_text(list(keep), names), REJECTS: rejects_text(all_rejects)}
    for name, text in outputs.items():
        atomic_write(out / name, lambda p, text=text: p.write_text(text))
    artifacts = [out / n for n in outputs]
    if moments is not None:
        mean = moments.mean_image()
        atomic_write(out / MEAN_IMAGE, lambda p: save_npy(p, mean))
        atomic_write(out / PCA, lambda p: p.write_text(json.dumps(moments.pca(), indent=1)))
        atomic_write(out / MEAN_IMAGE_PNG, lambda p: image_to_png(np.rint(mean).astype(np.uint8), p))
        artifacts += [out / MEAN_IMAGE, out / PCA, out / MEAN_IMAGE_PNG]

    phases["statistics"] = time.perf_counter() - started - sum(phases.values())
    seconds = time.perf_counter() - started
    written = rows["train"] + rows["val"]
    summary = {
        "version": alexnet.__version__,
        "config": cfg.to_dict(),
        "input_kind": layout.kind,  # tree, ilsvrc-archives or hf-parquet
        "val_layout": layout.val,
        "not_read": {"test": layout.source.test_rows} if layout.kind == "hf-parquet" else {},
        "files_found": found,
        "rows_written": rows,
        "rejects": {s: len(rejects_by_split[s]) for s in SPLITS},
        "shards": {s: sum(1 for x in plan["shards"] if x["split"] == s) for s in SPLITS},
        "hidden_skipped": hidden,  # entries named .* (e.g. .ipynb_checkpoints): never a class nor an image
        "rows_per_shard": plan["rows_per_shard"],
        "shard_files": shard_manifest(out, plan["shards"], rows_by_shard),
        "num_classes": len(keep),
        "shards_per_node": shards_per_node,  # Ray node id -> shards it wrote
        "seconds": round(seconds, 3),
        "images_per_s": round(written / seconds, 2),
        "phase_seconds": phases,
    }
    runs = Runs(tracking_uri)
    # named after its output, and timed from the job's start (the run is made once the job's work is done)
    run_id = runs.create(runs.experiment_id(cfg.experiment), cfg.run_name or f"preprocess {out.resolve().name}",
                         tags={"stage": "preprocess", "input_kind": layout.kind, "data.path": str(out.resolve())},
                         params=cfg.to_dict(), start_time=time.time() - (time.perf_counter() - started))
    metrics = {f"{k}/{s}": summary[k][s] for k in ("files_found", "rows_written", "rejects") for s in SPLITS}
    runs.log_metrics(run_id, metrics | {"seconds": seconds, "images_per_s": summary["images_per_s"]})
    runs.log_files(run_id, artifacts, artifact_path="preprocess")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / SUMMARY).write_text(json.dumps(summary, indent=1))
        runs.log_artifacts(run_id, tmp, artifact_path="preprocess")
    runs.finish(run_id)
    summary["mlflow_run_id"] = run_id
    phases["mlflow"] = time.perf_counter() - started - sum(phases.values())
    summary["phase_seconds"] = {k: round(v, 3) for k, v in phases.items()}
    atomic_write(out / SUMMARY, lambda p: p.write_text(json.dumps(summary, indent=1)))
    shutil.rmtree(work, ignore_errors=True)
    for r in all_rejects:
        log(f"  rejected {r[0]}: {r[1]}")
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"{'split':<6} {'files found':>12} {'rows written':>13} {'rejects':>8} {'shards':>7}"]
    for s in SPLITS:
        lines.append(f"{s:<6} {summary['files_found'][s]:>12,} {summary['rows_written'][s]:>13,} "
                     f"{summary['rejects'][s]:>8,} {summary['shards'][s]:>7}")
    lines.append(f"{summary['seconds']:.1f}s, {summary['images_per_s']:,.1f} images/s, "
                 f"{summary['num_classes']} classes, {len(summary.get('shards_per_node', {}))} node(s), MLflow run {summary.get('mlflow_run_id')}")
    lines.append(f"input: {INPUT_KINDS[summary.get('input_kind', 'tree')]}" + "".join(
        f"; {n:,} {split} rows not read (no labels)" for split, n in summary.get("not_read", {}).items()))
    lines.append("phases: " + ", ".join(f"{k} {v:.1f}s" for k, v in summary["phase_seconds"].items()))
    return "\n".join(lines)
