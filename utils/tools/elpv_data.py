"""A second real dataset, of another domain, in the competition layout: electroluminescence images of
solar cells (the ELPV dataset: 2,624 grey 300 x 300 cells cut from module photos, each graded by
experts for defects), for benchmarks on data the kit was not shaped on.

    pip install elpv-dataset        # not a requirement of the kit: the images ship in this wheel (89 MB)
    python -m utils.tools.elpv_data --out data/elpv

The two cell types are the categories, each with one attribute, the defect grade:

    mono    defect    none, possible, likely, certain
    poly    defect    none, possible, likely, certain

(the dataset's probabilities 0, 1/3, 2/3 and 1). A quarter of the cells, stratified by type and
grade, is held out as the test set, its labels in ``test_solution.csv``. The images are written as
they are (grey, 300 px). Licence of the images: CC BY-NC-SA 4.0 (Buerhop-Lutz et al., Deitsch et
al.; https://github.com/zae-bayern/elpv-dataset). Deterministic for a seed.
"""
from __future__ import annotations

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

GRADES = ("none", "possible", "likely", "certain")
CATEGORY_ATTRS = {"mono": ["defect"], "poly": ["defect"]}


def load() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images [N, 300, 300] uint8, grade index [N], type [N]) from the elpv-dataset wheel."""
    try:
        from elpv_dataset.utils import load_dataset
    except ImportError:
        raise DataError("the ELPV images are not installed: pip install elpv-dataset (an 89 MB wheel of "
                        "PyPI; a benchmark's data, not a requirement of the kit)") from None
    images, probs, types = load_dataset()
    return images, np.rint(probs * 3).astype(int), np.asarray(types)


def split(grades: np.ndarray, types: np.ndarray, test_share: float, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask of the test cells: ``test_share`` of every (type, grade) stratum."""
    test = np.zeros(len(grades), dtype=bool)
    for key in sorted(set(zip(types, grades))):
        members = rng.permutation(np.flatnonzero((types == key[0]) & (grades == key[1])))
        test[members[: round(len(members) * test_share)]] = True
    return test


def build(out: str | Path, test_share: float = 0.25, seed: int = 0, progress: bool = True) -> Path:
    out = Path(out)
    images, grades, types = load()
    rng = np.random.default_rng(seed)
    is_test = split(grades, types, test_share, rng)
    with build_record(out, {"generator": "elpv", "test_share": test_share, "seed": seed}):
        tables = {}
        for name, mask in (("train", ~is_test), ("test", is_test)):
            (out / f"{name}_images").mkdir(parents=True, exist_ok=True)
            picks = rng.permutation(np.flatnonzero(mask))
            for i, k in enumerate(tqdm(picks, desc=f"{name} cells", disable=not progress)):
                path = out / f"{name}_images" / f"{i:06d}.jpg"
                if not path.exists():
                    with atomic_path(path) as tmp:
                        Image.fromarray(images[k]).save(tmp, format="JPEG", quality=95)
            df = pd.DataFrame({ID: np.arange(len(picks)), CATEGORY: types[picks], LEN: 1,
                               ATTR_COLS[0]: [GRADES[g] for g in grades[picks]]})
            for col in ATTR_COLS[1:]:
                df[col] = np.nan
            tables[name] = df
        write_tables(out, CATEGORY_ATTRS, tables["train"], tables["test"])
    return out


@dataclass
class ElpvConfig:
    out: str = option("data/elpv", "the dataset folder to write")
    test_share: float = option(0.25, "share of the cells held out, stratified by type and grade")
    seed: int = option(0, "the same seed gives the same dataset")


def main(cfg: ElpvConfig) -> None:
    out = build(cfg.out, cfg.test_share, cfg.seed)
    train = pd.read_csv(out / "train.csv")
    print(f"solar-cell dataset written to {out} ({len(train)} train, "
          f"{len(pd.read_csv(out / 'test.csv'))} test cells)")


if __name__ == "__main__":
    run_command(main, ElpvConfig, __doc__)
