"""The paper net against an independent groups=2 reference, placement, the torchvision variant, shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from alexnet.model import MIN_IMAGE_SIZE, ModelConfig, build_model, describe, output_layer
from alexnet.visualize import kernel_grid


class GroupedReference(nn.Module):
    """The same net as one column: groups=2 at conv2/4/5 and LRN per group, written from the paper."""

    def __init__(self, w: float, classes: int, size: int):
        super().__init__()
        c = [max(1, round(n * w / 2)) * 2 for n in (96, 256, 384, 384, 256)]
        fc = max(1, round(4096 * w / 2)) * 2
        self.conv1 = nn.Conv2d(3, c[0], 11, 4, 2)
        self.conv2 = nn.Conv2d(c[0], c[1], 5, padding=2, groups=2)
        self.conv3 = nn.Conv2d(c[1], c[2], 3, padding=1)
        self.conv4 = nn.Conv2d(c[2], c[3], 3, padding=1, groups=2)
        self.conv5 = nn.Conv2d(c[3], c[4], 3, padding=1, groups=2)
        s = (((size + 4 - 11) // 4 + 1 - 3) // 2 + 1 - 3) // 2 + 1
        s = (s - 3) // 2 + 1
        self.fc6, self.fc7, self.fc8 = nn.Linear(c[4] * s * s, fc), nn.Linear(fc, fc), nn.Linear(fc, classes)

    @staticmethod
    def lrn_per_group(x):
        a, b = x.chunk(2, dim=1)
        lrn = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)
        return torch.cat([lrn(a), lrn(b)], 1)

    def forward(self, x):
        x = F.max_pool2d(self.lrn_per_group(F.relu(self.conv1(x))), 3, 2)
        x = F.max_pool2d(self.lrn_per_group(F.relu(self.conv2(x))), 3, 2)
        x = F.relu(self.conv5(F.relu(self.conv4(F.relu(self.conv3(x))))))
        x = torch.flatten(F.max_pool2d(x, 3, 2), 1)
        return self.fc8(F.relu(self.fc7(F.relu(self.fc6(x)))))


def _copy_into_reference(net, ref):
    with torch.no_grad():
        for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"):
            halves = [getattr(t, name) for t in net.towers]
            getattr(ref, name).weight.copy_(torch.cat([h.weight for h in halves]))
            getattr(ref, name).bias.copy_(torch.cat([h.bias for h in halves]))
        ref.fc8.load_state_dict(net.fc8.state_dict())


def test_parameter_counts_match_the_paper_and_torchvision():
    assert build_model(ModelConfig(arch="paper")).num_parameters == 60_965_224
    owt = build_model(ModelConfig(arch="owt"))
    assert owt.num_parameters == 61_100_840 == sum(p.numel() for p in torchvision.models.alexnet().parameters())


@pytest.mark.parametrize("train_mode", [True, False])
def test_two_towers_equal_grouped_reference_outputs_and_gradients(train_mode):
    torch.manual_seed(0)
    net = build_model(ModelConfig(arch="paper", width=0.25, image_size=99, dropout=0.0, init="pytorch"), 7).double()
    ref = GroupedReference(0.25, 7, 99).double()
    _copy_into_reference(net, ref)
    net.train(train_mode), ref.train(train_mode)
    x = torch.randn(3, 3, 99, 99, dtype=torch.float64)
    y = torch.tensor([0, 3, 6])
    out, out_ref = net(x), ref(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)
    F.cross_entropy(out, y).backward()
    F.cross_entropy(out_ref, y).backward()
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"):
        grads = torch.cat([getattr(t, name).weight.grad for t in net.towers])
        torch.testing.assert_close(grads, getattr(ref, name).weight.grad, rtol=1e-9, atol=1e-12)
        bias = torch.cat([getattr(t, name).bias.grad for t in net.towers])
        torch.testing.assert_close(bias, getattr(ref, name).bias.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(net.fc8.weight.grad, ref.fc8.weight.grad, rtol=1e-9, atol=1e-12)


def test_two_cpu_devices_equal_one_exactly():
    torch.manual_seed(1)
    one = build_model(ModelConfig(arch="paper", width=0.25, image_size=67), 5, ["cpu"])
    two = build_model(ModelConfig(arch="paper", width=0.25, image_size=67), 5, [torch.device("cpu")] * 2)
    two.load_state_dict(one.state_dict())
    x = torch.randn(4, 3, 67, 67)
    one.eval(), two.eval()
    assert torch.equal(one(x), two(x))


@pytest.mark.gpu
def test_towers_on_gpus_agree_with_cpu():
    torch.manual_seed(2)
    n = torch.cuda.device_count()
    devices = [torch.device("cuda", 0), torch.device("cuda", min(1, n - 1))]
    cpu = build_model(ModelConfig(arch="paper", width=0.5, image_size=127), 10).eval()
    gpu = build_model(ModelConfig(arch="paper", width=0.5, image_size=127), 10, devices).eval()
    gpu.load_state_dict(cpu.state_dict())
    assert {p.device for p in gpu.towers[1].parameters()} == {devices[1]}
    x = torch.randn(8, 3, 127, 127)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.testing.assert_close(gpu(x.to(devices[0])).cpu(), cpu(x), rtol=1e-4, atol=1e-5)


def test_owt_loads_torchvision_weights_unchanged_and_gives_its_outputs():
    torch.manual_seed(3)
    tv = torchvision.models.alexnet().eval()
    ours = build_model(ModelConfig(arch="owt", init="pytorch")).eval()
    ours.load_state_dict(tv.state_dict())          # strict: same keys and shapes
    tv.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), rtol=0, atol=0)


def test_spatial_sizes_and_too_small_inputs():
    net = build_model(ModelConfig(arch="paper", width=0.25), 10).eval()
    seen = {}
    hooks = [m.register_forward_hook(lambda _m, _i, o, n=n: seen.update({n: o.shape[-1]}))
             for n, m in [("conv1", net.towers[0].conv1), ("conv2", net.towers[0].conv2),
                          ("conv3", net.towers[0].conv3)]]
    with torch.no_grad():
        net(torch.zeros(1, 3, 224, 224))
    for h in hooks:
        h.remove()
    assert seen == {"conv1": 55, "conv2": 27, "conv3": 13}
    assert "pool5 64x6x6" in describe(net) and "60,965,224" not in describe(net)
    with pytest.raises(ValueError, match=f"at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}"):
        build_model(ModelConfig(arch="paper", image_size=MIN_IMAGE_SIZE - 1))
    with pytest.raises(ValueError, match="at least 63"):
        build_model(ModelConfig(arch="owt", width=0.25))(torch.zeros(1, 3, 40, 40))
    with pytest.raises(ValueError, match="built for 224x224"):
        net(torch.zeros(1, 3, 200, 200))
    assert build_model(ModelConfig(arch="paper", width=0.25, image_size=63), 3)(torch.zeros(2, 3, 63, 63)).shape == (2, 3)


def test_paper_init_and_pytorch_init():
    torch.manual_seed(4)
    net = build_model(ModelConfig(arch="paper", width=0.5, image_size=99), 10)
    for name, layer in net.modules_in_order():
        assert abs(layer.weight.std().item() - 0.01) < 0.002
        expected = 1.0 if name in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0
        assert torch.all(layer.bias == expected)
    caffe = build_model(ModelConfig(arch="owt", width=0.25, bias_value=0.1))
    assert torch.all(caffe.features[3].bias == 0.1) and torch.all(caffe.features[0].bias == 0)
    default = build_model(ModelConfig(arch="paper", width=0.5, image_size=99, init="pytorch"), 10)
    assert default.towers[0].conv1.weight.std().item() > 0.02  # kaiming-uniform, not N(0, 0.01)


def test_first_layer_kernel_picture_has_one_row_per_tower():
    net = build_model(ModelConfig(arch="paper"))
    picture = kernel_grid(net.first_layer_kernels(), scale=3, gap=1)
    assert picture.shape == (2 * 34 + 1, 48 * 34 + 1, 3) and picture.dtype == np.uint8


@pytest.mark.parametrize("arch", ["paper", "owt"])
def test_extra_conv_adds_a_sixth_conv_over_pool5_and_fc7_features_feed_the_output(arch):
    torch.manual_seed(0)
    plain = build_model(ModelConfig(arch=arch, width=0.25, image_size=67), 5)
    extra = build_model(ModelConfig(arch=arch, width=0.25, image_size=67, extra_conv=True), 5)
    names = [n for n, _ in extra.modules_in_order()]
    assert "conv6" in names and "conv6" not in [n for n, _ in plain.modules_in_order()]
    assert names.index("conv6") == names.index("fc6") - (2 if arch == "paper" else 1)
    (_, conv6), *_ = [(n, m) for n, m in extra.modules_in_order() if n == "conv6"]
    assert conv6.kernel_size == (3, 3) and conv6.in_channels == conv6.out_channels
    assert "conv6" in describe(extra)
    x = torch.randn(2, 3, 67, 67)
    for model in (plain, extra):
        model.eval()
        with torch.no_grad():
            feats = model.fc7_features(x)
            prefix, head = output_layer(model)
            assert feats.shape == (2, head.in_features) and (feats >= 0).all()  # after ReLU
            assert torch.allclose(head(feats), model(x))
            assert f"{prefix}weight" in model.state_dict()
