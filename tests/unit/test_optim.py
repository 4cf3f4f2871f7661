import pytest
import torch

from alexnet.optim import PaperSGD, build_optimizer


def _quadratic_grad(w):
    return 2 * w + 1.0  # d/dw of sum(w^2 + w)


def test_two_steps_follow_the_formula_by_hand():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = PaperSGD([w], lr=0.1, momentum=0.9, weight_decay=0.01)
    v, ref = torch.zeros(2, dtype=torch.float64), w.detach().clone()
    for _ in range(2):
        w.grad = _quadratic_grad(w.detach())
        opt.step()
        v = 0.9 * v - 0.01 * 0.1 * ref - 0.1 * _quadratic_grad(ref)
        ref = ref + v
        torch.testing.assert_close(w.detach(), ref, rtol=0, atol=1e-15)


def _run(opt_name, lrs):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    opt = build_optimizer(opt_name, [w], lr=lrs[0], momentum=0.9, weight_decay=5e-4)
    trace = []
    for lr in lrs:
        for g in opt.param_groups:
            g["lr"] = lr
        w.grad = _quadratic_grad(w.detach())
        opt.step()
        trace.append(w.detach().clone())
    return trace


def test_equal_to_torch_sgd_at_constant_lr_and_different_right_after_a_drop():
    lrs = [0.01] * 5
    for a, b in zip(_run("paper", lrs), _run("torch", lrs)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
    dropped = [0.01] * 3 + [0.001] * 2
    paper, torch_sgd = _run("paper", dropped), _run("torch", dropped)
    torch.testing.assert_close(paper[2], torch_sgd[2], rtol=0, atol=1e-14)
    assert not torch.allclose(paper[3], torch_sgd[3])
    # after the drop the paper's velocity keeps its old magnitude: it moves further than torch's
    assert (paper[3] - paper[2]).abs().sum() > (torch_sgd[3] - torch_sgd[2]).abs().sum()


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer("adam", [torch.nn.Parameter(torch.zeros(1))], 0.1, 0.9, 0.0)
