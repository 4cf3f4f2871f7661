"""AlexNet as the 2012 paper built it: two towers that can live on two devices.

Tower A and tower B each hold half of every layer (48/128/192/192/128 kernels, 2048+2048
fc neurons). conv2, conv4 and conv5 see only their own tower; conv3, fc6, fc7 and fc8 see
both, so activations cross devices only there. With one device both towers share it.
`arch="owt"` is torchvision's single-column "one weird trick" variant, state_dict-compatible.

Parameter counts (1000 classes): paper 60,965,224; owt 61,100,840.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

PAPER_CHANNELS = (96, 256, 384, 384, 256)     # both towers together
PAPER_FC = 4096
OWT_CHANNELS = (64, 192, 384, 256, 256)
LRN = dict(size=5, alpha=1e-4, beta=0.75, k=2.0)  # torch divides alpha by size, as cuda-convnet does


def _option(default, help: str, shapes_weights: bool = False, **metadata):
    """A model option: its CLI help lives here; `shapes_weights` marks what a checkpoint's tensors depend on."""
    return dataclasses.field(default=default, metadata={"help": help, "shapes_weights": shapes_weights, **metadata})


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The network's shape and initialisation.

    `TrainConfig` derives from it, so a training config is also the model's config.
    """

    arch: str = _option("paper", "paper: two towers as in 2012; owt: torchvision's single column",
                        shapes_weights=True, choices=("paper", "owt"))
    width: float = _option(1.0, "multiplier of every layer's channel and neuron count (0.25 for CPU trials)",
                           shapes_weights=True)
    init: str = _option("paper", "paper: N(0, 0.01) weights and the paper's biases; pytorch: layer defaults "
                        "(narrow nets need it)", choices=("paper", "pytorch"))
    bias_value: float = _option(1.0, "paper init: bias of conv2/4/5 and fc6/7 (Caffe used 0.1)")
    dropout: float = _option(0.5, "dropout probability of fc6 and fc7")
    extra_conv: bool = _option(False, "a sixth conv layer (3x3, conv5's channels) over pool5, as in the paper's "
                               "pre-trained ensemble members", shapes_weights=True)
    image_size: int = _option(224, "input side (training: the random crop, at most the stored size); fc6 follows "
                              "from it", shapes_weights=True)

    def __post_init__(self) -> None:
        if self.width <= 0:
            raise ValueError(f"--width must be positive, got {self.width}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be within [0, 1), got {self.dropout}")
        if self.image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"--image-size {self.image_size} is too small: AlexNet needs at least "
                             f"{MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} pixels")

    @classmethod
    def of(cls, cfg: "ModelConfig") -> "ModelConfig":
        """The model options alone of any config derived from ModelConfig (e.g. a TrainConfig)."""
        return cfg if type(cfg) is cls else cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


# Model options whose values decide the tensors' shapes: a resumed run or loaded checkpoint must keep them.
SHAPE_KEYS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.metadata["shapes_weights"])


def _conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def spatial_sizes(image_size: int) -> dict[str, int]:
    """Map sizes through the net: 224 -> conv1 55, pool1 27, pool2 13, pool5 6."""
    c1 = _conv_out(image_size, 11, 4, 2)
    p1 = _conv_out(c1, 3, 2)
    p2 = _conv_out(p1, 3, 2)
    p5 = _conv_out(p2, 3, 2)
    return {"conv1": c1, "pool1": p1, "pool2": p2, "pool5": p5}


MIN_IMAGE_SIZE = next(s for s in range(11, 512) if spatial_sizes(s)["pool5"] >= 1)


def _scaled(n: int, width: float) -> int:
    return max(1, round(n * width))


class Tower(nn.Module):
    """Half of the paper net; conv3 and fc6/fc7 take both towers' activations as input."""

    def __init__(self, channels: Sequence[int], fc: int, fc6_in: int, dropout: float, extra_conv: bool = False):
        super().__init__()
        c1, c2, c3, c4, c5 = channels
        self.conv1 = nn.Conv2d(3, c1, 11, stride=4, padding=2)
        self.conv2 = nn.Conv2d(c1, c2, 5, padding=2)
        self.conv3 = nn.Conv2d(2 * c2, c3, 3, padding=1)
        self.conv4 = nn.Conv2d(c3, c4, 3, padding=1)
        self.conv5 = nn.Conv2d(c4, c5, 3, padding=1)
        # the paper's "extra sixth convolutional layer over the last pooling layer" (section 7)
        self.conv6 = nn.Conv2d(c5, c5, 3, padding=1) if extra_conv else None
        self.fc6 = nn.Linear(fc6_in, fc)
        self.fc7 = nn.Linear(2 * fc, fc)
        self.lrn = nn.LocalResponseNorm(**LRN)  # over this tower's channels only, as in the paper
        self.dropout = nn.Dropout(dropout)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.lrn(F.relu(self.conv1(x))), 3, 2)      # (B, 48, 27, 27)
        return F.max_pool2d(self.lrn(F.relu(self.conv2(x))), 3, 2)   # (B, 128, 13, 13)

    def trunk(self, both: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv3(both))                                  # (B, 192, 13, 13)
        x = F.relu(self.conv5(F.relu(self.conv4(x))))                 # (B, 128, 13, 13)
        x = F.max_pool2d(x, 3, 2)                                     # (B, 128, 6, 6)
        return x if self.conv6 is None else F.relu(self.conv6(x))


class PaperAlexNet(nn.Module):
    """The two-tower net; `devices` holds one device (both towers) or two (one tower each)."""

    def __init__(self, cfg: ModelConfig, num_classes: int, devices: Sequence[torch.device] | None = None):
        super().__init__()
        devices = [torch.device(d) for d in (devices or ["cpu"])]
        if len(devices) not in (1, 2):
            raise ValueError(f"the paper net takes one or two devices, got {len(devices)}")
        self.cfg, self.num_classes = cfg, num_classes
        self.devices = (devices[0], devices[-1])
        half = [_scaled(c, cfg.width / 2) for c in PAPER_CHANNELS]
        fc = _scaled(PAPER_FC, cfg.width / 2)
        s = spatial_sizes(cfg.image_size)["pool5"]
        self.towers = nn.ModuleList(Tower(half, fc, 2 * half[4] * s * s, cfg.dropout, cfg.extra_conv)
                                    for _ in range(2))
        self.fc8 = nn.Linear(2 * fc, num_classes)
        if cfg.init == "paper":
            _paper_init(self.modules_in_order(), cfg.bias_value)
        for tower, device in zip(self.towers, self.devices):
            tower.to(device)
        self.fc8.to(self.devices[0])

    def modules_in_order(self) -> list[tuple[str, nn.Module]]:
        """(layer name, module) pairs, each tower's half under the layer's name."""
        names = ("conv1", "conv2", "conv3", "conv4", "conv5", "conv6", "fc6", "fc7")
        return [(n, getattr(t, n)) for n in names for t in self.towers if getattr(t, n) is not None] + [
            ("fc8", self.fc8)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc8(self.fc7_features(x))                         # (B, num_classes) on devices[0]

    def fc7_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden layer (fc7 after ReLU and dropout), both towers: (B, 2 * fc) on devices[0]."""
        _check_input(x, self.cfg.image_size)
        (a, b), (da, db) = self.towers, self.devices
        ha, hb = a.stem(x.to(da)), b.stem(x.to(db))                  # (B, 128, 13, 13) each
        # conv3: each tower sees both towers' maps; the only exchange between the conv layers
        ha, hb = a.trunk(torch.cat([ha, hb.to(da)], 1)), b.trunk(torch.cat([ha.to(db), hb], 1))
        flat = torch.flatten(ha, 1), torch.flatten(hb, 1)             # (B, 128*6*6) each
        fa = a.dropout(F.relu(a.fc6(torch.cat([flat[0], flat[1].to(da)], 1))))  # (B, 2048)
        fb = b.dropout(F.relu(b.fc6(torch.cat([flat[0].to(db), flat[1]], 1))))
        fa, fb = (a.dropout(F.relu(a.fc7(torch.cat([fa, fb.to(da)], 1)))),
                  b.dropout(F.relu(b.fc7(torch.cat([fa.to(db), fb], 1)))))
        return torch.cat([fa, fb.to(da)], 1)                          # (B, 4096)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def first_layer_kernels(self) -> list[torch.Tensor]:
        """conv1 weights as rows for the Figure 3 picture: one row per tower."""
        return [t.conv1.weight.detach().cpu() for t in self.towers]


class OWTAlexNet(nn.Module):
    """torchvision's `alexnet` (one weird trick): same module tree, so its state_dict loads as is."""

    def __init__(self, cfg: ModelConfig, num_classes: int):
        super().__init__()
        self.cfg, self.num_classes = cfg, num_classes
        c1, c2, c3, c4, c5 = (_scaled(c, cfg.width) for c in OWT_CHANNELS)
        fc = _scaled(PAPER_FC, cfg.width)
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c3, c4, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c4, c5, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        )
        # kept outside `features` so torchvision's state_dict keys stay valid without it
        self.conv6 = nn.Sequential(nn.Conv2d(c5, c5, 3, padding=1), nn.ReLU(inplace=True)) if cfg.extra_conv else None
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(cfg.dropout), nn.Linear(c5 * 36, fc), nn.ReLU(inplace=True),
            nn.Dropout(cfg.dropout), nn.Linear(fc, fc), nn.ReLU(inplace=True),
            nn.Linear(fc, num_classes),
        )
        if cfg.init == "paper":
            _paper_init(self.modules_in_order(), cfg.bias_value)

    def modules_in_order(self) -> list[tuple[str, nn.Module]]:
        extra = [*self.conv6] if self.conv6 is not None else []
        layers = [m for m in [*self.features, *extra, *self.classifier] if isinstance(m, (nn.Conv2d, nn.Linear))]
        names = ("conv1", "conv2", "conv3", "conv4", "conv5") + ("conv6",) * bool(extra) + ("fc6", "fc7", "fc8")
        return list(zip(names, layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier[-1](self.fc7_features(x))

    def fc7_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden layer (fc7 after ReLU): (B, fc)."""
        _check_input(x, MIN_IMAGE_SIZE, exact=False)
        x = self.features(x)
        if self.conv6 is not None:
            x = self.conv6(x)
        x = self.avgpool(x)                                           # (B, 256, 6, 6)
        return self.classifier[:-1](torch.flatten(x, 1))

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def first_layer_kernels(self) -> list[torch.Tensor]:
        w = self.features[0].weight.detach().cpu()
        return [w[: len(w) // 2], w[len(w) // 2:]]


BIAS_ONE_LAYERS = ("conv2", "conv4", "conv5", "fc6", "fc7")


def _paper_init(layers: list[tuple[str, nn.Module]], bias_value: float) -> None:
    """Weights N(0, 0.01); biases `bias_value` in conv2, conv4, conv5, fc6, fc7 and 0 elsewhere."""
    for name, layer in layers:
        nn.init.normal_(layer.weight, 0.0, 0.01)
        nn.init.constant_(layer.bias, bias_value if name in BIAS_ONE_LAYERS else 0.0)


def _check_input(x: torch.Tensor, size: int, exact: bool = True) -> None:
    h, w = x.shape[-2:]
    if exact and (h, w) != (size, size):
        raise ValueError(f"this net was built for {size}x{size} inputs, got {h}x{w}")
    if min(h, w) < MIN_IMAGE_SIZE:
        raise ValueError(f"input {h}x{w} is too small: AlexNet needs at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}")


def build_model(cfg: ModelConfig, num_classes: int = 1000,
                devices: Sequence[torch.device | str] | None = None) -> nn.Module:
    """The public constructor: `devices` None means CPU; two devices split the paper net's towers.

    `cfg` may be any config derived from ModelConfig (a TrainConfig); the model keeps its model options only.
    """
    cfg = ModelConfig.of(cfg)
    if cfg.arch == "paper":
        return PaperAlexNet(cfg, num_classes, devices)
    devices = list(devices or ["cpu"])
    if len(devices) != 1:
        raise ValueError("the owt variant is a single column: give it one device")
    return OWTAlexNet(cfg, num_classes).to(devices[0])


def output_layer(model: nn.Module) -> tuple[str, nn.Linear]:
    """(state_dict prefix, module) of the classifier layer: replaced when fine-tuning to new classes."""
    if isinstance(model, PaperAlexNet):
        return "fc8.", model.fc8
    return "classifier.6.", model.classifier[-1]


def describe(model: nn.Module) -> str:
    """One line of layer shapes, e.g. 'paper 224px: conv1 96x55x55 > pool1 96x27x27 > ... | 60,965,224 params'."""
    cfg: ModelConfig = model.cfg
    s = spatial_sizes(cfg.image_size)
    convs = {n: sum(m.out_channels for k, m in model.modules_in_order() if k == n)
             for n in ("conv1", "conv2", "conv3", "conv4", "conv5")}
    fcs = {n: sum(m.out_features for k, m in model.modules_in_order() if k == n) for n in ("fc6", "fc7", "fc8")}
    c3 = s["pool2"]
    parts = [f"conv1 {convs['conv1']}x{s['conv1']}x{s['conv1']}", f"pool1 {convs['conv1']}x{s['pool1']}x{s['pool1']}",
             f"conv2 {convs['conv2']}x{s['pool1']}x{s['pool1']}", f"pool2 {convs['conv2']}x{c3}x{c3}",
             f"conv3 {convs['conv3']}x{c3}x{c3}", f"conv4 {convs['conv4']}x{c3}x{c3}",
             f"conv5 {convs['conv5']}x{c3}x{c3}", f"pool5 {convs['conv5']}x{s['pool5']}x{s['pool5']}",
             *([f"conv6 {convs['conv5']}x{s['pool5']}x{s['pool5']}"] if cfg.extra_conv else []),
             f"fc6 {fcs['fc6']}", f"fc7 {fcs['fc7']}", f"fc8 {fcs['fc8']}"]
    return f"{cfg.arch} x{cfg.width:g} {cfg.image_size}px: " + " > ".join(parts) + f" | {model.num_parameters:,} params"
