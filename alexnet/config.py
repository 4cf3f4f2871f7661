"""Frozen config dataclasses and the command lines generated from them.

One typed object per job: built once from CLI flags (over `--config file.yaml` defaults),
validated in `__post_init__`, logged as `to_dict()`, rebuilt elsewhere with `from_dict()`.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

C = TypeVar("C", bound="ConfigBase")


class UsageError(ValueError):
    """Wrong input from the user: reported in one line, exit code 2, before any Ray work."""


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


class ConfigBase:
    """Mixin for frozen dataclasses: dict round trip, overrides, and argparse generation."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any]) -> C:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"unknown {cls.__name__} key(s): {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(hints[k], v) for k, v in values.items()})

    def with_overrides(self: C, overrides: dict[str, Any]) -> C:
        return type(self).from_dict({**self.to_dict(), **overrides})

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """One flag per field: `--field-name`; bools get `--x/--no-x`; help from field metadata."""
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp, optional = _unwrap_optional(hints[f.name])
            flag = "--" + f.name.replace("_", "-")
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            kw: dict[str, Any] = {"help": f.metadata.get("help", ""), "dest": f.name}
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
            if tp is bool:
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw["type"] = tp if tp in (int, float, str) else (Path if tp is Path else str)
                kw["metavar"] = f.metadata.get("metavar", f.name.upper())
            if required:
                kw["required"] = True
            else:
                kw["default"] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                if kw["help"] and tp is not bool:
                    kw["help"] += f" (default: {kw['default']})"
            parser.add_argument(flag, **kw)
        return parser

    @classmethod
    def arg_parser(cls, add_help: bool = True, **kwargs: Any) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(add_help=add_help, **kwargs)
        parser.add_argument("--config", type=Path, metavar="YAML",
                            help="YAML file of defaults; command-line flags win")
        return cls.add_arguments(parser)

    @classmethod
    def parse_args(cls: type[C], argv: Sequence[str] | None = None, **kwargs: Any) -> C:
        """Parse argv into a validated config: YAML defaults first, explicit flags win."""
        parser = cls.arg_parser(**kwargs)
        pre_parser = argparse.ArgumentParser(add_help=False)
        pre_parser.add_argument("--config", type=Path)
        pre, _ = pre_parser.parse_known_args(argv)
        if pre.config is not None:
            defaults = load_yaml_mapping(pre.config)
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(defaults) - known)
            if unknown:
                parser.error(f"{pre.config}: unknown key(s) {', '.join(unknown)}")
            for action in parser._actions:
                if action.dest in defaults:
                    action.required = False
            parser.set_defaults(**defaults)
        ns = vars(parser.parse_args(argv))
        ns.pop("config")
        try:
            return cls.from_dict(ns)
        except (TypeError, ValueError) as err:
            parser.error(str(err))
            raise  # unreachable: parser.error exits


def load_yaml_mapping(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise UsageError(f"cannot read config file {path}: {err}") from err
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _coerce(tp: Any, value: Any) -> Any:
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise UsageError(f"a value is required (got None for a {getattr(tp, '__name__', tp)})")
    if tp is Path:
        return Path(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool, float) and not isinstance(value, tp):
        raise UsageError(f"expected {tp.__name__}, got {value!r}")
    return value


def field(default: Any = dataclasses.MISSING, help: str = "", **metadata: Any) -> Any:
    """A dataclass field carrying its CLI help text."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


@dataclasses.dataclass(frozen=True)
class PreprocessConfig(ConfigBase):
    """`pipelines/preprocess.py`: an ImageNet tree to Parquet shards plus mean image and RGB PCA."""

    input: Path = field(help="ImageNet root holding train/<wnid>/ and optionally val/")
    output: Path = field(help="output folder for Parquet shards and statistics")
    size: int = field(256, help="shorter side is rescaled to this, then the central square is kept")
    quality: int = field(95, help="JPEG quality of the stored images")
    shard_mb: float = field(256.0, help="target size of one Parquet shard in MiB")
    seed: int = field(0, help="seed of the row order written to the shards")
    limit: int | None = field(None, help="keep the first N files of each split (trial runs)")
    classes: int | None = field(None, help="keep the first K classes in sorted wnid order")
    val_labels: Path | None = field(None, help="LOC_val_solution.csv for a flat val/ (auto-detected)")
    strict: bool = field(False, help="exit non-zero after the report if any file was rejected")
    overwrite: bool = field(False, help="delete an existing output folder and start afresh")
    stats: bool = field(True, help="compute the mean image and the RGB PCA in the same pass")
    draft: bool = field(True, help="let large JPEGs decode at a reduced DCT scale (faster, same quality)")
    address: str | None = field(None, help="Ray cluster to join ('auto' or host:port); none starts a local one")
    tracking_uri: str | None = field(None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    experiment: str = field("alexnet-ray", help="MLflow experiment")
    run_name: str | None = field(None, help="MLflow run name")

    def __post_init__(self) -> None:
        if not 16 <= self.size <= 4096:
            raise UsageError(f"--size must be within 16..4096, got {self.size}")
        if not 1 <= self.quality <= 100:
            raise UsageError(f"--quality must be within 1..100, got {self.quality}")
        if not 0 < self.shard_mb <= 1024:
            raise UsageError(f"--shard-mb must be within (0, 1024], got {self.shard_mb}")
        for name in ("limit", "classes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name} must be at least 1, got {value}")
