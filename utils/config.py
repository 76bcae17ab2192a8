"""One config chain for every command: defaults -> YAML files -> command-line flags.

Each command declares its settings as a dataclass whose fields are ``option(...)``s: the
default, a help text and, where the values are a closed set, the choices. Then:

    cfg = parse_config(TrainConfig, argv, model_config=True, description=__doc__)

applies, in order,
  1. the dataclass defaults;
  2. ``configs/<model>.yaml`` when the dataclass has a ``model`` field and that file exists
     (``model_config=True``);
  3. every ``--config FILE`` in the order given (YAML, read with ``yaml.safe_load``);
  4. every ``--some-key VALUE`` flag (``some_key`` in the dataclass).

A key that the dataclass does not declare, a value of the wrong type, or a value outside the
option's choices is a ConfigError naming the key, the value and where it came from. Flag values
are parsed as YAML, so ``--betas "[0.9, 0.99]"`` and ``--aug "{hflip: {p: 0}}"`` work; a list of
strings also takes ``a,b,c``; a boolean flag alone (``--resume``) means true. A dict value merges
into the dict before it (the default, or an earlier file's), so one transform can be tuned alone;
tagged ``!replace`` it replaces it whole, in a file (``category_aug: !replace {}``) as on the
command line (``--category-aug '!replace {}'``), at any depth.
``--help`` lists every option with its help text, choices and default.
"""
from __future__ import annotations

import argparse
import atexit
import dataclasses
import gc
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from utils.errors import ConfigError, DataError, NonFiniteLoss, SearchFailed
from utils.io import atomic_write_text

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def option(default: Any = dataclasses.MISSING, help: str = "", *, choices=None, factory=None):
    """A config field: its default (or ``factory`` for a mutable one), the help text ``--help``
    shows, and the allowed values, checked when the config is parsed."""
    metadata = {"help": help, "choices": tuple(choices) if choices else None}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class DataConfig:
    data_dir: str = option("data/demo", "dataset folder in the competition layout")


@dataclasses.dataclass
class CommonConfig(DataConfig):
    """Keys shared by the pipeline's scripts."""

    out_dir: str = option("runs/demo", "run folder: schema, folds, runs, logits, ensemble, onnx/")
    seed: int = option(42, "random seed (folds, initialisation, augmentation, searches)")


class Replace(dict):
    """A dict value tagged ``!replace``: it replaces the value before it instead of merging into it."""


class _Loader(yaml.SafeLoader):
    """yaml.safe_load's loader (plain YAML: a Python tag is an error, never run) plus ``!replace``."""


_Loader.add_constructor("!replace", lambda loader, node: Replace(loader.construct_mapping(node, deep=True)))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def _plain(value: Any) -> Any:
    """``value`` with every Replace turned into a plain dict (the resolved config is plain YAML)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


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
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as text: the usual way to write a rate
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. "--fold 0" for a str key that also takes "all"
    elif origin in (list, tuple) or tp in (list, tuple):
        (item_tp,) = typing.get_args(tp)[:1] or (Any,)
        if isinstance(value, str):  # "a,b,c"
            value = [v.strip() if item_tp is str else yaml.safe_load(v) for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):  # one item
            value = [value]
        if isinstance(value, (list, tuple)):
            return [_check(f"{key}[{i}]", v, item_tp, source) for i, v in enumerate(value)]
    elif origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
    else:  # pragma: no cover - a dataclass field with an unsupported annotation
        raise TypeError(f"unsupported config type {tp!r} for key '{key}'")
    raise ConfigError(f"{source}: key '{key}' expects {_type_name(tp)}, got {value!r}")


def _check_choices(key: str, value: Any, choices: tuple | None, source: str) -> None:
    if not choices or value is None:
        return
    for item in value if isinstance(value, list) else [value]:
        if item not in choices:
            raise ConfigError(f"{source}: key '{key}' must be one of {', '.join(map(str, choices))}; "
                              f"got {item!r}")


def _merge(base: Any, update: Any) -> Any:
    """``update`` merged into ``base``, dict by dict; a Replace (``!replace``) is taken as it is."""
    if isinstance(base, dict) and isinstance(update, dict) and not isinstance(update, Replace):
        return {**base, **{k: _merge(base.get(k), v) for k, v in update.items()}}
    return _plain(update)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            data = parse_yaml(f) or {}  # plain YAML (and !replace) only: a Python tag is an error, never run
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
        tp, choices = fields[key]
        checked = _check(key, value, tp, source)
        _check_choices(key, checked, choices, source)
        values[key] = _merge(values[key], checked)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout (its commands) and widens the option column."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=32, width=100)


def option_help(f: dataclasses.Field) -> str:
    """The help line of one option: its text, its choices and its default (unless the text
    already says what the default is)."""
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    text = f.metadata.get("help", "")
    choices = f.metadata.get("choices")
    if choices:
        text += f" [{' | '.join(map(str, choices))}]"
    if isinstance(default, dict):
        text += f" (default: {{{', '.join(default)}: ...}})" if default else " (default: {})"
    elif "default" not in text:
        shown = ",".join(default) if isinstance(default, list) and all(isinstance(v, str) for v in default) else default
        text += f" (default: {shown!r})"
    return text.replace("%", "%%")


def _metavar(tp: Any) -> str:
    """STR, INT, FLOAT, BOOL, A,B (a list of strings) or YAML, for ``--help``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return _metavar(args[0])
    if typing.get_origin(tp) is list:
        return "A,B"
    names = {str: "STR", int: "INT", float: "FLOAT", bool: "BOOL"}
    return names.get(tp, "YAML")


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with ``--config`` and one ``--flag`` per dataclass field."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=_HelpFormatter,
        allow_abbrev=False,  # "--epoch" must not silently mean "--epochs"
    )
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML config file(s), applied in order after the defaults")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        is_bool = hints[f.name] is bool
        parser.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, default=argparse.SUPPRESS, metavar=_metavar(hints[f.name]),
            nargs="?" if is_bool else None, const="true" if is_bool else None,
            help=option_help(f),
        )
    return parser


def parse_config(cls: type, argv: list[str] | None = None, *, model_config: bool = False,
                 description: str | None = None):
    """Resolve ``cls`` from defaults, YAML files and flags (see the module docstring)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: (hints[f.name], f.metadata.get("choices")) for f in dataclasses.fields(cls)}
    parser = build_parser(cls, description)
    args = vars(parser.parse_args(argv))
    config_files = args.pop("config")
    flags = {}
    for key, raw in args.items():
        try:
            flags[key] = parse_yaml(raw) if raw.strip() else raw
        except yaml.YAMLError:
            flags[key] = raw
        if fields[key][0] is str and not isinstance(flags[key], str) and flags[key] is not None:
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
    text = yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
    files = getattr(cfg, "config_files", [])
    header = "# resolved config; from defaults" + "".join(f" < {p}" for p in files) + " < flags\n"
    atomic_write_text(path, header + text)


def run_command(main, cls: type, description: str | None = None, *, model_config: bool = False):
    """The entry point of every command: parse the config chain, run ``main(cfg)``. The kit's own
    errors (bad data, a bad config, a non-finite loss) end the command with ``error: <message>``
    and exit status 2, without a traceback (``KIT_TRACEBACK=1`` shows it)."""
    atexit.unregister(gc.freeze)  # once, however many commands one process runs (make demo's stages)
    atexit.register(gc.freeze)  # the exit's final collections skip torch's objects: about 1 s sooner
    try:
        return main(parse_config(cls, model_config=model_config, description=description))
    except (ConfigError, DataError, NonFiniteLoss, SearchFailed) as err:
        if os.environ.get("KIT_TRACEBACK"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
