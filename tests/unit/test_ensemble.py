"""Ensemble arithmetic, member choice, the Table 2 report, fine-tuning weight transfer (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alexnet.checkpoints import load_initial_weights
from alexnet.config import TrainConfig, UsageError
from alexnet.ensemble import choose_members, ensemble_rows, topk_errors
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
    rows = ensemble_rows(probs, labels, (1, 2, 3), ("center",), seed=1)
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


def test_markdown_table_sits_next_to_the_papers_numbers():
    cfg = TrainConfig(data="x")
    members = [Member(f"r{i}", f"m{i}", "/c", cfg, 4, False) for i in range(5)]
    rows = [{"size": 1, "crops": "10crop", "members": [m.run_id for m in members], "top1": 0.4, "top5": 0.2,
             "top1_std": 0.01, "top5_std": 0.02, "top1_best": 0.39, "top5_best": 0.18},
            {"size": 5, "crops": "10crop", "members": [m.run_id for m in members], "top1": 0.38, "top5": 0.16}]
    md = markdown_table(rows, members)
    assert "| 1 CNN | 10crop | 40.00 ± 1.00 (best 39.00)" in md
    assert f"| {PAPER_TABLE2[5][0]} | {PAPER_TABLE2[5][1]:.1f} | {PAPER_TABLE2[5][2]:.1f} |" in md
    assert "m0, m1, m2, m3, m4" in md
    assert "<td>40.00 ± 1.00 (best 39.00)</td>" in html_table(rows, members)
    starred = [Member(f"r{i}", f"m{i}", "/c", cfg, 4, True) for i in range(5)]
    assert "| 1 CNN* |" in markdown_table(rows, starred) and "| 39.0 | 16.6 |" in markdown_table(rows, starred)


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
