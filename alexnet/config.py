"""The jobs' frozen configs; their command lines are generated from the fields (`alexnet.configbase`).

One typed object per job: built once from CLI flags (over `--config file.yaml` defaults),
validated in `__post_init__`, logged as `to_dict()`, rebuilt elsewhere with `from_dict()`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from alexnet.configbase import (ConfigBase, address_field, experiment_field, field, load_yaml_mapping,  # noqa: F401
                                resource_wait_field, run_name_field, tracking_uri_field, verbose_field)
from alexnet.exits import INTERRUPTED_EXIT, Interrupted, UsageError  # noqa: F401 - the jobs import them from here
from alexnet.model import ModelConfig

Log = Callable[[str], None]  # where a job's console lines go (print, or a test's collector)


@dataclasses.dataclass(frozen=True)
class PreprocessConfig(ConfigBase):
    """`pipelines/preprocess.py`: an ImageNet tree to Parquet shards plus mean image and RGB PCA."""

    input: Path = field(help="ImageNet root holding train/<wnid>/ and optionally val/")
    output: Path = field(help="output folder for Parquet shards and statistics")
    size: int = field(256, help="shorter side is rescaled to this, then the central square is kept")
    quality: int = field(95, help="JPEG quality of the stored images")
    chroma: str = field("420", help="chroma subsampling of the stored JPEGs: 420 (the usual, smaller) or 444 "
                        "(for train.py --decode gpu: nvJPEG upsamples 4:2:0 chroma unlike the CPU path)",
                        choices=("420", "444"))
    shard_mb: float = field(256.0, help="target size of one Parquet shard in MiB")
    seed: int = field(0, help="seed of the row order written to the shards")
    limit: int | None = field(None, help="keep the first N files of each split (trial runs)")
    classes: int | None = field(None, help="keep the first K classes in sorted wnid order")
    val_labels: Path | None = field(None, help="LOC_val_solution.csv for a flat val/ (auto-detected)")
    strict: bool = field(False, help="exit non-zero after the report if any file was rejected")
    overwrite: bool = field(False, help="delete an existing output folder and start afresh")
    stats: bool = field(True, help="compute the mean image and the RGB PCA in the same pass")
    draft: bool = field(True, help="let large JPEGs decode at a reduced DCT scale (faster, same quality)")
    address: str | None = address_field()
    resource_wait_s: float = resource_wait_field()
    tracking_uri: str | None = tracking_uri_field()
    experiment: str = experiment_field("preprocessing")  # apart from the training runs' columns
    run_name: str | None = run_name_field("MLflow run name (default: preprocess OUTPUT-FOLDER-NAME)")
    verbose: bool = verbose_field()

    def __post_init__(self) -> None:
        if not 16 <= self.size <= 4096:
            raise UsageError(f"--size must be within 16..4096, got {self.size}")
        if not 1 <= self.quality <= 100:
            raise UsageError(f"--quality must be within 1..100, got {self.quality}")
        if not 0 < self.shard_mb <= 1024:
            raise UsageError(f"--shard-mb must be within (0, 1024], got {self.shard_mb}")
        for name in ("limit", "classes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name} must be at least 1, got {value}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig(ConfigBase, ModelConfig):
    """`pipelines/train.py`: the paper's training run on Ray Train, logged to MLflow (model options: ModelConfig)."""

    data: Path = field(help="a finished preprocessing output (pipelines/preprocess.py --output)")
    # resources
    num_workers: int = field(1, help="data-parallel Ray Train workers")
    gpus_per_worker: int = field(0, help="0: CPU; 1: both towers on one GPU; 2: one tower per GPU",
                                 choices=(0, 1, 2))
    cpus_per_worker: float = field(1.0, help="CPUs reserved by each training worker (decoding runs in Ray Data tasks)")
    # the paper's optimisation
    batch_size: int = field(128, help="global batch size, split evenly across workers")
    epochs: int = field(90, help="passes over the training set")
    lr: float = field(0.01, help="initial learning rate")
    momentum: float = field(0.9, help="momentum")
    weight_decay: float = field(0.0005, help="weight decay")
    optimizer: str = field("paper", help="paper: lr inside the velocity (section 5); torch: torch.optim.SGD",
                           choices=("paper", "torch"))
    lr_patience: int = field(5, help="epochs without a better val/top1_err before the learning rate is divided by 10")
    max_lr_drops: int = field(3, help="at most this many divisions by 10 (the paper made 3)")
    seed: int = field(0, help="seed of the initial weights, the dropout masks, the order of the training images "
                     "and their crops, flips and lighting")
    seeds: int = field(1, help="train this many members alike, seeds --seed, --seed+1, ...: one ensemble group "
                       "(runs NAME-seedS, tag ensemble_group=NAME)")
    init_from: str | None = field(None, help="start from these weights (fine-tuning): an MLflow run id of a training "
                                  "run or a checkpoint folder/state.pt; the output layer is replaced when the "
                                  "class count differs")
    # augmentation and input
    pca_lighting: bool = field(True, help="the paper's PCA colour augmentation")
    lighting_sigma: float = field(0.1, help="std of the PCA lighting coefficients")
    pixel_scale: float = field(1.0, help="inputs are (pixels - mean image) x this; the paper used raw 0-255 (1.0)")
    eval_10crop_every: int = field(10, help="also report val/top1_err_10crop every N epochs (0: last epoch only)")
    shuffle_mb: int = field(64, help="MiB of stored JPEGs per read task: each task shuffles the rows of its row "
                            "groups, which come in a new seeded order every epoch")
    decode: str = field("cpu", help="cpu: Ray Data's CPU tasks decode and crop; gpu: they only read the JPEG bytes, "
                        "each worker decodes and crops its batch on its GPU", choices=("cpu", "gpu"))
    input_only: bool = field(False, help="measure the input alone: every batch reaches the worker's device as the "
                             "model would get it, then is dropped (no model, no checkpoint); logs images_per_s")
    input_until: str = field("model", help="with --input-only: model: each batch made into the model's float input "
                             "on the worker's device; crops: the uint8 crops on the worker's device, before the "
                             "device-side mean subtraction and lighting (on a CPU-only machine: what its cores could "
                             "feed a GPU worker, which does that part on the GPU)", choices=("model", "crops"))
    # speed-ups (not in the paper)
    amp: bool = field(False, help="bfloat16 autocast for the forward pass")
    channels_last: bool = field(False, help="NHWC memory format")
    compile: bool = field(False, help="torch.compile the training step's module (measured 1.5-2x on an H200)")
    # bookkeeping
    experiment: str = experiment_field()
    run_name: str | None = run_name_field("name of the run; rerunning with the same name resumes it")
    tracking_uri: str | None = tracking_uri_field()
    storage_path: str | None = field(None, help="where Ray Train keeps checkpoints: a shared folder or s3:// on "
                                     "multi-node clusters (default: ./ray_results)")
    register_model: str | None = field(None, help="register the run's model (its best checkpoint) in the MLflow "
                                       "Model Registry under this name: a new version per run (per member with "
                                       "--seeds)")
    keep_checkpoints: int = field(3, help="checkpoints kept besides the latest (the best by val/top1_err)")
    max_failures: int = field(3, help="worker-group restarts from the last checkpoint before the run fails")
    address: str | None = address_field()
    check_resources: bool = field(True, help="fail at once when the cluster cannot hold the workers, and when "
                                  "it does not grant them within --resource-wait-s (--no-check-resources on "
                                  "autoscaling clusters: wait for new nodes without a limit)")
    resource_wait_s: float = resource_wait_field()
    verbose: bool = verbose_field()

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ValueError as err:  # ModelConfig's own checks
            raise UsageError(str(err)) from err
        checks = [
            (self.num_workers >= 1, f"--num-workers must be at least 1, got {self.num_workers}"),
            (self.cpus_per_worker > 0 or (self.cpus_per_worker == 0 and self.gpus_per_worker > 0),
             "--cpus-per-worker must be > 0 (0 only with --gpus-per-worker: a worker must hold something)"),
            (self.batch_size >= self.num_workers and self.batch_size % self.num_workers == 0,
             f"--batch-size {self.batch_size} must be a multiple of --num-workers {self.num_workers}"),
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.lr > 0 and 0 <= self.momentum < 1 and self.weight_decay >= 0,
             "need --lr > 0, 0 <= --momentum < 1, --weight-decay >= 0"),
            (self.lr_patience >= 0 and self.max_lr_drops >= 0, "--lr-patience and --max-lr-drops must be >= 0"),
            (self.lighting_sigma >= 0 and self.pixel_scale > 0, "need --lighting-sigma >= 0 and --pixel-scale > 0"),
            (self.decode == "cpu" or self.gpus_per_worker > 0, "--decode gpu needs --gpus-per-worker 1 or 2"),
            (self.eval_10crop_every >= 0 and self.shuffle_mb >= 1 and self.keep_checkpoints >= 1
             and self.max_failures >= 0, "need --eval-10crop-every, --max-failures >= 0, --shuffle-mb "
             "and --keep-checkpoints >= 1"),
            (self.seeds >= 1, f"--seeds must be at least 1, got {self.seeds}"),
            (self.resource_wait_s > 0, f"--resource-wait-s must be > 0, got {self.resource_wait_s:g}"),
            (not (self.arch == "owt" and self.gpus_per_worker == 2),
             "--arch owt is a single column: it cannot split over --gpus-per-worker 2 (use --arch paper)"),
            (not (self.register_model and self.input_only), "--input-only trains no model to --register-model"),
            (self.input_only or self.input_until == "model", "--input-until measures the input: it needs --input-only"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepConfig(TrainConfig):
    """`pipelines/tune.py`: every training flag (the base of each trial) plus the sweep's own."""

    experiment: str = experiment_field("sweeps")  # apart from the training runs: trials and parents only
    num_samples: int = field(8, help="trials (with --search grid: repeats of the whole grid)")
    max_concurrent: int | None = field(None, help="trials at once (default: what the cluster can run at once)")
    scheduler: str = field("asha", help="asha: stop weak trials early; none: run every trial to the end",
                           choices=("asha", "none"))
    grace_period: int = field(1, help="ASHA: epochs every trial runs before it can be stopped")
    search: str = field("random", help="random: sample the space; grid: every combination of its grid lists",
                        choices=("random", "grid"))
    space: Path | None = field(None, help="YAML search space (default: lr, weight decay, dropout around the paper)")
    sweep_name: str | None = field(None, help="name of the sweep (storage folder and MLflow parent run)")
    resume: bool = field(False, help="continue the interrupted sweep --sweep-name without re-running finished trials")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_samples < 1 or self.grace_period < 1 or (self.max_concurrent is not None and self.max_concurrent < 1):
            raise UsageError("--num-samples, --grace-period and --max-concurrent must be at least 1")
        if self.resume and not self.sweep_name:
            raise UsageError("--resume needs the --sweep-name of the sweep to continue")
        if self.register_model:
            raise UsageError("a sweep's trials log no models: retrain the best trial with the command the sweep "
                             "prints, adding --register-model NAME")
        if self.seeds != 1:
            raise UsageError("--seeds trains an ensemble with pipelines/train.py; a sweep samples --seed "
                             "through its space instead")

    def train_config(self) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        return TrainConfig.from_dict({k: v for k, v in self.to_dict().items() if k in names})


@dataclasses.dataclass(frozen=True)
class EvalConfig(ConfigBase):
    """`pipelines/evaluate.py`: ensembles of trained members on the validation set, next to the paper's Table 2."""

    data: Path = field(help="the preprocessing output the members were trained on (its val split is evaluated)")
    runs: tuple[str, ...] = field((), help="members: MLflow run ids of finished pipelines/train.py runs")
    experiment: str | None = field(None, help="members: every finished training run of this MLflow experiment")
    filter: str | None = field(None, help="with --experiment: an MLflow filter string narrowing the runs, "
                               "e.g. \"tags.ensemble_group = 'five'\"")
    sizes: tuple[int, ...] = field((1, 5, 7), help="ensemble sizes to evaluate")
    crops: str = field("both", help="center: one centre patch; 10crop: the paper's 10 patches averaged; both",
                       choices=("center", "10crop", "both"))
    seed: int = field(0, help="seed of the member subsets (sizes below the member count) and of Figure 4's images")
    batch_size: int = field(64, help="images per inference batch")
    actors: int | None = field(None, help="inference actors, one model each (default: what the cluster holds)")
    gpus_per_actor: float = field(0.0, help="GPUs of each inference actor (0: CPU)")
    recompute: bool = field(False, help="run inference again even where a member's stored outputs exist")
    figure4: int = field(4, help="validation images of the Figure 4 grid (six nearest training images in fc7); 0: none")
    tracking_uri: str | None = tracking_uri_field()
    ensemble_experiment: str = field("ensembles", help="MLflow experiment of the evaluation runs")
    register_model: str | None = field(None, help="log the largest evaluated ensemble as one pyfunc model (image "
                                       "bytes in, top-5 out) and register it under this name in the Model Registry")
    run_name: str | None = run_name_field("name of the summary run (default: ensembles-TIMESTAMP)")
    address: str | None = address_field()
    resource_wait_s: float = resource_wait_field()
    verbose: bool = verbose_field()

    def __post_init__(self) -> None:
        if bool(self.runs) == bool(self.experiment):
            raise UsageError("name the members with exactly one of --runs ID ... or --experiment NAME")
        if self.filter and not self.experiment:
            raise UsageError("--filter narrows --experiment; with --runs, list the runs you want")
        if not self.sizes or min(self.sizes) < 1:
            raise UsageError(f"--sizes must be positive integers, got {list(self.sizes)}")
        if self.batch_size < 1 or self.figure4 < 0 or self.gpus_per_actor < 0 or (self.actors is not None and self.actors < 1):
            raise UsageError("need --batch-size >= 1, --figure4 >= 0, --gpus-per-actor >= 0, --actors >= 1")

    @property
    def modes(self) -> tuple[str, ...]:
        return ("center", "10crop") if self.crops == "both" else (self.crops,)
