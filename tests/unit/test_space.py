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



BASE = dict(data="d", width=0.25, image_size=64, batch_size=32, num_workers=2)


@pytest.mark.parametrize("space, names", [
    ({"dropout": {"uniform": [0.5, 1.5]}}, ["dropout", "within [0, 1)"]),
    ({"image_size": {"choice": [64, 96]}}, ["image_size", "image_size 96, larger than the stored images (72 px)"]),
    ({"batch_size": {"choice": [32, 33]}}, ["batch_size", "can give 33", "multiple of --num-workers 2"]),
    ({"lr": {"choice": [0.01, "x"]}}, ["lr", "can give 'x'", "expected float"]),
    ({"batch_size": {"uniform": [16, 64]}}, ["batch_size", "expected int"]),
    ({"weight_decay": {"uniform": [-0.1, 0.1]}}, ["weight_decay", "--weight-decay >= 0"]),
])
def test_a_space_that_can_give_a_value_training_refuses_is_refused_naming_the_key(space, names):
    from alexnet.config import TrainConfig
    from tuning.space import check_space

    with pytest.raises(UsageError) as err:
        check_space(validate_space(space), TrainConfig.from_dict(BASE), stored_size=72)
    for name in names:
        assert name in str(err.value), str(err.value)


def test_a_space_within_every_rule_passes_including_an_open_upper_bound():
    from alexnet.config import TrainConfig
    from tuning.space import check_space

    space = validate_space({"dropout": {"uniform": [0.0, 1.0]}, "lr": {"loguniform": [0.001, 0.1]},
                            "batch_size": {"grid": [32, 64]}, "image_size": {"randint": [63, 73]}})
    check_space(space, TrainConfig.from_dict(BASE), stored_size=72)  # uniform never gives 1.0, randint never 73
