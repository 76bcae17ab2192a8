import dataclasses
from typing import Optional

import pytest
import yaml

from utils.config import CommonConfig, parse_config, save_config
from utils.errors import ConfigError


@dataclasses.dataclass
class Demo(CommonConfig):
    model: str = "no_such_model_config"
    epochs: int = 3
    lr: float = 1e-3
    pretrained: bool = False
    weights: Optional[str] = None
    betas: list = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    aug: dict = dataclasses.field(default_factory=lambda: {"hflip": {"p": 0.5}, "noise": {"p": 0.2}})


def test_chain_defaults_then_yaml_then_flags(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text(yaml.safe_dump({"epochs": 5, "lr": 0.1, "aug": {"hflip": {"p": 0.0}}}))
    b = tmp_path / "b.yaml"
    b.write_text(yaml.safe_dump({"lr": 0.2}))
    cfg = parse_config(Demo, ["--config", str(a), "--config", str(b), "--epochs", "7",
                              "--pretrained", "true", "--weights", "w.pth", "--betas", "[0.8, 0.9]"])
    assert cfg.epochs == 7 and cfg.lr == 0.2 and cfg.pretrained is True
    assert cfg.weights == "w.pth" and cfg.betas == [0.8, 0.9]
    # a dict merges into the default: hflip changed, noise kept
    assert cfg.aug == {"hflip": {"p": 0.0}, "noise": {"p": 0.2}}
    assert parse_config(Demo, []).epochs == 3


def test_unknown_key_and_wrong_type_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epoch: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'epoch'.*epochs"):
        parse_config(Demo, ["--config", str(bad)])
    with pytest.raises(ConfigError, match=r"command line: key 'epochs' expects int, got 'three'"):
        parse_config(Demo, ["--epochs", "three"])
    with pytest.raises(ConfigError, match=r"key 'lr' expects float"):
        parse_config(Demo, ["--lr", "fast"])
    with pytest.raises(SystemExit):  # argparse refuses an undeclared flag
        parse_config(Demo, ["--no-such-flag", "1"])


def test_int_accepted_as_float_and_str_keeps_text():
    cfg = parse_config(Demo, ["--lr", "1", "--model", "0"])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.model == "0"


def test_resolved_config_is_saved_and_reloads(tmp_path):
    cfg = parse_config(Demo, ["--epochs", "9"])
    save_config(cfg, tmp_path / "config.yaml")
    again = parse_config(Demo, ["--config", str(tmp_path / "config.yaml")])
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


def test_abbreviated_flags_are_refused():
    with pytest.raises(SystemExit):
        parse_config(Demo, ["--epoch", "4"])  # not silently --epochs


def test_a_config_with_python_tags_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"epochs: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match=r"evil.yaml: not a plain YAML config .*python/object/apply:os.system"):
        parse_config(Demo, ["--config", str(evil)])
    assert not marker.exists()
