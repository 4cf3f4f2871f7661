import pytest

from alexnet.config import PreprocessConfig, UsageError


def test_yaml_supplies_defaults_and_flags_win(tmp_path):
    (tmp_path / "c.yaml").write_text("input: /data/in\noutput: /data/out\nsize: 128\nquality: 90\nstats: false\n")
    cfg = PreprocessConfig.parse_args(["--config", str(tmp_path / "c.yaml"), "--size", "64"])
    assert (cfg.size, cfg.quality, cfg.stats, str(cfg.input)) == (64, 90, False, "/data/in")


def test_unknown_yaml_key_is_refused(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("input: a\noutput: b\nsizee: 3\n")
    with pytest.raises(SystemExit) as exc:
        PreprocessConfig.parse_args(["--config", str(tmp_path / "c.yaml")])
    assert exc.value.code == 2 and "sizee" in capsys.readouterr().err


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
