"""The online augmentations by name, with their parameters and defaults, and the checks of a config's
``aug`` and ``category_aug`` against them: the data stage's vocabulary, without torch or OpenCV,
so that a command parses and checks its config before importing anything heavy.
``utils/data/transforms.py`` builds each one; ``utils/train/config.py`` offers them as options.
"""
from __future__ import annotations

from utils.errors import ConfigError

RESIZES = ("squash", "pad")
INTERPOLATIONS = ("area", "linear", "cubic")
DEFAULT_AUG = {
    "random_resized_crop": {"p": 1.0, "scale": [0.75, 1.0], "ratio": [0.8, 1.25]},
    "hflip": {"p": 0.5},
    "rotate": {"p": 0.0, "degrees": 10},
    "shear": {"p": 0.0, "degrees": 12},
    "perspective": {"p": 0.2, "scale": [0.02, 0.06]},
    "distort": {"p": 0.0, "limit": 0.15},
    "color_jitter": {"p": 0.5, "brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.02},
    "sharpen_blur": {"p": 0.0},
    "augmix": {"p": 0.0, "width": 3, "depth": [1, 3], "alpha": 1.0},
    "gauss_noise": {"p": 0.2, "std": [0.02, 0.06]},
    "coarse_dropout": {"p": 0.3, "holes": [1, 4], "size": [0.05, 0.15]},
    "neckline_crop": {"p": 0.0, "top": [0.0, 0.1], "height": [0.55, 0.8]},
}


def merge_aug(base: dict, override: dict | None) -> dict:
    """``base``'s settings with ``override``'s on top, augmentation by augmentation (a category's
    rules over ``aug``, ``aug`` over DEFAULT_AUG)."""
    out = {k: dict(v) for k, v in base.items()}
    for name, params in (override or {}).items():
        out[name] = {**out.get(name, DEFAULT_AUG[name]), **(params or {})}
    return out


def check_aug(aug: dict, where: str = "aug") -> None:
    """``aug`` names only known augmentations and parameters (a misspelt one would be ignored)."""
    if not isinstance(aug, dict):
        raise ConfigError(f"key '{where}' must map augmentation names to their settings, got {aug!r}")
    for name, params in aug.items():
        if name not in DEFAULT_AUG:
            raise ConfigError(f"key '{where}': unknown augmentation '{name}'; known: {', '.join(DEFAULT_AUG)}")
        if params is not None and not isinstance(params, dict):
            raise ConfigError(f"key '{where}': {name} takes a mapping of {', '.join(DEFAULT_AUG[name])}; got {params!r}")
        unknown = sorted(set(params or {}) - set(DEFAULT_AUG[name]))
        if unknown:
            raise ConfigError(f"key '{where}': {name} has no parameter {', '.join(unknown)}; it takes "
                              f"{', '.join(DEFAULT_AUG[name])}")


def check_category_aug(category_aug: dict, categories: list[str], source: str = "the data") -> None:
    """Every category that ``category_aug`` names is one of ``categories`` (a rule for a category the
    data lacks is a profile meant for another dataset)."""
    unknown = [c for c in category_aug if c not in categories]
    if unknown:
        raise ConfigError(f"key 'category_aug' has rules for categories {unknown} that {source} does not have; "
                          f"it has {list(categories)}. A profile made for another dataset (e.g. "
                          f"configs/visual_taxonomy.yaml) does not fit this one; drop it, or replace the rules "
                          f"whole: --category-aug '!replace {{}}'")
