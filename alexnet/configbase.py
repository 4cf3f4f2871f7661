"""Config machinery: frozen dataclasses with a dict round trip, `--config file.yaml` defaults, and the command
lines generated from their fields (`alexnet.config` holds the jobs' configs)."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from alexnet.exits import UsageError

C = TypeVar("C", bound="ConfigBase")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
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
        """One flag per field: `--field-name`; bools get `--x/--no-x`; help from field metadata.

        Fields inherited from a plain dataclass (ModelConfig) are listed in a group of their own.
        """
        hints = typing.get_type_hints(cls)
        groups = {}
        for base in cls.__mro__[1:]:
            if dataclasses.is_dataclass(base) and not issubclass(base, ConfigBase):
                group = parser.add_argument_group(base.__doc__.splitlines()[0].rstrip("."))
                groups |= {f.name: group for f in dataclasses.fields(base)}
        for f in dataclasses.fields(cls):
            tp, optional = _unwrap_optional(hints[f.name])
            flag = "--" + f.name.replace("_", "-")
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            kw: dict[str, Any] = {"help": f.metadata.get("help", ""), "dest": f.name}
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
            if tp is bool:
                kw["action"] = argparse.BooleanOptionalAction
            elif typing.get_origin(tp) is tuple:  # tuple[int, ...]: one or more values
                kw["nargs"] = "+"
                kw["type"] = typing.get_args(tp)[0]
                kw["metavar"] = f.metadata.get("metavar", f.name.upper().rstrip("S"))
            else:
                kw["type"] = tp if tp in (int, float, str) else (Path if tp is Path else str)
                kw["metavar"] = f.metadata.get("metavar", f.name.upper())
            if required:
                kw["required"] = True
            else:
                kw["default"] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                if kw["help"] and tp is not bool:
                    kw["help"] += f" (default: {kw['default']})"
            groups.get(f.name, parser).add_argument(flag, **kw)
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
            try:
                defaults = load_yaml_mapping(pre.config)
            except UsageError as err:  # one line and exit 2, as for a bad flag, never a traceback
                parser.exit(2, f"error: {err}\n")
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
        raise UsageError(f"cannot read config file {path}: {' '.join(str(err).split())}") from err
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
    if typing.get_origin(tp) is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(_coerce(typing.get_args(tp)[0], v) for v in value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool, float) and not isinstance(value, tp):
        raise UsageError(f"expected {tp.__name__}, got {value!r}")
    return value


def field(default: Any = dataclasses.MISSING, help: str = "", **metadata: Any) -> Any:
    """A dataclass field carrying its CLI help text."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


# The flags every job shares, declared once.
def address_field() -> Any:
    return field(None, help="Ray cluster: host:port (or ray://...) to join it, 'local' for a new local instance, "
                             "'auto' for the running one; unset: $RAY_ADDRESS, else the cluster `ray start` runs on "
                             "this node, else a new local instance")


def resource_wait_field() -> Any:
    return field(600.0, help="how long the job may wait for the cluster to grant its resources (taken by other jobs, "
                 "a lost node not yet replaced) before it fails saying what it waited for")


def tracking_uri_field() -> Any:
    return field(None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")


def experiment_field(default: str = "alexnet-ray") -> Any:
    return field(default, help="MLflow experiment")


def run_name_field(help: str = "MLflow run name") -> Any:
    return field(None, help=help)


def verbose_field() -> Any:
    return field(False, help="show Ray's and MLflow's own output on the console (default: in a log file, named once)")
