import shutil

import numpy as np
import pandas as pd
import pytest

from utils.data import balance
from tests.conftest import run_script
from utils.data.schema import ATTR_COLS, read_dataset
from utils.run import RunDir
from utils.train.fold import split_fold


def table(rows):
    """rows: (id, category, attr_1 value) -> a minimal train table."""
    df = pd.DataFrame(rows, columns=["id", "Category", "attr_1"])
    for col in ATTR_COLS[1:]:
        df[col] = np.nan
    return df


def test_multipliers_and_cap_on_a_hand_made_table():
    # category A: a x6, b x3, c x1 -> target (6+3+1)/3 = 10/3
    # category B: a x2 -> target 2 (its own category: slots are per category)
    rows = [(i, "A", "a") for i in range(6)] + [(6 + i, "A", "b") for i in range(3)] + [(9, "A", "c")]
    rows += [(10, "B", "a"), (11, "B", "a"), (12, "B", None)]
    props = balance.calculate_class_proportions(table(rows), "attr_1", cap=3.0).set_index(["Category", "value"])
    assert props.loc[("A", "a"), "multiplier"] == pytest.approx((10 / 3) / 6)
    assert props.loc[("A", "b"), "multiplier"] == pytest.approx((10 / 3) / 3)
    assert props.loc[("A", "c"), "multiplier"] == 3.0  # 10/3 capped
    assert props.loc[("B", "a"), "multiplier"] == pytest.approx(1.0)
    assert props.loc[("A", "a"), "target"] == pytest.approx(10 / 3)


def test_tier_selection():
    assert balance.tier(3.0) == ["basic", "intermediate", "advanced"]  # reaching the cap is the top tier
    assert balance.tier(2.0) == ["basic", "intermediate"]
    assert balance.tier(1.5) == ["basic"]
    assert balance.tier(1.1) == ["basic"]


def test_all_takes_each_image_s_largest_multiplier():
    df = table([(0, "A", "a"), (1, "A", "a"), (2, "A", "a"), (3, "A", "b")])
    df["attr_2"] = ["x", "y", "y", "y"]  # x is rare in slot 2
    m = balance.image_multipliers(df, ["attr_1", "attr_2"], cap=3.0)
    # row 0: a (2/3) and x (2/1) -> 2.0; row 3: b (2/1) and y (2/3) -> 2.0; rows 1-2 only common
    # classes (2/3 each) -> the floor 1.0: not under-represented
    assert list(m.round(4)) == [2.0, 1.0, 1.0, 2.0]


@pytest.fixture(scope="module")
def augmented(tiny_data, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("augdata") / "data"
    shutil.copytree(tiny_data, data_dir)
    train = pd.read_csv(data_dir / "train.csv")
    unreadable = int(train[train.Category == "Kurtis"].id.iloc[0])
    (data_dir / "train_images" / f"{unreadable:06d}.jpg").write_bytes(b"not an image")
    out = tmp_path_factory.mktemp("aug")
    proc = run_script("augment.py", "--data-dir", str(data_dir), "--out-dir", str(out), "--attr", "all",
                      "--aug-percentage", "1.0", "--progress", "false")
    return data_dir, out, proc, unreadable


@pytest.mark.slow
def test_new_ids_are_unique_and_labels_copied(augmented):
    data_dir, out, proc, _ = augmented
    data = read_dataset(data_dir, str(out / "augmented_train.csv"))
    table_ = data.train
    copies = table_[table_.source_id != table_.id]
    assert len(copies) > 0
    assert table_.id.is_unique
    assert copies.id.min() > max(data.test.id.max(), table_[table_.source_id == table_.id].id.max())
    by_id = table_.set_index("id")
    for _, row in copies.iterrows():
        src = by_id.loc[row.source_id]
        assert row.Category == src.Category
        assert all((pd.isna(row[c]) and pd.isna(src[c])) or row[c] == src[c] for c in ATTR_COLS)
        assert (out / row.image).is_file()
    assert "class counts per (category, slot) before and after" in proc.stdout


@pytest.mark.slow
def test_unreadable_source_is_reported_and_skipped_and_rerun_skips(augmented):
    data_dir, out, proc, unreadable = augmented
    assert f"source image of id {unreadable} could not be read" in proc.stdout
    table_ = pd.read_csv(out / "augmented_train.csv")
    assert unreadable not in set(table_.source_id[table_.source_id != table_.id])
    before = {p.name: p.stat().st_mtime_ns for p in (out / "train_images").iterdir()}
    run_script("augment.py", "--data-dir", str(data_dir), "--out-dir", str(out), "--attr", "all",
               "--aug-percentage", "1.0", "--progress", "false")
    after = {p.name: p.stat().st_mtime_ns for p in (out / "train_images").iterdir()}
    assert before == after  # nothing rewritten
    assert pd.read_csv(out / "augmented_train.csv").equals(table_)


@pytest.mark.slow
def test_copies_inherit_their_source_fold_and_never_leak(augmented, tmp_path):
    data_dir, out, _, _ = augmented
    data = read_dataset(data_dir, str(out / "augmented_train.csv"))
    schema, table_ = RunDir(tmp_path).prepare(data, n_folds=3, seed=0)
    fold_of = dict(zip(table_.id, table_.fold))
    assert all(f == fold_of[s] for f, s in zip(table_.fold, table_.source_id))
    for k in range(3):
        trn, val = split_fold(table_, k)
        assert (val.source_id == val.id).all()  # only original images are validated
        assert not set(trn.source_id) & set(val.id)  # no copy of a validation image is trained on
        assert len(trn) + len(val) + int(((table_.fold == k) & (table_.source_id != table_.id)).sum()) == len(table_)
