"""Image decoding, sizing, the one transform factory, and normalisation: the pixels of training,
validation, OOF and inference.

An image goes through four steps, each defined once here and chosen by a ``Preprocess``:
``decode`` (a JPEG at a reduced DCT scale when the size allows), ``size`` (deterministic: the
resize policy, ``squash`` to a square as the seed did, or ``pad`` to a square keeping the aspect
ratio; a decoded and sized image is what the decode cache keeps), ``transform(...)`` (a callable
``(pixels, category, seed) -> uint8 [3, S, S]``: for training the online augmentations, for
evaluation nothing), and ``normalize`` (with the backbone's own mean/std, on a whole batch where
it is used: loaders carry a quarter of float32's bytes between processes and to a GPU).
Evaluation uses the same decoding, sizing and normalisation as training, nothing else, so
preprocessing cannot drift between training and inference.

Augmentations are named in the config (``aug``) with their parameters; ``p: 0`` switches one off.
``category_aug`` overrides them per category (the seed's category-aware augmentations): empty by
default, since category names belong to a dataset; the competition's rules are in its profile,
``configs/visual_taxonomy.yaml``. Hue is kept small everywhere on purpose: a hue shift changes the
colour label.
"""
from __future__ import annotations

import functools
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from PIL import Image

from utils.data.augmentations import DEFAULT_AUG
from utils.data.augmentations import INTERPOLATIONS as INTERPOLATION_NAMES
from utils.data.augmentations import check_aug, check_category_aug, merge_aug

# DEFAULT_AUG (every augmentation and its parameters): utils/data/augmentations.py, torch-free
INTERPOLATIONS = dict(zip(INTERPOLATION_NAMES, (cv2.INTER_AREA, cv2.INTER_LINEAR, cv2.INTER_CUBIC)))


@dataclass(frozen=True)
class Preprocess:
    """Every choice that changes the pixels a model sees. Training stores it in each checkpoint
    (and export in each ONNX file); validation, OOF, export parity and inference all rebuild
    their decoding, sizing, transform and normalisation from it, so they see exactly the pixels
    training validated on."""

    img_size: int
    mean: tuple
    std: tuple
    resize: str = "squash"  # squash to a square, or pad keeping the aspect ratio
    draft: bool = True  # JPEG decoded at a reduced DCT scale when the target size allows
    interpolation: str = "area"

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(**d)

    def decode(self, path: str | Path) -> np.ndarray:
        """The image as RGB uint8, decoded as training decoded it; raises when unreadable."""
        return load_image(path, self.img_size if self.draft else None, self.resize)

    def size(self, image: np.ndarray) -> np.ndarray:
        """A decoded image resized (and, with ``pad``, padded) to the model's S x S input."""
        return sizer(self.img_size, self.resize, self.interpolation)(image=image)["image"]

    def normalize(self, pixels):
        """uint8 pixels [..., 3, H, W] (a tensor, on any device, or an array) -> the model's float32
        input: ``(x - 255 mean) / (255 std)`` per channel. The one normalisation of the kit."""
        if isinstance(pixels, np.ndarray):
            return self.normalize(torch.from_numpy(pixels)).numpy()
        if pixels.dtype != torch.uint8:
            raise TypeError(f"normalize takes uint8 pixels, got {pixels.dtype}")
        mean, inv = normalizer(self.mean, self.std, pixels.device)
        return pixels.to(torch.float32).sub_(mean).mul_(inv)  # elementwise: the memory format is kept

    def transform(self, train: bool = False, aug: dict | None = None, category_aug: dict | None = None,
                  categories: list[str] | None = None) -> "Transform":
        return build_transform(self.img_size, self.resize, train=train, aug=aug,
                               category_aug=category_aug, categories=categories,
                               interpolation=self.interpolation)

    def __call__(self, path: str | Path) -> np.ndarray:
        """Decode, size, apply the evaluation transform and normalise: float32 [3, S, S]."""
        return self.normalize(self.transform()(self.size(self.decode(path))))


@functools.lru_cache(maxsize=None)
def normalizer(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(255 mean, 1 / (255 std)) as [3, 1, 1] float32 on ``device``: made once per device, so a
    CUDA step does not copy (and wait for) them at every batch."""
    shape = (3, 1, 1)
    return (torch.tensor([255.0 * m for m in mean], dtype=torch.float32, device=device).view(shape),
            torch.tensor([1 / (255.0 * s) for s in std], dtype=torch.float32, device=device).view(shape))


# ----------------------------------------------------------------------------- decoding

def load_image(path: str | Path, size: int | None = None, resize: str = "squash") -> np.ndarray:
    """Decode an image to RGB uint8 [H, W, 3]. With ``size``, a JPEG is decoded at the smallest
    DCT scale (1/2, 1/4, 1/8) that still covers the target size (PIL draft mode): much faster, and
    nothing is lost because the image is downscaled to ``size`` anyway. Raises on a missing or
    unreadable file; callers decide what a bad image means."""
    with Image.open(path) as img:
        if size is not None and img.format == "JPEG":
            w, h = img.size
            if resize == "squash":
                want = (size, size)
            else:  # pad: the longest side becomes `size`
                m = max(w, h)
                want = (math.ceil(size * w / m), math.ceil(size * h / m))
            img.draft("RGB", want)
        img = img.convert("RGB")
        return np.asarray(img)


# ----------------------------------------------------------------------------- custom transforms

class AugMix(A.ImageOnlyTransform):
    """AugMix (Hendrycks et al., 2020): ``width`` chains of 1..``depth`` random ops, mixed with
    Dirichlet weights, then blended with the original by a Beta(alpha, alpha) weight. The ops are
    geometric and contrast-only: colour-changing ops (solarize, posterize) would corrupt the colour
    label."""

    OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y", "autocontrast",
           "equalize", "sharpness")

    def __init__(self, width: int = 3, depth=(1, 3), alpha: float = 1.0, p: float = 0.5):
        super().__init__(p=p)
        self.width, self.depth, self.alpha = width, tuple(depth), alpha

    def _op(self, img: np.ndarray, name: str, rng: np.random.Generator) -> np.ndarray:
        h, w = img.shape[:2]
        m = rng.uniform(0.1, 1.0)  # severity
        if name == "rotate":
            M = cv2.getRotationMatrix2D((w / 2, h / 2), rng.choice([-1, 1]) * 20 * m, 1.0)
        elif name in ("shear_x", "shear_y"):
            s = rng.choice([-1, 1]) * 0.2 * m
            M = np.float32([[1, s, 0], [0, 1, 0]]) if name == "shear_x" else np.float32([[1, 0, 0], [s, 1, 0]])
        elif name in ("translate_x", "translate_y"):
            t = rng.choice([-1, 1]) * 0.15 * m
            M = np.float32([[1, 0, t * w], [0, 1, 0]]) if name == "translate_x" else np.float32([[1, 0, 0], [0, 1, t * h]])
        elif name == "autocontrast":
            lo, hi = img.min(axis=(0, 1), keepdims=True), img.max(axis=(0, 1), keepdims=True)
            return ((img - lo) * (255.0 / np.maximum(hi - lo, 1))).astype(np.uint8)
        elif name == "equalize":
            return np.stack([cv2.equalizeHist(np.ascontiguousarray(img[..., c])) for c in range(3)], -1)
        else:  # sharpness
            blur = cv2.GaussianBlur(img, (0, 0), 1.0)
            return np.clip(img + m * (img.astype(np.float32) - blur), 0, 255).astype(np.uint8)
        return cv2.warpAffine(img, M, (w, h), borderMode=cv2.BORDER_REFLECT_101)

    def apply(self, img, **params):
        rng = self.random_generator
        ws = rng.dirichlet([self.alpha] * self.width)
        mixed = np.zeros(img.shape, dtype=np.float32)
        for wi in ws:
            chain = img
            for _ in range(int(rng.integers(self.depth[0], self.depth[1] + 1))):
                chain = self._op(chain, self.OPS[int(rng.integers(len(self.OPS)))], rng)
            mixed += wi * chain.astype(np.float32)
        m = rng.beta(self.alpha, self.alpha)
        return np.clip((1 - m) * img + m * mixed, 0, 255).astype(np.uint8)

    def get_transform_init_args_names(self):
        return ("width", "depth", "alpha")


class NecklineCrop(A.ImageOnlyTransform):
    """A random crop of the upper part of the garment (the neckline and yoke, where kurtis carry
    embroidery), keeping the full width: rows from ``top`` to ``top + height`` (fractions of H)."""

    def __init__(self, top=(0.0, 0.1), height=(0.55, 0.8), p: float = 0.25):
        super().__init__(p=p)
        self.top, self.height = tuple(top), tuple(height)

    def apply(self, img, **params):
        h = img.shape[0]
        rng = self.random_generator
        y0 = int(h * rng.uniform(*self.top))
        y1 = min(h, y0 + max(1, int(h * rng.uniform(*self.height))))
        return np.ascontiguousarray(img[y0:y1])

    def get_transform_init_args_names(self):
        return ("top", "height")


# ----------------------------------------------------------------------------- the factory

def _augmentations(aug: dict, size: int) -> tuple[list, list]:
    """(transforms that crop the sized image and size it again, transforms after them) for one
    category's settings."""
    on = lambda name: aug[name]["p"] > 0
    before, after = [], []
    if on("neckline_crop"):
        c = aug["neckline_crop"]
        before.append(NecklineCrop(c["top"], c["height"], p=c["p"]))
    if on("random_resized_crop"):
        c = aug["random_resized_crop"]
        after.append(A.RandomResizedCrop(size=(size, size), scale=tuple(c["scale"]),
                                         ratio=tuple(c["ratio"]), p=c["p"]))
    if on("hflip"):
        after.append(A.HorizontalFlip(p=aug["hflip"]["p"]))
    if on("rotate"):
        c = aug["rotate"]
        after.append(A.Affine(rotate=(-c["degrees"], c["degrees"]), border_mode=cv2.BORDER_REFLECT_101, p=c["p"]))
    if on("shear"):
        c = aug["shear"]
        after.append(A.Affine(shear=(-c["degrees"], c["degrees"]), border_mode=cv2.BORDER_REFLECT_101, p=c["p"]))
    if on("perspective"):
        c = aug["perspective"]
        after.append(A.Perspective(scale=tuple(c["scale"]), p=c["p"]))
    if on("distort"):
        c = aug["distort"]
        after.append(A.GridDistortion(distort_limit=c["limit"], p=c["p"]))
    if on("color_jitter"):
        c = aug["color_jitter"]
        after.append(A.ColorJitter(brightness=c["brightness"], contrast=c["contrast"],
                                   saturation=c["saturation"], hue=c["hue"], p=c["p"]))
    if on("sharpen_blur"):
        after.append(A.OneOf([A.Sharpen(p=1.0), A.GaussianBlur(sigma_limit=(0.3, 1.2), p=1.0)],
                             p=aug["sharpen_blur"]["p"]))
    if on("augmix"):
        c = aug["augmix"]
        after.append(AugMix(c["width"], c["depth"], c["alpha"], p=c["p"]))
    if on("gauss_noise"):
        c = aug["gauss_noise"]
        after.append(A.GaussNoise(std_range=tuple(c["std"]), p=c["p"]))
    if on("coarse_dropout"):
        c = aug["coarse_dropout"]
        after.append(A.CoarseDropout(num_holes_range=tuple(c["holes"]), hole_height_range=tuple(c["size"]),
                                     hole_width_range=tuple(c["size"]), fill=0, p=c["p"]))
    return before, after


def reseed(pipeline: A.BaseCompose, seed: int) -> None:
    """Seed ``pipeline`` with one generator pair that its transforms draw from in turn.
    albumentations' own ``set_random_seed`` gives every transform a generator seeded alike, so all
    draw the same first number and a transform of p 0.2 would apply only together with every one
    of p >= 0.2; it also costs a quarter of the augmentation's time (two generators per transform)."""
    pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))


class Transform:
    """``(sized pixels uint8 [S, S, 3], category, seed) -> uint8 [3, S, S]``; picklable for
    loader workers."""

    def __init__(self, pipelines: dict, default):
        self.pipelines, self.default = pipelines, default

    def __call__(self, image: np.ndarray, category: str | None = None, seed: int | None = None) -> np.ndarray:
        pipeline = self.pipelines.get(category, self.default)
        if seed is not None:  # per-sample seeds make augmentation independent of worker layout
            reseed(pipeline, seed)
        if pipeline.transforms:  # evaluation has none
            image = pipeline(image=image)["image"]
        return np.ascontiguousarray(image.transpose(2, 0, 1))


def sizing(img_size: int, resize: str = "squash", interpolation: str = "area") -> list:
    """The deterministic resize to S x S (``Preprocess.size``), as albumentations transforms."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}")
    inter = INTERPOLATIONS[interpolation]
    if resize == "squash":
        return [A.Resize(img_size, img_size, interpolation=inter)]
    if resize == "pad":
        return [A.LongestMaxSize(max_size=img_size, interpolation=inter),
                A.PadIfNeeded(img_size, img_size, border_mode=cv2.BORDER_CONSTANT, fill=0)]
    raise ValueError(f"resize must be 'squash' or 'pad', got {resize!r}")


@functools.lru_cache(maxsize=None)
def sizer(img_size: int, resize: str, interpolation: str) -> A.Compose:
    return A.Compose(sizing(img_size, resize, interpolation))


def build_transform(img_size: int, resize: str = "squash", train: bool = False,
                    aug: dict | None = None, category_aug: dict | None = None,
                    categories: list[str] | None = None, interpolation: str = "area") -> Transform:
    """The transform of sized pixels: for training, the augmentations (a crop taken before the
    sizing, ``neckline_crop``, is sized again after it); for evaluation, none."""
    resized = sizing(img_size, resize, interpolation)

    def compose(settings: dict | None):
        before, after = _augmentations(settings, img_size) if settings else ([], [])
        return A.Compose(before + (resized if before else []) + after)

    if not train:
        return Transform({}, compose(None))
    check_aug(aug or {})
    check_category_aug(category_aug or {}, categories or [])
    base = merge_aug(DEFAULT_AUG, aug or {})
    per_cat = {}
    for cat in categories or []:
        check_aug((category_aug or {}).get(cat, {}), f"category_aug[{cat}]")
        per_cat[cat] = compose(merge_aug(base, (category_aug or {}).get(cat, {})))
    return Transform(per_cat, compose(base))
