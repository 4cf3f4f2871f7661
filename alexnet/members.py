"""Ensemble members: finished `pipelines/train.py` runs, checked against the data and each other."""

from __future__ import annotations

import dataclasses

from alexnet.checkpoints import checkpoint_location, read_state
from alexnet.config import EvalConfig, TrainConfig, UsageError
from alexnet.prepared import Prepared, classes_digest
from alexnet.tracking import Runs


@dataclasses.dataclass(frozen=True)
class Member:
    run_id: str
    name: str
    checkpoint: str
    cfg: TrainConfig
    num_classes: int
    pretrained: bool  # fine-tuned from other weights (--init-from), as the paper's starred members


def member_from_run(run, prepared: Prepared) -> Member:
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


def find_members(cfg: EvalConfig, runs: Runs, prepared: Prepared) -> list[Member]:
    """The members named by --runs or --experiment/--filter, checked against the data and each other."""
    if cfg.runs:
        found = [runs.get(run_id) for run_id in cfg.runs]
    else:
        query = "attributes.status = 'FINISHED' and tags.stage = 'train'"
        if cfg.filter:
            query += f" and {cfg.filter}"
        found = runs.search(runs.existing_experiment_id(cfg.experiment), query, order_by=["attributes.start_time ASC"])
        found = [r for r in found if r.data.tags.get("best_checkpoint")]
        if not found:
            raise UsageError(f"no finished training run in experiment {cfg.experiment!r}"
                             + (f" matches {cfg.filter!r}" if cfg.filter else ""))
    members = [member_from_run(run, prepared) for run in found]
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
