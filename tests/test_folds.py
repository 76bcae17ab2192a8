import json

import numpy as np
import pandas as pd
import pytest

from utils.data.folds import make_folds, stratification_matrix
from utils.data.schema import Schema, read_dataset
from utils.errors import DataError
from utils.run import RunDir
from utils.tools.demo_data import generate


def test_fold_shares_of_frequent_classes_match_the_whole():
    from utils.tools.demo_data import COUNTS, sample_labels
    train = sample_labels(3000, np.random.default_rng(0))
    train.insert(0, "id", np.arange(len(train)))
    schema = Schema.fit(train, {c: list(a) for c, a in COUNTS.items()})
    folds = make_folds(train, schema, n_folds=5, seed=0)
    assert sorted(folds.fold.unique()) == [0, 1, 2, 3, 4]
    y = stratification_matrix(train, schema).astype(float)
    whole = y.mean(axis=0)
    frequent = y.sum(axis=0) >= 100  # classes with at least 20 rows per fold
    assert frequent.sum() > 50
    random_fold = np.random.default_rng(0).integers(0, 5, size=len(train))
    random_mean = []
    for k in range(5):
        gap = np.abs(y[folds.fold.to_numpy() == k].mean(axis=0) - whole)[frequent]
        # stated tolerance: every frequent class within 3 points of its share of the whole,
        # and within 0.5 points on average
        assert gap.max() < 0.03 and gap.mean() < 0.005
        random_mean.append(np.abs(y[random_fold == k].mean(axis=0) - whole)[frequent].mean())
    assert np.median(random_mean) > 0.006  # an unstratified split is clearly worse
    sizes = folds.fold.value_counts()
    assert sizes.max() - sizes.min() <= 0.01 * len(train)


def test_folds_are_deterministic_and_seed_dependent(tiny_data):
    data = read_dataset(tiny_data)
    schema = Schema.fit(data.train, data.category_attrs)
    a = make_folds(data.train, schema, 3, seed=1)
    b = make_folds(data.train, schema, 3, seed=1)
    c = make_folds(data.train, schema, 3, seed=2)
    assert a.equals(b)
    assert not a.equals(c)


def test_prepare_run_writes_once_and_reuses(tiny_data, tmp_path):
    data = read_dataset(tiny_data)
    schema, train = RunDir(tmp_path).prepare(data, n_folds=3, seed=0)
    assert (tmp_path / "schema.json").is_file() and (tmp_path / "folds.csv").is_file()
    before = (tmp_path / "folds.csv").read_bytes()
    schema2, train2 = RunDir(tmp_path).prepare(data, n_folds=3, seed=99)  # cached: seed is not re-applied
    assert (tmp_path / "folds.csv").read_bytes() == before
    assert train.fold.equals(train2.fold)
    with pytest.raises(DataError, match="has 3 folds but n_folds is 4"):
        RunDir(tmp_path).prepare(data, n_folds=4, seed=0)


def test_demo_data_is_deterministic_and_valid(tmp_path):
    a = generate(tmp_path / "a", n_train=30, n_test=10, seed=3, workers=1, progress=False)
    b = generate(tmp_path / "b", n_train=30, n_test=10, seed=3, workers=1, progress=False)
    for name in ("train.csv", "test.csv", "test_solution.csv", "sample_submission.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    for img in sorted((a / "train_images").iterdir()):
        assert img.read_bytes() == (b / "train_images" / img.name).read_bytes()
    data = read_dataset(a)  # the validating reader accepts it
    assert len(data.train) == 30 and len(data.test) == 10
    from PIL import Image
    for i in data.train.id:
        with Image.open(a / "train_images" / f"{i:06d}.jpg") as im:
            assert im.width == 512 and 259 <= im.height <= 1080
    solution = pd.read_csv(a / "test_solution.csv")
    assert (solution.id == data.test.id).all()
    # a narrower build: the same tables, each picture shrunk whole (its aspect kept, to the pixel)
    small = generate(tmp_path / "small", n_train=30, n_test=10, seed=3, workers=1, progress=False, width=128)
    for name in ("train.csv", "test.csv", "test_solution.csv"):
        assert (small / name).read_bytes() == (a / name).read_bytes()
    for i in data.train.id:
        with Image.open(a / "train_images" / f"{i:06d}.jpg") as big, \
                Image.open(small / "train_images" / f"{i:06d}.jpg") as im:
            assert im.width == 128 and abs(im.height - big.height / 4) <= 0.5
            shrunk = np.asarray(big.convert("RGB").resize(im.size, Image.Resampling.BOX), dtype=np.float32)
            diff = np.abs(np.asarray(im.convert("RGB"), dtype=np.float32) - shrunk).mean()
            assert diff < 8, diff  # JPEG's losses (twice here) on a noisy photo; another picture differs by tens
    assert json.loads((small / "build.json").read_text())["width"] == 128  # a rebuild at 512 starts afresh


def test_demo_data_follows_the_real_imbalance(tmp_path):
    from utils.tools.demo_data import ROWS, sample_labels
    df = sample_labels(20000, np.random.default_rng(0))
    share = df.Category.value_counts(normalize=True)
    total = sum(ROWS.values())
    for cat, rows in ROWS.items():
        assert abs(share[cat] - rows / total) < 0.02
    # Kurtis color: black is frequent, orange rare (about 40:1 in the real counts)
    kurtis = df[df.Category == "Kurtis"].attr_1.value_counts()
    assert kurtis["black"] > 15 * kurtis.get("orange", 0)
    # Women Tshirts surface_styling (attr_8) is mostly unlabelled
    wt = df[df.Category == "Women Tshirts"].attr_8
    assert wt.isna().mean() > 0.9
