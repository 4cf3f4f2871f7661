"""Ensemble arithmetic, member choice, the Table 2 report, fine-tuning weight transfer (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alexnet.checkpoints import load_initial_weights
from alexnet.config import TrainConfig, UsageError
from alexnet.ensemble import choose_members, ensemble_rows, plan_rows, topk_errors
from alexnet.inference import output_table, table_arrays
from alexnet.members import Member
from alexnet.model import ModelConfig, build_model
from alexnet.table2 import PAPER_TABLE2, html_table, markdown_table


def _probs(rng, n, c):
    x = rng.random((n, c)).astype(np.float32)
    return x / x.sum(1, keepdims=True)


def test_topk_errors_count_hits_by_rank():
    probs = np.array([[0.1, 0.2, 0.7], [0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])
    labels = np.array([2, 1, 0, 2])
    top1, top2 = topk_errors(probs, labels, k=2)
    assert top1 == 0.75  # only the first is right
    assert top2 == 0.5   # row 1's label ranks 2nd; rows 2 and 3 rank 3rd
    assert topk_errors(probs, labels, k=5)[1] == 0.0  # k above the class count: every label is in the top C


def test_choose_members_is_seeded_sorted_and_all_when_size_reaches_the_count():
    ids = [f"r{i}" for i in range(7)]
    five = choose_members(ids, 5, seed=3)
    assert five == choose_members(ids, 5, seed=3) and len(set(five)) == 5
    assert five == [i for i in ids if i in five]  # listed in member order
    assert any(choose_members(ids, 5, seed=s) != five for s in range(4, 20))
    assert choose_members(ids, 7, seed=3) == ids


def test_ensemble_rows_average_softmax_and_report_members_alone():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 200)
    probs = {f"r{i}": {"center": _probs(rng, 200, 10)} for i in range(3)}
    rows = ensemble_rows(probs, labels, plan_rows([(r, False) for r in probs], (1, 2, 3), seed=1), ("center",))
    single, pair, trio = rows
    each = [topk_errors(probs[r]["center"], labels) for r in probs]
    assert single["top1"] == pytest.approx(np.mean([e[0] for e in each]))
    assert single["top1_std"] == pytest.approx(np.std([e[0] for e in each]))
    assert single["top1_best"] == min(e[0] for e in each)
    assert trio["members"] == list(probs)
    assert (trio["top1"], trio["top5"]) == topk_errors(np.mean([p["center"] for p in probs.values()], 0), labels)
    assert pair["members"] == choose_members(list(probs), 2, 1) and pair["selection"].startswith("seeded")
    assert (pair["top1"], pair["top5"]) == topk_errors((probs[pair["members"][0]]["center"]
                                                        + probs[pair["members"][1]]["center"]) / 2, labels)


def test_member_outputs_round_trip_through_parquet_exactly():
    rng = np.random.default_rng(1)
    probs = _probs(rng, 5, 7)
    paths, labels = np.array([f"val/{i}.jpg" for i in range(5)]), rng.integers(0, 7, 5)
    back = table_arrays(output_table(paths, labels, probs))
    assert list(back[0]) == list(paths) and (back[1] == labels).all() and (back[2] == probs).all()


def test_a_mixed_member_set_gives_exactly_the_papers_rows_with_the_right_members():
    """5 plain + 2 pre-trained, sizes 1 5 7: 1 CNN (plain alone), 1 CNN* (pre-trained alone), 5 CNNs (plain only),
    7 CNNs* (5 + 2) -- never a random 5 holding pre-trained members, never the mean of all seven as 1 CNN*."""
    plain, pre = [f"p{i}" for i in range(5)], ["s0", "s1"]
    members = [(r, False) for r in plain[:3]] + [(pre[0], True)] + [(r, False) for r in plain[3:]] + [(pre[1], True)]
    plans = {p["label"]: p for p in plan_rows(members, (1, 5, 7), seed=0)}
    assert list(plans) == ["1 CNN", "1 CNN*", "5 CNNs", "7 CNNs*"]
    assert plans["1 CNN"]["members"] == plain and plans["1 CNN*"]["members"] == pre
    assert sorted(plans["5 CNNs"]["members"]) == plain
    assert sorted(plans["7 CNNs*"]["members"]) == sorted(plain + pre)
    assert all(p["paper"] == label for label, p in plans.items())
    # sizes that are not the paper's recipe keep their own labels
    other = {p["label"]: p for p in plan_rows(members, (3, 6), seed=0)}
    assert all(p["paper"] is None for p in other.values())
    six = next(p for p in other.values() if p["size"] == 6)
    starred = sum(r in pre for r in six["members"])
    assert six["label"] == f"6 CNNs ({6 - starred} plain + {starred} pre-trained)"
    # 7 plain members: a 7-CNN row, but not the paper's starred one; 3 pre-trained only: 1 CNN* alone
    assert [(p["label"], p["paper"]) for p in plan_rows([(f"q{i}", False) for i in range(7)], (7,), 0)] == [
        ("7 CNNs", None)]
    assert [p["label"] for p in plan_rows([(f"s{i}", True) for i in range(3)], (1,), 0)] == ["1 CNN*"]


def test_the_table_puts_the_papers_numbers_beside_its_10_patch_rows_only():
    cfg = TrainConfig(data="x")
    members = [Member(f"p{i}", f"m{i}", "/c", cfg, 4, False) for i in range(5)] + [
        Member(f"s{i}", f"star{i}", "/c", cfg, 4, True) for i in range(2)]
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, 50)
    probs = {m.run_id: {c: _probs(rng, 50, 4) for c in ("center", "10crop")} for m in members}
    plans = plan_rows([(m.run_id, m.pretrained) for m in members], (1, 5, 7), seed=0)
    rows = ensemble_rows(probs, labels, plans, ("center", "10crop"))
    md = markdown_table(rows, members)
    for label, (top1, top5) in PAPER_TABLE2.items():
        assert md.count(f"| {label} | {top1:.1f} | {top5:.1f} |") == 1, label  # the 10crop row alone
    assert "| 1 CNN | center |" in md and md.count("| — | — | — |") == 4  # centre rows: no paper numbers
    single = next(r for r in rows if r["label"] == "1 CNN" and r["crops"] == "10crop")
    assert f"| 1 CNN | 10crop | {100 * single['top1']:.2f} ± {100 * single['top1_std']:.2f}" in md
    page = html_table(rows, members)
    assert page.startswith("<!DOCTYPE html>") and "<meta charset='utf-8'>" in page and "±" in page


def test_the_bar_chart_draws_every_row(tmp_path):
    from alexnet.table2 import bar_chart_png

    rows = [{"label": "1 CNN", "paper": "1 CNN", "size": 1, "crops": c, "top1": 0.5, "top5": 0.2, "top1_std": 0.01,
             "top5_std": 0.01} for c in ("center", "10crop")]
    bar_chart_png(rows, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_initial_weights_replace_only_the_output_layer_when_the_class_count_differs():
    torch.manual_seed(0)
    source = build_model(ModelConfig(arch="paper", width=0.25, image_size=67), 10)
    state = {"model": source.state_dict(), "config": TrainConfig(data="x", width=0.25, image_size=67).to_dict()}
    target = build_model(ModelConfig(arch="paper", width=0.25, image_size=67), 3)
    fresh_fc8 = target.fc8.weight.detach().clone()
    assert sorted(load_initial_weights(target, state)) == ["fc8.bias", "fc8.weight"]
    assert torch.equal(target.towers[0].conv1.weight, source.towers[0].conv1.weight)
    assert torch.equal(target.towers[1].fc7.weight, source.towers[1].fc7.weight)
    assert torch.equal(target.fc8.weight, fresh_fc8)
    same = build_model(ModelConfig(arch="paper", width=0.25, image_size=67), 10)
    assert load_initial_weights(same, state) == [] and torch.equal(same.fc8.weight, source.fc8.weight)


@pytest.mark.parametrize("other, named", [(dict(width=0.5), "width=0.25"), (dict(extra_conv=True), "conv6"),
                                          (dict(arch="owt"), "arch=paper")])
def test_initial_weights_that_do_not_fit_are_refused_with_the_reason(other, named):
    source = build_model(ModelConfig(arch="paper", width=0.25, image_size=67), 10)
    state = {"model": source.state_dict(), "config": TrainConfig(data="x", width=0.25, image_size=67).to_dict()}
    options = dict(arch="paper", width=0.25, image_size=67) | other
    with pytest.raises(UsageError, match=named):
        load_initial_weights(build_model(ModelConfig(**options), 10), state)
