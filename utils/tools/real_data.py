"""A real-photo dataset in the competition layout: Zalando's Fashion-MNIST product photos, with
categories and attributes of their own, and the official test photos held out with their labels.

    python -m utils.tools.real_data --out data/real                   # 4,000 train, 2,000 test photos

The photos (28 x 28 grey, ten classes; MIT licence) are read from the first place that has the
four idx files: ``--source``, Debian's package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``), or torchvision's download into ``data/fashion-mnist``
(needs internet); else the error says how to get them. The ten classes become three categories with
one attribute each:

    Tops              garment    t-shirt, pullover, dress, coat, shirt
    Footwear          style      sandal, sneaker, ankle boot
    Trousers & Bags   item       trouser, bag

``missing`` of the train labels are left empty at random, as the competition leaves many labels
out. Train photos come from the official train split, test photos from the official test split
(their labels in ``test_solution.csv``, for scoring only). Deterministic for a seed.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from utils.config import option, run_command
from utils.data.schema import ATTR_COLS, CATEGORY, ID, LEN
from utils.errors import DataError
from utils.io import atomic_path
from utils.tools.demo_data import build_record, write_tables

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# Fashion-MNIST's ten classes, by label, as (category, attribute value)
CLASSES = [("Tops", "t-shirt"), ("Trousers & Bags", "trouser"), ("Tops", "pullover"), ("Tops", "dress"),
           ("Tops", "coat"), ("Footwear", "sandal"), ("Tops", "shirt"), ("Footwear", "sneaker"),
           ("Trousers & Bags", "bag"), ("Footwear", "ankle boot")]
CATEGORY_ATTRS = {"Tops": ["garment"], "Footwear": ["style"], "Trousers & Bags": ["item"]}


def _idx(path: Path) -> np.ndarray:
    """An idx file (gzipped or not) as a uint8 array: [N] labels or [N, 28, 28] images."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def find_source(source: str | None) -> Path:
    """The folder holding the four idx files: ``source``, Debian's package, or torchvision's download."""
    def complete(folder: Path) -> bool:
        return all(any((folder / f"{name}{ext}").is_file() for ext in ("", ".gz"))
                   for pair in FILES.values() for name in pair)

    for folder in [Path(source)] if source else [DEBIAN, Path("data/fashion-mnist/FashionMNIST/raw")]:
        if complete(folder):
            return folder
    if source:
        raise DataError(f"{source}: the Fashion-MNIST idx files ({', '.join(sum(FILES.values(), ()))}, gzipped or "
                        f"not) are not all there")
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST("data/fashion-mnist", train=True, download=True)
        FashionMNIST("data/fashion-mnist", train=False, download=True)
    except Exception as err:  # no network: many error types
        raise DataError(
            f"the Fashion-MNIST photos were not found and could not be downloaded ({type(err).__name__}). Get them "
            f"with `apt-get install dataset-fashion-mnist` (Debian and Ubuntu: {DEBIAN}), or download the four "
            f"idx files from Zalando's fashion-mnist repository into a folder and pass --source FOLDER") from None
    return Path("data/fashion-mnist/FashionMNIST/raw")


def read_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = (_idx(next(p for p in (folder / f"{n}.gz", folder / n) if p.is_file())) for n in FILES[split])
    return images, labels


def sample(labels: np.ndarray, n: int, rng: np.random.Generator, where: str = "the split") -> np.ndarray:
    """``n`` indices, the same share of each class, in random order; a class with too few photos
    for its share is an error naming it (``where``: the split, for the message)."""
    need = [n // 10 + (c < n % 10) for c in range(10)]
    have = np.bincount(labels, minlength=10)
    short = [f"class {c} ({CLASSES[c][1]}): {have[c]} photos, {need[c]} needed" for c in range(10) if have[c] < need[c]]
    if short:
        raise DataError(f"{where} has too few photos of some classes for {n} (a tenth of them each): "
                        f"{'; '.join(short)}. Ask for fewer, or use a source with more photos")
    per_class = [rng.permutation(np.flatnonzero(labels == c))[: need[c]] for c in range(10)]
    return rng.permutation(np.concatenate(per_class))


def rows(labels: np.ndarray, ids: np.ndarray) -> pd.DataFrame:
    """Rows in the submission layout for these class labels."""
    df = pd.DataFrame({ID: ids, CATEGORY: [CLASSES[c][0] for c in labels]})
    df[LEN] = 1
    df[ATTR_COLS[0]] = [CLASSES[c][1] for c in labels]
    for col in ATTR_COLS[1:]:
        df[col] = np.nan
    return df


def build(out: str | Path, source: str | None = None, n_train: int = 4000, n_test: int = 2000,
          missing: float = 0.15, seed: int = 0, progress: bool = True) -> Path:
    """Write the dataset into ``out``. Building into a folder again gives what a fresh build gives:
    with the same options an interrupted build goes on, with others every photo is written anew
    (``build.json`` records the options; utils.tools.demo_data.build_record)."""
    out, folder = Path(out), find_source(source)
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):  # every check before a file changes
        images, labels = read_split(folder, split)
        if n > len(labels):
            raise DataError(f"--n-{split} {n}: the official {split} split has {len(labels)} photos")
        splits[split] = images, labels, sample(labels, n, rng, f"the official {split} split in {folder}")
    recipe = {"generator": "fashion-mnist", "source": str(folder.resolve()), "n_train": n_train, "n_test": n_test,
              "missing": missing, "seed": seed}
    with build_record(out, recipe):
        tables = {}
        for split, (images, labels, pick) in splits.items():
            (out / f"{split}_images").mkdir(parents=True, exist_ok=True)
            for i, k in enumerate(tqdm(pick, desc=f"{split} photos", disable=not progress)):
                path = out / f"{split}_images" / f"{i:06d}.jpg"
                if not path.exists():  # (build_record removed another build's photos)
                    with atomic_path(path) as tmp:
                        Image.fromarray(images[k]).save(tmp, format="JPEG", quality=95)
            tables[split] = rows(labels[pick], np.arange(len(pick)))
        train = tables["train"]
        train.loc[rng.random(len(train)) < missing, ATTR_COLS[0]] = np.nan
        write_tables(out, CATEGORY_ATTRS, train, tables["test"])
    return out


@dataclass
class RealDataConfig:
    out: str = option("data/real", "the dataset folder to write")
    source: str | None = option(None, "a folder with the four Fashion-MNIST idx files (default: Debian's "
                                      "package, else torchvision's download)")
    n_train: int = option(4000, "train photos, from the official train split")
    n_test: int = option(2000, "test photos, from the official test split (labels in test_solution.csv)")
    missing: float = option(0.15, "share of train labels left empty at random")
    seed: int = option(0, "the same seed gives the same dataset")


def main(cfg: RealDataConfig) -> None:
    out = build(cfg.out, cfg.source, cfg.n_train, cfg.n_test, cfg.missing, cfg.seed)
    print(f"real-photo dataset written to {out} ({cfg.n_train} train, {cfg.n_test} test photos)")


if __name__ == "__main__":
    run_command(main, RealDataConfig, __doc__)
