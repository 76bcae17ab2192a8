"""The seed's offline class balancing (``python augment.py``): grow under-represented classes with
augmented copies of their images, and write ``augmented_train.csv``.

Class proportions are computed per category (an attribute slot means different things in
different categories): the target is the mean class count of the (category, slot), and a class's
multiplier is target / count, capped at ``cap`` (3.0). Tiers, by multiplier:
  reaches the cap  -> basic + intermediate + advanced. (The seed writes "> 3.0" but also caps at
                      3.0, so its top rule could never fire; reaching the cap is the top tier here.)
  above 1.5        -> basic + intermediate
  otherwise        -> basic
Only under-represented classes (multiplier > 1) are augmented: a share ``aug_percentage`` of their
images is picked with ``DataFrame.sample`` (seeded), and each picked image yields
``max(1, round(multiplier - 1))`` copies, each through its tier's pipelines in turn.

With ``--attr all`` every slot is balanced at once: an image's multiplier is the largest over its
labels. An image carries labels for every head of its category, so common classes that co-occur
with rare ones grow too; the class counts after balancing are printed for every head, so the
effect can be read off.

Each copy gets a new id above every train and test id, its image is written to
``<out-dir>/train_images/``, and its row copies the source row's labels, with ``source_id`` naming
the source and ``image`` its file. train.py gives a copy its source's fold: copies of a validation
image are never trained on, and never scored. A re-run skips images already written; an unreadable
source image is reported by id and skipped.
"""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from utils.config import DataConfig, option
from utils.data.schema import ATTR_COLS, CATEGORY, ID, image_path, read_dataset
from utils.data.transforms import load_image, reseed
from utils.errors import ConfigError, DataError
from utils.io import atomic_path, atomic_write_csv

CAP = 3.0


@dataclass
class AugmentConfig(DataConfig):
    out_dir: str = option("runs/demo_aug", "where augmented_train.csv and train_images/ are written")
    attr: str = option("all", "the attribute slot to balance, or all of them", choices=tuple(ATTR_COLS) + ("all",))
    aug_percentage: float = option(0.5, "share of each under-represented class's images that get copies, in (0, 1]")
    cap: float = option(CAP, "largest class multiplier")
    seed: int = option(42, "seed of the image picks and of each copy's augmentation")
    workers: int = option(2, "processes writing images")
    progress: bool = option(True, "progress bar")

    def __post_init__(self):
        if not 0 < self.aug_percentage <= 1:
            raise ConfigError(f"key 'aug_percentage' must be in (0, 1], got {self.aug_percentage}")


def calculate_class_proportions(train: pd.DataFrame, attr: str, cap: float = CAP) -> pd.DataFrame:
    """Per (category, value) of one attribute slot: count, target (mean class count of the
    category's slot), multiplier = min(target / count, cap)."""
    rows = []
    for cat, group in train.groupby(CATEGORY, sort=True):
        counts = group[attr].dropna().value_counts()
        if counts.empty:
            continue
        target = counts.mean()
        for value, count in counts.items():
            rows.append({CATEGORY: cat, "attr": attr, "value": value, "count": int(count), "target": float(target),
                         "multiplier": float(min(target / count, cap))})
    return pd.DataFrame(rows, columns=[CATEGORY, "attr", "value", "count", "target", "multiplier"])


def tier(multiplier: float, cap: float = CAP) -> list[str]:
    if multiplier >= cap:
        return ["basic", "intermediate", "advanced"]
    if multiplier > 1.5:
        return ["basic", "intermediate"]
    return ["basic"]


def pipelines(height: int, width: int) -> dict:
    crop = (max(1, int(height * 0.9)), max(1, int(width * 0.9)))
    return {
        "basic": A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5),
                            A.RandomCrop(height=crop[0], width=crop[1], p=0.5), A.RandomRotate90(p=0.5)]),
        "intermediate": A.Compose([A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.8),
                                   A.Affine(translate_percent=(-0.06, 0.06), scale=(0.9, 1.1), rotate=(-15, 15),
                                            border_mode=cv2.BORDER_REFLECT_101, p=0.8)]),
        "advanced": A.Compose([A.CoarseDropout(num_holes_range=(1, 4), hole_height_range=(0.05, 0.15),
                                               hole_width_range=(0.05, 0.15), fill=0, p=0.7),
                               A.ElasticTransform(alpha=30, sigma=6, p=0.5), A.GridDistortion(p=0.5)]),
    }


def image_multipliers(train: pd.DataFrame, attrs: list[str], cap: float) -> pd.Series:
    """Each image's multiplier: the largest over its labels in ``attrs``, floored at 1.0 (an image
    whose classes are all common is not under-represented)."""
    best = pd.Series(1.0, index=train.index)
    for attr in attrs:
        props = calculate_class_proportions(train, attr, cap)
        lookup = {(c, v): m for c, v, m in zip(props[CATEGORY], props["value"], props["multiplier"])}
        m = pd.Series([lookup.get((c, v), 1.0) for c, v in zip(train[CATEGORY], train[attr])], index=train.index)
        best = np.maximum(best, m)
    return best


def plan(train: pd.DataFrame, attrs: list[str], aug_percentage: float, cap: float, seed: int,
         first_id: int) -> pd.DataFrame:
    """The copies to make: one row per copy, with its new id, source id, multiplier and tiers."""
    mult = image_multipliers(train, attrs, cap)
    under = train[mult > 1.0].assign(multiplier=mult[mult > 1.0])
    # pick aug_percentage of each category's under-represented images, seeded
    picked = (under.groupby(CATEGORY, group_keys=False, sort=True)
              .apply(lambda g: g.sample(frac=aug_percentage, random_state=seed))) if len(under) else under
    picked = picked.sort_values(ID)
    rows = []
    for _, src in picked.iterrows():
        for _ in range(max(1, int(round(src["multiplier"] - 1)))):
            rows.append({"new_id": first_id + len(rows), "source_id": int(src[ID]),
                         "multiplier": float(src["multiplier"]), "tiers": "+".join(tier(src["multiplier"], cap))})
    return pd.DataFrame(rows, columns=["new_id", "source_id", "multiplier", "tiers"])


def _make_copy(job) -> tuple[int, str]:
    """Write one augmented image; returns (new_id, error or '')."""
    new_id, src_path, dst_path, tiers, seed = job
    if dst_path.exists():  # a re-run skips what is already written
        return new_id, ""
    try:
        image = load_image(src_path)
    except Exception as err:
        return new_id, f"{type(err).__name__}: {err}"
    pipes = pipelines(*image.shape[:2])
    for k, name in enumerate(tiers.split("+")):
        reseed(pipes[name], seed * 4 + k)  # each tier draws its own numbers
        image = pipes[name](image=image)["image"]
    with atomic_path(dst_path) as tmp:
        Image.fromarray(image).save(tmp, format="JPEG", quality=92)
    return new_id, ""


def class_counts(train: pd.DataFrame, attrs: list[str]) -> pd.DataFrame:
    rows = []
    for attr in attrs:
        for (cat, value), n in train.groupby([CATEGORY, attr]).size().items():
            rows.append({CATEGORY: cat, "attr": attr, "value": value, "count": int(n)})
    return pd.DataFrame(rows)


def write_copies(copies: pd.DataFrame, train_images: Path, out: Path, seed: int, workers: int,
                 progress: bool) -> dict:
    """Write every planned copy's image (skipping those already written); {new_id: error}."""
    jobs = [(n, image_path(train_images, s), out / "train_images" / f"{n:06d}.jpg", t, seed * 1_000_003 + n)
            for n, s, t in zip(copies["new_id"], copies["source_id"], copies["tiers"])]
    errors = {}
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for new_id, error in tqdm(pool.map(_make_copy, jobs, chunksize=8), total=len(jobs), desc="augment",
                                  disable=not progress):
            if error:
                errors[new_id] = error
    source_of = dict(zip(copies["new_id"], copies["source_id"]))
    for new_id, error in errors.items():
        print(f"source image of id {source_of[new_id]} could not be read ({error}); its copy is skipped")
    return errors


def augmented_table(train: pd.DataFrame, made: pd.DataFrame) -> pd.DataFrame:
    """The original rows (their own source) and one row per copy, with ``source_id`` and ``image``."""
    src = train.set_index(ID).loc[made["source_id"]].reset_index()
    augmented = src.assign(**{ID: made["new_id"].to_numpy(), "source_id": made["source_id"].to_numpy(),
                              "image": [f"train_images/{n:06d}.jpg" for n in made["new_id"]]})
    originals = train.assign(source_id=train[ID], image=np.nan)
    return pd.concat([originals, augmented], ignore_index=True)[[ID, CATEGORY, "len"] + ATTR_COLS + ["source_id", "image"]]


def print_counts(train: pd.DataFrame, table: pd.DataFrame, attrs: list[str]) -> None:
    before, after = class_counts(train, attrs), class_counts(table, attrs)
    counts = before.merge(after, on=[CATEGORY, "attr", "value"], suffixes=("_before", "_after"))
    counts["growth"] = counts["count_after"] / counts["count_before"]
    per_cat = pd.DataFrame({"before": train[CATEGORY].value_counts(), "after": table[CATEGORY].value_counts()})
    with pd.option_context("display.width", 140, "display.max_rows", 400, "display.float_format", "{:.2f}".format):
        print("\nrows per category\n" + per_cat.to_string())
        print("\nclass counts per (category, slot) before and after\n" + counts.to_string(index=False))


def balance(cfg: AugmentConfig) -> pd.DataFrame:
    """What ``python augment.py`` does: plan the copies, write their images, write the table."""
    data = read_dataset(cfg.data_dir)
    train = data.train
    if "source_id" in train:
        raise DataError(f"{cfg.data_dir}: train.csv is already augmented (has source_id)")
    slots = max(len(a) for a in data.category_attrs.values())
    if cfg.attr != "all" and ATTR_COLS.index(cfg.attr) >= slots:
        raise ConfigError(f"key 'attr': {cfg.attr} is past every category's attributes; the data's categories have "
                          f"at most {slots} ({', '.join(ATTR_COLS[:slots])})")
    attrs = ATTR_COLS[:slots] if cfg.attr == "all" else [cfg.attr]
    out = Path(cfg.out_dir)
    (out / "train_images").mkdir(parents=True, exist_ok=True)
    first_id = int(max(train[ID].max(), data.test[ID].max() if len(data.test) else -1)) + 1
    copies = plan(train, attrs, cfg.aug_percentage, cfg.cap, cfg.seed, first_id)
    errors = write_copies(copies, data.train_images, out, cfg.seed, cfg.workers, cfg.progress)
    made = copies[~copies["new_id"].isin(errors)]
    table = augmented_table(train, made)
    atomic_write_csv(out / "augmented_train.csv", table)
    print_counts(train, table, attrs)
    print(f"\n{len(made)} augmented images ({len(errors)} skipped); {len(table)} rows in {out / 'augmented_train.csv'}")
    return table

