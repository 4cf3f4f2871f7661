"""Search spaces as data: validation, defaults around the paper, Tune conversion."""

from __future__ import annotations

import pytest

from alexnet.config import UsageError
from tuning.space import PAPER_GRID, PAPER_SPACE, contains, load_space, to_tune, validate_space


def test_default_space_is_centred_on_the_paper():
    for key, paper in (("lr", 0.01), ("weight_decay", 0.0005), ("dropout", 0.5)):
        (kind, (low, high)), = PAPER_SPACE[key].items()
        assert low < paper < high
        assert paper in PAPER_GRID[key]["grid"]
    assert load_space(None) == PAPER_SPACE and load_space(None, grid=True) == PAPER_GRID


def test_yaml_space_with_prefix_and_every_kind(tmp_path):
    (tmp_path / "s.yaml").write_text("train.lr: {loguniform: [0.001, 0.1]}\nbatch-size: {choice: [64, 128]}\n"
                                     "momentum: {grid: [0.8, 0.9]}\nseed: {randint: [0, 100]}\n")
    space = load_space(tmp_path / "s.yaml")
    assert set(space) == {"lr", "batch_size", "momentum", "seed"}
    tune_space = to_tune(space)
    assert set(tune_space) == set(space)
    assert tune_space["momentum"] == {"grid_search": [0.8, 0.9]}
    assert contains(space["lr"], 0.05) and not contains(space["lr"], 0.5) and contains(space["batch_size"], 64)


@pytest.mark.parametrize("space, message", [
    ({"learning_rate": {"uniform": [0, 1]}}, "not a tunable"),
    ({"num_workers": {"choice": [1, 2]}}, "not a tunable"),
    ({"lr": {"normal": [0, 1]}}, "unknown distribution"),
    ({"lr": {"uniform": [1, 0]}}, "low < high"),
    ({"lr": 0.01}, "one distribution"),
    ({"dropout": {"choice": []}}, "non-empty"),
    ({}, "empty"),
])
def test_bad_spaces_are_refused(space, message):
    with pytest.raises(UsageError, match=message):
        validate_space(space)

