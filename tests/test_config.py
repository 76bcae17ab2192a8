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


def test_int_accepted_as_float_and_str_keeps_text(tmp_path):
    cfg = parse_config(Demo, ["--lr", "1", "--model", "0"])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.model == "0"
    # 1e-3 without a dot is text to YAML 1.1; a float key takes it, from a flag as from a file
    assert parse_config(Demo, ["--lr", "3e-4"]).lr == 3e-4
    assert parse_config(Demo, ["--config", str(_write(tmp_path / "lr.yaml", "lr: 5E-5\n"))]).lr == 5e-5
    with pytest.raises(ConfigError, match=r"key 'lr' expects float, got 'nan-ish'"):
        parse_config(Demo, ["--lr", "nan-ish"])


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


def test_a_dict_tagged_replace_replaces_instead_of_merging(tmp_path):
    """One syntax, in a file and on the command line, at any depth: ``!replace``."""
    profile = tmp_path / "profile.yaml"
    profile.write_text("aug: {hflip: {p: 0.0}, crop: {p: 1.0}}\n")
    merged = parse_config(Demo, ["--config", str(profile)])
    assert merged.aug == {"hflip": {"p": 0.0}, "noise": {"p": 0.2}, "crop": {"p": 1.0}}
    replaced = parse_config(Demo, ["--config", str(profile), "--aug", "!replace {}"])
    assert replaced.aug == {}
    whole = tmp_path / "whole.yaml"
    whole.write_text("aug: !replace {noise: {p: 0.5}}\n")
    assert parse_config(Demo, ["--config", str(profile), "--config", str(whole)]).aug == {"noise": {"p": 0.5}}
    nested = parse_config(Demo, ["--aug", "{hflip: !replace {q: 1}}"])
    assert nested.aug == {"hflip": {"q": 1}, "noise": {"p": 0.2}}
    assert type(nested.aug["hflip"]) is dict  # plain again: the resolved config is plain YAML
    save_config(nested, tmp_path / "config.yaml")
    assert "!replace" not in (tmp_path / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"not a plain YAML config"):  # !replace tags a mapping only
        parse_config(Demo, ["--config", str(_write(tmp_path / "bad.yaml", "epochs: !replace 3\n"))])


def _write(path, text):
    path.write_text(text)
    return path


def test_no_train_default_names_the_competitions_data():
    """Category rules belong in a profile (configs/visual_taxonomy.yaml), not in a default."""
    import json

    from utils.tools.demo_data import COUNTS
    from utils.train.config import TrainConfig

    defaults = json.dumps(dataclasses.asdict(TrainConfig()))
    assert TrainConfig().category_aug == {}
    assert not [name for name in COUNTS if name in defaults]
    profile = parse_config(TrainConfig, ["--config", "configs/visual_taxonomy.yaml"])
    assert set(profile.category_aug) == {"Sarees", "Men Tshirts", "Women Tshirts", "Kurtis"}
    assert profile.category_aug["Kurtis"] == {"neckline_crop": {"p": 0.25}}


def test_augmentation_names_and_parameters_are_checked_when_parsed():
    from utils.train.config import TrainConfig

    with pytest.raises(ConfigError, match=r"key 'aug': unknown augmentation 'hflp'; known: random_resized_crop"):
        parse_config(TrainConfig, ["--aug", "{hflp: {p: 0}}"])
    with pytest.raises(ConfigError, match=r"key 'aug': hflip has no parameter prob; it takes p$"):
        parse_config(TrainConfig, ["--aug", "{hflip: {prob: 0.3}}"])
    with pytest.raises(ConfigError, match=r"key 'category_aug\[Bags\]': unknown augmentation 'zoom'"):
        parse_config(TrainConfig, ["--category-aug", "{Bags: {zoom: {p: 1}}}"])
    with pytest.raises(ConfigError, match=r"key 'category_aug\[Bags\]': rotate takes a mapping of p, degrees; got 0.3"):
        parse_config(TrainConfig, ["--category-aug", "{Bags: {rotate: 0.3}}"])


def test_head_combinations_that_cannot_train_are_refused_when_parsed():
    from utils.train.config import TrainConfig

    with pytest.raises(ConfigError, match=r"key 'head': knn votes over cached embeddings; it needs frozen_backbone"):
        TrainConfig(head="knn")
    with pytest.raises(ConfigError, match=r"key 'ema_decay': a kNN head trains nothing to average"):
        TrainConfig(head="knn", frozen_backbone=True, ema_decay=0.99)
    with pytest.raises(ConfigError, match=r"key 'teacher': a kNN head has nothing to train"):
        TrainConfig(head="knn", frozen_backbone=True, teacher="runs/x/ensemble.json")
    assert TrainConfig(head="knn", frozen_backbone=True).head == "knn"
