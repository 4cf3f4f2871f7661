"""Model benchmark: forward+backward images/s of the paper net vs torchvision's alexnet, same batch.

Rows: paper net on one device; paper net with two-device placement given the same device
twice (the towers' code path without a second GPU); torchvision.models.alexnet.

    python bench/model_speed.py                       # CPU, full size, batch 32
    python bench/model_speed.py --device cuda --batch-size 128 --amp --channels-last
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
import torchvision

from alexnet.model import ModelConfig, build_model


def images_per_s(model, x, y, steps: int, amp: bool) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    device_type = x.device.type

    def step():
        with torch.autocast(device_type, dtype=torch.bfloat16,
                            enabled=amp):
            loss = F.cross_entropy(model(x), y.to(x.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):  # warm-up: allocator, cudnn autotune
        step()
    if device_type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device_type == "cuda":
        torch.cuda.synchronize()
    return steps * len(x) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="also time torch.compile'd copies (compile time excluded)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device).to(memory_format=fmt)
    y = torch.randint(0, 1000, (args.batch_size,))
    paper = ModelConfig(arch="paper", image_size=args.image_size)
    models = {
        "paper (1 device)": build_model(paper, 1000, [device]),
        "paper (2-device placement)": build_model(paper, 1000, [device, device]),
        "torchvision alexnet": torchvision.models.alexnet().to(device),
    }
    if args.compile:
        models["paper (1 device), compiled"] = torch.compile(
            build_model(paper, 1000, [device]).to(memory_format=fmt))
        models["torchvision alexnet, compiled"] = torch.compile(torchvision.models.alexnet().to(device))
    results = {}
    for name, model in models.items():
        model = model.to(memory_format=fmt).train()
        results[name] = images_per_s(model, x, y, args.steps, args.amp)
    tv = results["torchvision alexnet"]
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"batch {args.batch_size}, {args.image_size}px, amp={args.amp}, channels_last={args.channels_last}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for name, ips in results.items():
        print(f"  {name:<28} {ips:9.1f} img/s   {ips / tv:5.2f}x torchvision")


if __name__ == "__main__":
    main()
