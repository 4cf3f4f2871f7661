"""Frozen configs: YAML defaults under flags, refusals, dict round trips, the model options TrainConfig derives."""

import dataclasses

import pytest

from alexnet.config import EvalConfig, PreprocessConfig, SweepConfig, TrainConfig, UsageError
from alexnet.model import ModelConfig, build_model
from tuning.sweep import command_line


def test_yaml_supplies_defaults_and_flags_win(tmp_path):
    (tmp_path / "c.yaml").write_text("input: /data/in\noutput: /data/out\nsize: 128\nquality: 90\nstats: false\n")
    cfg = PreprocessConfig.parse_args(["--config", str(tmp_path / "c.yaml"), "--size", "64"])
    assert (cfg.size, cfg.quality, cfg.stats, str(cfg.input)) == (64, 90, False, "/data/in")


def test_unknown_yaml_key_is_refused(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("input: a\noutput: b\nsizee: 3\n")
    with pytest.raises(SystemExit) as exc:
        PreprocessConfig.parse_args(["--config", str(tmp_path / "c.yaml")])
    assert exc.value.code == 2 and "sizee" in capsys.readouterr().err


@pytest.mark.parametrize("entry", ["preprocess", "train", "tune", "evaluate"])
@pytest.mark.parametrize("text, message", [(None, "cannot read config file"), ("- a\n- b\n", "must hold a mapping"),
                                           ("a: [\n", "cannot read config file"), ("42\n", "must hold a mapping")])
def test_a_config_file_missing_or_not_a_mapping_is_one_line_and_exit_2(tmp_path, capsys, entry, text, message):
    import importlib

    path = tmp_path / "c.yaml"
    if text is not None:
        path.write_text(text)
    main = importlib.import_module(f"pipelines.{entry}").main
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert "Traceback" not in err


def test_bool_flags_switch_both_ways_and_dict_round_trip():
    cfg = PreprocessConfig.parse_args(["--input", "a", "--output", "b", "--no-draft", "--strict"])
    assert cfg.draft is False and cfg.strict is True
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.with_overrides({"size": 96}).size == 96
    with pytest.raises(UsageError, match="unknown"):
        cfg.with_overrides({"sise": 96})


def test_invalid_values_are_refused():
    with pytest.raises(UsageError, match="--size"):
        PreprocessConfig(input="a", output="b", size=5)
    with pytest.raises(SystemExit):
        PreprocessConfig.parse_args(["--input", "a", "--output", "b", "--quality", "0"])


@pytest.mark.parametrize("argv, message", [
    (["--arch", "owt", "--gpus-per-worker", "2"], "single column"),
    (["--batch-size", "100", "--num-workers", "3"], "multiple of --num-workers"),
    (["--dropout", "1.0"], "--dropout"),
    (["--cpus-per-worker", "0"], "a worker must hold something"),  # Ray refused the empty bundle mid-run
    (["--decode", "gpu"], "--decode gpu needs --gpus-per-worker"),
])
def test_inconsistent_flags_are_refused(argv, message):
    with pytest.raises(UsageError, match=message):
        TrainConfig.from_dict({"data": "x", **{a.lstrip("-").replace("-", "_"): _value(v)
                                               for a, v in zip(argv[::2], argv[1::2])}})


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def test_yaml_defaults_and_flags(tmp_path):
    (tmp_path / "c.yaml").write_text("epochs: 7\nlr: 0.02\nwidth: 0.5\n")
    cfg = TrainConfig.parse_args(["--data", "d", "--config", str(tmp_path / "c.yaml"), "--lr", "0.05"])
    assert (cfg.epochs, cfg.lr, cfg.width) == (7, 0.05, 0.5)


def test_eval_config_refuses_ambiguous_or_empty_member_lists():
    for values, message in [({}, "exactly one"), ({"runs": ["a"], "experiment": "e"}, "exactly one"),
                            ({"runs": ["a"], "filter": "x"}, "--filter"), ({"runs": ["a"], "sizes": [0]}, "--sizes")]:
        with pytest.raises(UsageError, match=message):
            EvalConfig.from_dict({"data": "d"} | values)
    assert EvalConfig.parse_args(["--data", "d", "--runs", "a", "b", "--sizes", "1", "2"]).sizes == (1, 2)


def test_resume_needs_a_name_and_the_retrain_command_lists_what_differs():
    with pytest.raises(UsageError, match="--sweep-name"):
        SweepConfig.from_dict({"data": "d", "resume": True})
    cfg = SweepConfig.from_dict({"data": "d", "lr": 0.02, "width": 0.25, "pca_lighting": False}).train_config()
    words = command_line(cfg).split()
    assert words[:2] == ["python", "pipelines/train.py"]
    assert {w for w in words if w.startswith("--")} == {"--data", "--lr", "--width", "--no-pca-lighting"}
    assert cfg.experiment == "sweeps"  # trials have their own experiment; the retrained run is a training run
    assert TrainConfig.parse_args(words[2:]) == dataclasses.replace(cfg, experiment="alexnet-ray")
    with pytest.raises(UsageError, match="log no models"):
        SweepConfig.from_dict({"data": "d", "register_model": "m"})
    with pytest.raises(UsageError, match="--input-only trains no model"):
        TrainConfig.from_dict({"data": "d", "register_model": "m", "input_only": True})
    with pytest.raises(UsageError, match="--input-until measures the input: it needs --input-only"):
        TrainConfig.from_dict({"data": "d", "input_until": "crops"})


def test_a_training_config_is_the_models_config_and_its_flags_build_the_net(capsys):
    cfg = TrainConfig.parse_args(["--data", "d", "--width", "0.25", "--image-size", "64", "--dropout", "0.3"])
    assert isinstance(cfg, ModelConfig)
    model = build_model(cfg, 3)
    assert type(model.cfg) is ModelConfig and model.cfg == ModelConfig(width=0.25, image_size=64, dropout=0.3)
    assert model.fc8.out_features == 3 and model.towers[0].dropout.p == 0.3
    assert build_model(cfg.with_overrides({"dropout": 0.6}), 3).towers[1].dropout.p == 0.6  # a sweep's trial
    with pytest.raises(UsageError, match="--image-size 40 is too small"):
        cfg.with_overrides({"image_size": 40})
    with pytest.raises(SystemExit):
        TrainConfig.parse_args(["--help"])
    help_text = capsys.readouterr().out
    model_group = help_text.index("The network's shape and initialisation:")
    assert help_text.index("\n  --lr LR") < model_group < help_text.index("\n  --width WIDTH")
