"""One config chain for every script: defaults -> YAML files -> command-line flags.

Each script declares its settings as a dataclass (the defaults, in one block). Then:

    cfg = parse_config(TrainConfig, argv, model_config=True)

applies, in order,
  1. the dataclass defaults;
  2. ``configs/<model>.yaml`` when the dataclass has a ``model`` field and that file exists
     (``model_config=True``);
  3. every ``--config FILE`` in the order given (YAML, read with ``yaml.safe_load``);
  4. every ``--some-key VALUE`` flag (``some_key`` in the dataclass).

A key that the dataclass does not declare, or a value of the wrong type, is an error that
names the key and where it came from. Flag values are parsed as YAML scalars/collections, so
``--betas "[0.9, 0.99]"`` and ``--aug "{hflip: {p: 0}}"`` work; dict values merge into the
default dict (one level deep) instead of replacing it, so one transform can be tuned alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class ConfigError(ValueError):
    """A config key is unknown or has a value of the wrong type."""


@dataclasses.dataclass
class CommonConfig:
    """Keys shared by every script."""

    data_dir: str = "data/demo"  # dataset folder in the competition layout
    out_dir: str = "runs/demo"  # run folder: schema, folds, models, logits, ensemble
    seed: int = 42


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check(key: str, value: Any, tp: Any, source: str) -> Any:
    """Return ``value`` converted to ``tp`` when that is lossless, else raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(key, value, arg, source)
            except ConfigError as err:
                errors.append(err)
        raise errors[0] if errors else ConfigError(f"{source}: key '{key}' must not be null")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. "--fold 0" for a str key that also takes "all"
    elif origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, (list, tuple)):
            (item_tp,) = typing.get_args(tp)[:1] or (Any,)
            return [_check(f"{key}[{i}]", v, item_tp, source) for i, v in enumerate(value)]
    elif origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
    else:  # pragma: no cover - a dataclass field with an unsupported annotation
        raise TypeError(f"unsupported config type {tp!r} for key '{key}'")
    raise ConfigError(f"{source}: key '{key}' expects {_type_name(tp)}, got {value!r}")


def _merge(base: Any, update: Any) -> Any:
    if isinstance(base, dict) and isinstance(update, dict):
        merged = dict(base)
        for k, v in update.items():
            merged[k] = _merge(base.get(k), v) if isinstance(base.get(k), dict) else v
        return merged
    return update


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}  # plain YAML only: a Python tag is an error, never run
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not a plain YAML config ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of keys to values")
    return data


def _apply(values: dict, updates: dict, fields: dict, source: str) -> None:
    for key, value in updates.items():
        key = key.replace("-", "_")
        if key not in fields:
            close = [k for k in fields if key in k or k in key]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{source}: unknown config key '{key}'{hint}")
        checked = _check(key, value, fields[key], source)
        values[key] = _merge(values[key], checked) if isinstance(values[key], dict) else checked


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with ``--config`` and one ``--flag`` per dataclass field."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # "--epoch" must not silently mean "--epochs"
    )
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML config file(s), applied in order after the defaults")
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        parser.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, default=argparse.SUPPRESS,
            metavar=_type_name(f.type).upper().replace(" ", ""),
            help=f"(default: {default!r})",
        )
    return parser


def parse_config(cls: type, argv: list[str] | None = None, *, model_config: bool = False,
                 description: str | None = None):
    """Resolve ``cls`` from defaults, YAML files and flags (see the module docstring)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    parser = build_parser(cls, description)
    args = vars(parser.parse_args(argv))
    config_files = args.pop("config")
    flags = {}
    for key, raw in args.items():
        try:
            flags[key] = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            flags[key] = raw
        if fields[key] is str and not isinstance(flags[key], str) and flags[key] is not None:
            flags[key] = raw  # strings stay as typed: "--fold 0" -> "0", "--model 1e3" -> "1e3"
    values = dataclasses.asdict(cls())
    if model_config and "model" in fields:
        model = flags.get("model") or values["model"]
        for path in config_files:  # a --config file may choose the model too
            model = load_yaml(path).get("model", model)
        model_file = CONFIG_DIR / f"{model}.yaml"
        if model_file.is_file():
            config_files = [str(model_file)] + [p for p in config_files if Path(p).resolve() != model_file]
    for path in config_files:
        _apply(values, load_yaml(path), fields, str(path))
    _apply(values, flags, fields, "command line")
    cfg = cls(**values)
    cfg.config_files = config_files  # for the record in the run folder; not a config key
    return cfg


def save_config(cfg, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically), so a run folder records how it was made."""
    from utils.io import atomic_write_text

    text = yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
    files = getattr(cfg, "config_files", [])
    header = "# resolved config; from defaults" + "".join(f" < {p}" for p in files) + " < flags\n"
    atomic_write_text(path, header + text)
