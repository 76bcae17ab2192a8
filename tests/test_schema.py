import shutil

import numpy as np
import pandas as pd
import pytest

from utils.data.schema import ATTR_COLS, DUMMY, IGNORE_INDEX, Schema, image_path, read_dataset
from utils.errors import DataError


@pytest.fixture
def data_copy(tiny_data, tmp_path):
    """A writable copy of the tiny dataset's tables (images are not needed here)."""
    for name in ("train.csv", "test.csv", "category_attributes.parquet"):
        shutil.copy(tiny_data / name, tmp_path / name)
    return tmp_path


def test_schema_layout_and_json_round_trip(tiny_data, tmp_path):
    data = read_dataset(tiny_data)
    schema = Schema.fit(data.train, data.category_attrs)
    # 42 heads for the five real categories, contiguous and non-overlapping in the logits
    assert len(schema.heads) == 42
    assert schema.heads[0].offset == 0
    for a, b in zip(schema.heads, schema.heads[1:]):
        assert b.offset == a.offset + a.width
    assert schema.n_logits == schema.heads[-1].offset + schema.heads[-1].width
    for h in schema.heads:
        assert list(h.vocab) == sorted(h.vocab)
        assert sum(schema.counts[h.name]) == data.train.loc[data.train.Category == h.category, h.column].notna().sum()
    schema.save(tmp_path / "schema.json")
    again = Schema.load(tmp_path / "schema.json")
    assert again.diff(schema) == []
    assert again.fingerprint == schema.fingerprint
    assert again.counts == schema.counts


def test_encode_decode_round_trip(tiny_data):
    data = read_dataset(tiny_data)
    schema = Schema.fit(data.train, data.category_attrs)
    targets = schema.encode(data.train)
    # one-hot logits from the targets decode back to the labels; missing labels decode to
    # some vocabulary value, so compare only where a label is given
    logits = np.zeros((len(data.train), schema.n_logits), dtype=np.float32)
    for j, h in enumerate(schema.heads):
        rows = np.flatnonzero(targets[:, j] >= 0)
        logits[rows, h.offset + targets[rows, j]] = 1.0
        other = data.train.Category.to_numpy() != h.category
        assert (targets[other, j] == IGNORE_INDEX).all()
    decoded = schema.decode(logits, data.train.Category)
    for col in ATTR_COLS:
        given = data.train[col].notna()
        assert (decoded.loc[given, col] == data.train.loc[given, col]).all()
    past = np.arange(1, 11)[None, :] > decoded["len"].to_numpy()[:, None]
    assert (decoded[ATTR_COLS].to_numpy()[past] == DUMMY).all()


def test_schema_diff_names_what_differs(tiny_data):
    data = read_dataset(tiny_data)
    schema = Schema.fit(data.train, data.category_attrs)
    d = schema.to_dict()
    d["vocabs"]["Men Tshirts/color"] = d["vocabs"]["Men Tshirts/color"] + ["zebra"]
    other = Schema.from_dict(d)
    diffs = schema.diff(other)
    assert any("Men Tshirts/color" in x and "zebra" in x for x in diffs)
    with pytest.raises(DataError, match="different schema"):
        schema.check_same(other, "checkpoint")


def test_values_are_stripped(data_copy):
    df = pd.read_csv(data_copy / "train.csv", dtype=str, keep_default_na=False)
    sarees = df.index[df.Category == "Sarees"][0]
    df.loc[sarees, "attr_2"] = " zari\n"
    df.loc[sarees, "Category"] = "Sarees "
    df.to_csv(data_copy / "train.csv", index=False)
    train = read_dataset(data_copy).train
    assert train.loc[sarees, "attr_2"] == "zari"
    assert train.loc[sarees, "Category"] == "Sarees"


def _break(data_copy, name, edit):
    df = pd.read_csv(data_copy / name, dtype=str, keep_default_na=False)
    df = edit(df)
    df.to_csv(data_copy / name, index=False)


@pytest.mark.parametrize("name, edit, message", [
    ("train.csv", lambda d: d.drop(columns=["attr_4"]), r"train.csv: missing column\(s\) attr_4"),
    ("train.csv", lambda d: d.assign(Category=d.Category.where(d.index != 3, "Saree")),
     r"train.csv line 5 \(id 3\), column Category: category 'Saree' .*did you mean 'Sarees'"),
    ("train.csv", lambda d: d.assign(len=d["len"].where(d.index != 2, "4")),
     r"train.csv line 4 \(id 2\), column len: len is '4'"),
    ("train.csv", lambda d: d.assign(attr_10=d.attr_10.where(d.Category != "Men Tshirts", "oops")),
     r"column attr_10: label 'oops' in a slot past len=5"),
    ("train.csv", lambda d: d.assign(id=d.id.where(d.index != 1, "x1")),
     r"train.csv line 3, column id: id 'x1' is not a non-negative integer"),
    ("train.csv", lambda d: d.assign(id=d.id.where(d.index != 1, "0")), r"line 3, column id: duplicate id 0"),
    ("test.csv", lambda d: d.assign(Category=d.Category.where(d.index != 0, "Jeans")),
     r"test.csv line 2 \(id 0\), column Category: category 'Jeans' is not in train.csv"),
])
def test_bad_tables_name_file_line_and_column(data_copy, name, edit, message):
    _break(data_copy, name, edit)
    with pytest.raises(DataError, match=message):
        read_dataset(data_copy)


def test_missing_file_is_named(data_copy):
    (data_copy / "test.csv").unlink()
    with pytest.raises(DataError, match=r"test.csv: file not found"):
        read_dataset(data_copy)


def test_extra_columns_are_ignored(data_copy):
    _break(data_copy, "train.csv", lambda d: d.assign(notes="x"))
    assert "notes" not in read_dataset(data_copy).train.columns


def test_empty_test_csv_is_an_error(data_copy):
    (data_copy / "test.csv").write_text("id,Category\n")
    with pytest.raises(DataError, match=r"test.csv: no rows"):
        read_dataset(data_copy)


def test_ids_and_image_names_are_never_paths(data_copy):
    """Image paths are built from validated integer ids; a path in a table is an error."""
    original = (data_copy / "test.csv").read_bytes()
    _break(data_copy, "test.csv", lambda d: d.assign(id=d.id.where(d.index != 1, "../../etc/passwd")))
    with pytest.raises(DataError, match=r"test.csv line 3, column id: id '../../etc/passwd' is not a non-negative"):
        read_dataset(data_copy)
    (data_copy / "test.csv").write_bytes(original)
    _break(data_copy, "train.csv", lambda d: d.assign(
        source_id=d.id, image=["../test_images/000000.jpg" if i == 2 else "" for i in range(len(d))]))
    with pytest.raises(DataError, match=r"train.csv line 4 \(id \d+\), column image: image "
                                        r"'../test_images/000000.jpg' is not of the form train_images/<id>.jpg"):
        read_dataset(data_copy)
    assert image_path("images", 7).as_posix() == "images/000007.jpg"
