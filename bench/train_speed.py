"""Training benchmarks: prints ratios from one run on the same files.

P3  training-input throughput: Parquet -> augmented batches on Ray Data (our pipeline) vs
    torchvision ImageFolder + DataLoader(num_workers=2) over the raw JPEGs with the same
    augmentation (resize 256, random crop, flip, PCA lighting, mean subtraction).    target >= 3x
P4  images/s of pipelines/train.py (1 worker) vs a plain PyTorch loop: the same model, optimizer,
    training step and augmentation, reading the same Parquet shards through a torch DataLoader
    (2 worker processes), no Ray.                                                     target >= 0.9x
    Also printed: the compute-only ceiling (the same step on images decoded in memory beforehand,
    no data loading at all), which no loop that decodes its input on the same cores can reach.

    python bench/train_speed.py [--workdir /tmp/bench-2000]   (after bench/preprocess_speed.py)
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import psutil
import torch


def our_input(prepared, crop: int, epochs: int, normalize: bool = True) -> float:
    """Images/s of the training input: Ray Data decode + crop + flip + lighting, then the device-side step.

    Without `normalize`: the uint8 batches as a GPU worker receives them (its mean subtraction,
    lighting and float conversion run on the GPU).
    """
    from alexnet.augment import Normalizer
    from alexnet.config import TrainConfig
    from alexnet.stream import stream_per_worker, train_plan

    cfg = TrainConfig(data=prepared.path, image_size=crop, epochs=epochs + 1)
    stream = stream_per_worker(cfg, train_plan(prepared, 1), 0, 1, 128, torch.device("cpu"), first_epoch=0)
    norm = Normalizer(prepared.mean_image, torch.device("cpu"))
    start, n = time.perf_counter(), 0
    try:
        for epoch in range(epochs + 1):
            if epoch == 1:  # the first epoch warms the workers up; the input reads ahead across the later ones
                start, n = time.perf_counter(), 0
            for b in stream.epoch(epoch):
                if normalize:
                    norm(b["image"], b["offset"], b["flip"], b["light"])
                n += len(b["label"])
    finally:
        stream.close()
    return n / (time.perf_counter() - start)


def torchvision_input(raw: Path, prepared, crop: int, epochs: int) -> float:
    """The usual recipe: ImageFolder over the raw JPEGs, transforms in 2 DataLoader workers."""
    from torchvision import datasets, transforms

    eigvals = torch.tensor(prepared.eigenvalues, dtype=torch.float32)
    eigvecs = torch.tensor(prepared.eigenvectors, dtype=torch.float32)
    mean = torch.tensor(prepared.mean_image.mean((0, 1)) / 255.0, dtype=torch.float32)

    def lighting(x: torch.Tensor) -> torch.Tensor:
        alpha = torch.randn(3) * 0.1
        return x + (eigvecs @ (alpha * eigvals))[:, None, None]

    tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(256), transforms.RandomCrop(crop),
                             transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Lambda(lighting),
                             transforms.Normalize(mean.tolist(), [1.0, 1.0, 1.0])])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(raw / "train", tf), batch_size=128, shuffle=True,
                                         num_workers=2, persistent_workers=True)
    rates = []
    for _ in range(epochs + 1):
        start, n = time.perf_counter(), 0
        for x, _ in loader:
            n += len(x)
        rates.append(n / (time.perf_counter() - start))
    return max(rates[1:])


class _Rows(torch.utils.data.Dataset):
    """The training shards' rows for a torch DataLoader, augmented by the same function Ray Data runs."""

    def __init__(self, prepared, crop: int):
        import pyarrow.parquet as pq

        table = pq.read_table(prepared.train_files, columns=["image", "label"])
        self.jpegs, self.labels = table["image"].to_pylist(), table["label"].to_pylist()
        self.augment = dict(crop=crop, eigenvalues=prepared.eigenvalues, eigenvectors=prepared.eigenvectors,
                            sigma=0.1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        from alexnet.augment import train_batch

        out = train_batch({"image": [self.jpegs[i]], "label": [self.labels[i]]}, **self.augment)
        return {k: v[0] for k, v in out.items()}


def plain_loop(prepared, width: float, crop: int, epochs: int, batch: int) -> float:
    """Best per-epoch images/s of a plain PyTorch loop: DataLoader(num_workers=2) + train.py's own step."""
    from alexnet.augment import Normalizer, patches_nchw
    from alexnet.config import TrainConfig
    from alexnet.model import build_model
    from alexnet.optim import build_optimizer
    from alexnet.loop import train_epoch

    cfg = TrainConfig(data=prepared.path, width=width, image_size=crop, init="pytorch", batch_size=batch)
    loader = torch.utils.data.DataLoader(_Rows(prepared, crop), batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=2, persistent_workers=True)
    torch.manual_seed(0)
    model = build_model(cfg, prepared.num_classes)
    opt = build_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
    normalizer = Normalizer(prepared.mean_image, torch.device("cpu"))
    rates = []
    for _ in range(epochs):
        batches = (b | {"image": patches_nchw(b["image"])} for b in loader)  # as the stream gives them
        t = train_epoch(model, opt, batches, normalizer, cfg, torch.device("cpu"))
        rates.append(t["n"] / t["seconds"])
    return max(rates[1:])


def compute_ceiling(prepared, width: float, crop: int, steps: int, batch: int) -> float:
    """Images/s of the bare step: the same model and optimizer, images already decoded in memory."""
    import pyarrow.parquet as pq

    from alexnet.augment import decode_images
    from alexnet.model import ModelConfig, build_model
    from alexnet.optim import build_optimizer

    table = pq.read_table(prepared.train_files, columns=["image", "label"])
    images = torch.from_numpy(decode_images(table["image"].to_pylist()[:batch * 8]))
    labels = torch.tensor(table["label"].to_pylist()[:batch * 8])
    mean = torch.from_numpy(prepared.mean_image).permute(2, 0, 1)
    torch.manual_seed(0)
    model = build_model(ModelConfig(width=width, image_size=crop, init="pytorch"), prepared.num_classes)
    opt = build_optimizer("paper", model.parameters(), 0.01, 0.9, 5e-4)
    size = images.shape[-1]
    times = []
    for step in range(steps + 2):
        i = (step % 8) * batch
        y0, x0 = np.random.randint(0, size - crop + 1, 2)
        x = images[i:i + batch].float() - mean
        x = x[:, :, y0:y0 + crop, x0:x0 + crop]
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), labels[i:i + batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return batch / float(np.median(times[2:]))


def train_py(prepared, width: float, crop: int, epochs: int, batch: int, work: Path) -> float:
    """Best per-epoch images/s that pipelines/train.py's library reports (training steps, data waits included)."""
    from mlflow import MlflowClient

    from alexnet.config import TrainConfig
    from alexnet.train import run_training

    uri = f"sqlite:///{work / 'mlflow-train.db'}"
    # the worker gets every core, as the plain loop's torch threads do (Ray sets a worker's threads to its CPUs)
    cfg = TrainConfig(data=prepared.path, num_workers=1, cpus_per_worker=float(os.cpu_count() or 1), width=width, image_size=crop, init="pytorch",
                      batch_size=batch, epochs=epochs, tracking_uri=uri, storage_path=str(work / "ckpt"),
                      run_name=f"bench-{int(time.time())}", eval_10crop_every=0)
    run_id = run_training(cfg, log=lambda _: None)["mlflow_run_id"]
    return max(m.value for m in MlflowClient(uri).get_metric_history(run_id, "images_per_s")[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("bench/out"),
                        help="bench/preprocess_speed.py's workdir (raw tree imagenet-N and its output out-stats)")
    parser.add_argument("--p3-images", type=int, default=8000,
                        help="P3 set: imagenet-N raw tree and its output (out-stats for N, out-4n for 4N)")
    parser.add_argument("--p4-images", type=int, default=2000)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--width", type=float, default=0.5, help="P4 model width")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--skip-p3", action="store_true")
    parser.add_argument("--skip-p4", action="store_true")
    args = parser.parse_args()
    import ray

    from alexnet.cluster import job_runtime_env
    from alexnet.prepared import read_prepared

    work = args.workdir.resolve()

    smallest = min(int(p.name.split("-")[1]) for p in work.glob("imagenet-*"))

    def output(n: int) -> Path:  # bench/preprocess_speed.py leaves out-stats (its N) and out-4n (4N)
        return work / ("out-stats" if n == smallest else "out-4n")

    raw, prepared = work / f"imagenet-{args.p3_images}", read_prepared(output(args.p3_images))
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
             runtime_env=job_runtime_env())
    print(f"machine: {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, torch "
          f"{torch.__version__}; {prepared.summary['rows_written']['train']} images, {args.crop}px crops; best epoch")
    if not args.skip_p3:
        ours = our_input(prepared, args.crop, args.epochs)
        ours_uint8 = our_input(prepared, args.crop, args.epochs, normalize=False)
        theirs = torchvision_input(raw, prepared, args.crop, args.epochs)
        print(f"P3 ImageFolder+DataLoader(2)  {theirs:8.1f} img/s")
        print(f"P3 Ray Data from Parquet      {ours:8.1f} img/s   ratio {ours / theirs:.2f}x  (target >= 3x; "
              "mean subtraction and lighting on this CPU, as a CPU worker does)")
        print(f"P3   batches for a GPU        {ours_uint8:8.1f} img/s   ratio {ours_uint8 / theirs:.2f}x  "
              "(uint8 crops + offsets; a GPU worker finishes them on the GPU)")
    if args.skip_p4:
        return
    prepared = read_prepared(output(args.p4_images))
    ceiling = compute_ceiling(prepared, args.width, args.crop, steps=8, batch=64)
    plain = plain_loop(prepared, args.width, args.crop, args.epochs, 64)
    ours_train = train_py(prepared, args.width, args.crop, args.epochs, 64, work)
    print(f"P4 width {args.width}, batch 64, {prepared.summary['rows_written']['train']} images, best epoch of {args.epochs}")
    print(f"P4 compute-only ceiling       {ceiling:8.1f} img/s   (images decoded in memory beforehand)")
    print(f"P4 plain PyTorch loop         {plain:8.1f} img/s   (DataLoader(num_workers=2) over the same shards)")
    print(f"P4 pipelines/train.py         {ours_train:8.1f} img/s   ratio {ours_train / plain:.2f}x  (target >= 0.9x); "
          f"{ours_train / ceiling:.2f}x of the ceiling")


if __name__ == "__main__":
    main()
