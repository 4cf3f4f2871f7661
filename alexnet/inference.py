"""Each member's softmax over the validation set, by Ray Data batch inference on an actor pool
(one model per actor), stored once as a Parquet artifact of the member's run and reused after."""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from alexnet.cluster import watched
from alexnet.config import EvalConfig, Log, UsageError
from alexnet.members import Member
from alexnet.prepared import Prepared, load_mean_image
from alexnet.tracking import Runs


class MemberModel:
    """One member's network on one device; whole stored (N, 3, S, S) uint8 images in."""

    def __init__(self, member: Member, mean_image: np.ndarray, size: int, use_gpu: bool = False):
        from alexnet.augment import Normalizer
        from alexnet.checkpoints import model_from_state, read_state

        self.cfg = member.cfg
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = model_from_state(read_state(member.checkpoint), member.num_classes, self.device)
        self.normalizer = Normalizer(mean_image, self.device, self.cfg.pixel_scale)
        self.size = size

    def probs(self, images: np.ndarray, mode: str) -> np.ndarray:
        """Softmax averaged over the test views of `mode` ('center' or '10crop'): (N, C) float32."""
        from alexnet.loop import view_probs

        x = torch.from_numpy(np.require(images, requirements="W"))
        return view_probs(self.model, x, self.normalizer, self.cfg, self.size, mode, self.device).cpu().numpy()

    @torch.no_grad()
    def fc7(self, images: np.ndarray) -> torch.Tensor:
        """The last hidden layer's activations of the centre patch: (N, F) float32 on the model's device."""
        from alexnet.loop import view_batch

        x, = view_batch(self.normalizer, torch.from_numpy(np.require(images, requirements="W")), self.size,
                        self.cfg.image_size, "center")
        return self.model.fc7_features(x).float()


class MemberPredictor:
    """Ray Data actor: softmax per test-view mode for each batch of decoded validation images."""

    def __init__(self, member: Member, data: str, size: int, modes: tuple[str, ...], use_gpu: bool):
        self.net, self.modes = MemberModel(member, load_mean_image(data), size, use_gpu), modes

    def __call__(self, batch: dict) -> dict:
        return {"path": batch["path"], "label": batch["label"], "valid": batch["valid"]} | {
            f"probs_{mode}": self.net.probs(batch["image"], mode) for mode in self.modes}


def actor_pool(cfg: EvalConfig) -> dict:
    """map_batches arguments of the inference actors: how many, and what each holds."""
    import ray

    if cfg.gpus_per_actor > 0:
        gpus = ray.cluster_resources().get("GPU", 0.0)
        if gpus < cfg.gpus_per_actor:
            raise UsageError(f"--gpus-per-actor {cfg.gpus_per_actor:g} but the cluster has {gpus:g} GPU(s)")
        actors = cfg.actors or max(1, int(gpus // cfg.gpus_per_actor))
        return {"concurrency": actors, "num_gpus": cfg.gpus_per_actor, "num_cpus": actor_needs(cfg)["CPU"]}
    cpus = ray.cluster_resources().get("CPU", 1.0)
    # leave a CPU for the decoding tasks
    return {"concurrency": cfg.actors or max(1, int(cpus) - 1), "num_cpus": actor_needs(cfg)["CPU"]}


def actor_needs(cfg: EvalConfig) -> dict[str, float]:
    return {"CPU": 1.0, "GPU": cfg.gpus_per_actor}


def infer_member(member: Member, prepared: Prepared, modes: tuple[str, ...], cfg: EvalConfig,
                 log: Log = print) -> dict[str, pa.Table]:
    """Ray Data batch inference of one member over the val split: {mode: table(path, label, probs)}, sorted by path."""
    from alexnet.datasets import decoded_images

    ds = decoded_images(prepared.val_files, prepared.size, ["image", "label", "path"], num_cpus=1).map_batches(
        MemberPredictor, batch_size=cfg.batch_size,
        fn_constructor_kwargs={"member": member, "data": str(prepared.path), "size": prepared.size,
                               "modes": modes, "use_gpu": cfg.gpus_per_actor > 0}, **actor_pool(cfg))
    parts: dict[str, list] = {"path": [], "label": []} | {m: [] for m in modes}
    damaged: list[str] = []
    for batch in watched(ds.iter_batches(batch_size=None, batch_format="numpy"), cfg.resource_wait_s,
                         actor_needs(cfg), "the inference actors"):
        ok = batch["valid"]
        damaged += batch["path"][~ok].astype(str).tolist()
        parts["path"].append(batch["path"][ok].astype(str))
        parts["label"].append(batch["label"][ok])
        for m in modes:
            parts[m].append(batch[f"probs_{m}"][ok].astype(np.float32))
    if damaged:
        log(f"WARNING: {len(damaged)} stored validation image(s) do not decode and are left out of the "
            f"evaluation: {', '.join(sorted(damaged)[:10])}{' ...' if len(damaged) > 10 else ''}")
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


def output_folder(prepared: Prepared, member: Member) -> str:
    """Where a member's stored outputs for this validation set and these weights live among its run's artifacts.

    Keyed by the checkpoint's location too (Ray Train never rewrites a checkpoint folder): a member extended
    since (more epochs, a new best checkpoint) is inferred again instead of reusing outputs of old weights."""
    weights = hashlib.sha1(str(member.checkpoint).encode()).hexdigest()[:8]
    return f"eval/{prepared.val_fingerprint()}-{weights}"


def member_outputs(members: list[Member], prepared: Prepared, cfg: EvalConfig, runs: Runs,
                   log: Log) -> dict[str, dict[str, pa.Table]]:
    """{run id: {mode: output table}}: downloaded where stored, else inferred once and stored."""
    outputs: dict[str, dict[str, pa.Table]] = {}
    for i, m in enumerate(members, 1):
        folder = output_folder(prepared, m)
        stored = runs.artifact_names(m.run_id, folder)
        have = {}
        for mode in cfg.modes:
            if not cfg.recompute and f"softmax-{mode}.parquet" in stored:
                with runs.downloaded(m.run_id, f"{folder}/softmax-{mode}.parquet") as path:
                    have[mode] = pq.read_table(path)
        missing = tuple(mode for mode in cfg.modes if mode not in have)
        if missing:
            start = time.perf_counter()
            log(f"  member {i}/{len(members)} {m.name}: inference ({', '.join(missing)})")
            fresh = infer_member(m, prepared, missing, cfg, log)
            with tempfile.TemporaryDirectory() as tmp:
                for mode, table in fresh.items():
                    pq.write_table(table, Path(tmp) / f"softmax-{mode}.parquet", compression="zstd")
                runs.log_artifacts(m.run_id, tmp, artifact_path=folder)
            log(f"  member {i}/{len(members)} {m.name}: {len(next(iter(fresh.values()))):,} images in "
                f"{time.perf_counter() - start:.1f}s, stored under {folder}/")
            have |= fresh
        else:
            log(f"  member {i}/{len(members)} {m.name}: stored outputs reused ({folder}/)")
        outputs[m.run_id] = have
    _check_aligned(outputs, prepared)
    return outputs


def _check_aligned(outputs: dict[str, dict[str, pa.Table]], prepared: Prepared) -> None:
    reference = None
    for run_id, tables in outputs.items():
        for mode, table in tables.items():
            if table.num_rows > prepared.val_rows:  # fewer: damaged images left out, with a warning
                raise RuntimeError(f"member {run_id} {mode}: {table.num_rows} outputs for {prepared.val_rows} val images")
            if reference is None:
                reference = table.select(["path", "label"])
            elif not table.select(["path", "label"]).equals(reference):
                raise RuntimeError(f"member {run_id} {mode}: outputs are not aligned with the other members'")
