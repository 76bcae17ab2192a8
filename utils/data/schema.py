"""Reading a dataset folder in the competition layout, and the schema of its heads.

    data/<name>/train.csv                   id, Category, len, attr_1 .. attr_10
    data/<name>/test.csv                    id, Category
    data/<name>/category_attributes.parquet Category, Attribute_list, No_of_attribute
    data/<name>/train_images/{id:06d}.jpg
    data/<name>/test_images/{id:06d}.jpg

The schema holds one head per (category, attribute): its slot (attr_<slot>), its value
vocabulary (sorted, so the order depends only on the set of values seen in train.csv), and its
place (offset, width) in one flat logits vector. It is fitted once, saved as ``schema.json`` in
the run folder, and every later step loads it from there.

Normalisation, applied on reading: cell values and categories are stripped of surrounding white
space (the real sample submission has ``same as saree\\n``); an empty cell is a missing label;
columns beyond the expected ones are ignored (but ``source_id`` and ``image``, which augment.py
writes for its copies).
"""
from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from utils.errors import DataError
from utils.io import atomic_write_json

ID, CATEGORY, LEN = "id", "Category", "len"
MAX_ATTRS = 10
ATTR_COLS = [f"attr_{i}" for i in range(1, MAX_ATTRS + 1)]
DUMMY = "dummy_value"  # the placeholder for slots past a category's len
IGNORE_INDEX = -100  # target of a missing label or of a head outside the row's category


def where(path: str | Path, pos: int | None = None, column: str | None = None, row_id=None) -> str:
    """'train.csv line 7 (id 5), column attr_3' for a 0-based data row ``pos``."""
    text = str(path)
    if pos is not None:
        text += f" line {int(pos) + 2}"  # line 1 is the header
        if row_id is not None:
            text += f" (id {row_id})"
    if column is not None:
        text += f", column {column}"
    return text


def image_path(images_dir: str | Path, row_id: int) -> Path:
    """The image file of a row. Ids are validated integers, never used as path text."""
    return Path(images_dir) / f"{int(row_id):06d}.jpg"


def row_paths(table: pd.DataFrame, images_dir: Path, csv_dir: Path | None = None) -> list[Path]:
    """Image path of every row: ``image`` column (relative to the CSV) when present, else by id."""
    if "image" in table and csv_dir is not None:
        return [csv_dir / p if isinstance(p, str) else image_path(images_dir, i)
                for p, i in zip(table["image"], table[ID])]
    return [image_path(images_dir, i) for i in table[ID]]


# ----------------------------------------------------------------------------- reading tables

def read_category_attributes(path: str | Path) -> dict[str, list[str]]:
    """{category: [attribute names in slot order]} from category_attributes.parquet; every value
    checked for its type (a Category is text, an Attribute_list a list of texts, No_of_attribute
    an integer matching the list)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        df = pd.read_parquet(path)
    except Exception as err:  # pyarrow raises many types on a damaged file
        raise DataError(f"{path}: cannot be read as parquet ({type(err).__name__}: {err})") from None
    for col in ("Category", "Attribute_list", "No_of_attribute"):
        if col not in df.columns:
            raise DataError(f"{path}: missing column {col}")
    if df.empty:
        raise DataError(f"{path}: no rows; it must list every category with its attributes")
    out = {}
    for pos, row in enumerate(df.itertuples(index=False)):
        cat, attrs, n = row.Category, row.Attribute_list, row.No_of_attribute
        at = f"{path}: row {pos + 1}"
        if not isinstance(cat, str) or not cat.strip():
            raise DataError(f"{at}: Category {cat!r} is not a name")
        if isinstance(attrs, str) or not hasattr(attrs, "__len__") or not all(isinstance(a, str) and a.strip() for a in attrs):
            raise DataError(f"{at} ({cat}): Attribute_list {attrs!r} is not a list of names")
        attrs = [a.strip() for a in attrs]
        if not (isinstance(n, (int, np.integer)) or (isinstance(n, float) and n.is_integer())) \
                or len(attrs) != int(n) or not 0 < len(attrs) <= MAX_ATTRS:
            raise DataError(f"{at} ({cat}): Attribute_list has {len(attrs)} names but No_of_attribute is {n!r} "
                            f"(at most {MAX_ATTRS})")
        if cat.strip() in out or len(set(attrs)) != len(attrs):
            raise DataError(f"{at}: category {cat!r} or one of its attributes is listed twice")
        out[cat.strip()] = attrs
    return out


OPTIONAL_TRAIN = ["source_id", "image"]  # written by augment.py: a copy's source row and its image file


def _read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a UTF-8 CSV file (a BOM and CRLF line ends are fine, quoted fields may
    hold commas and line breaks). Anything else is a DataError naming the file and line: another
    encoding, a row with more or fewer fields than the header, an unterminated quote, a field over
    the csv module's size limit, a NUL byte, or a file that does not end with a line break (a
    truncated file would otherwise lose part of its last row silently)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty; it needs a header line")
    if "\0" in text:
        raise DataError(f"{path} line {text.count(chr(10), 0, text.index(chr(0))) + 1}: a NUL byte; the file is "
                        f"damaged or not text")
    if not text.endswith(("\n", "\r")):
        raise DataError(f"{path}: the file does not end with a line break, so it may be truncated; if it is "
                        f"complete, add a final newline")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
        rows = []
        for row in reader:
            if len(row) != len(header) and row:
                raise DataError(f"{path} line {reader.line_num}: {len(row)} fields, but the header has {len(header)}")
            if row:
                rows.append(row)
    except csv.Error as err:
        raise DataError(f"{path} line {reader.line_num}: not valid CSV ({err})") from None
    return [h.strip() for h in header], rows


def _read_csv(path: Path, required: list[str], optional: tuple = ()) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    header, rows = _read_rows(path)
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found {header}")
    if len(set(header)) != len(header):
        raise DataError(f"{path}: a column name appears twice in the header {header}")
    df = pd.DataFrame(rows, columns=header, dtype=object)
    df = df[required + [c for c in optional if c in df.columns]].copy()
    for col in df.columns:
        df[col] = df[col].astype(str).str.strip().replace("", np.nan)
    return df


def _check_ids(df: pd.DataFrame, path: Path) -> None:
    digits = df[ID].astype(str).str.fullmatch(r"\d{1,18}")  # never "1e3", "-1", "0x10" or a path
    ids = pd.to_numeric(df[ID].where(digits), errors="coerce")
    bad = ids.isna()
    if bad.any():
        pos = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{where(path, pos, ID)}: id {df[ID].iloc[pos]!r} is not a "
                        f"non-negative integer")
    df[ID] = ids.astype(np.int64)
    dup = df[ID].duplicated()
    if dup.any():
        pos = int(np.flatnonzero(dup.to_numpy())[0])
        raise DataError(f"{where(path, pos, ID)}: duplicate id {df[ID].iloc[pos]}")


def _check_categories(df: pd.DataFrame, path: Path, known: list[str], known_from: str) -> None:
    bad = ~df[CATEGORY].isin(known)
    if bad.any():
        pos = int(np.flatnonzero(bad.to_numpy())[0])
        value = df[CATEGORY].iloc[pos]
        close = difflib.get_close_matches(str(value), known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known: {known}"
        raise DataError(f"{where(path, pos, CATEGORY, df[ID].iloc[pos])}: category {value!r} "
                        f"is not in {known_from}{hint}")


def read_train(path: str | Path, category_attrs: dict[str, list[str]]) -> pd.DataFrame:
    """train.csv, validated against the parquet: ids, categories, len, no label past len."""
    path = Path(path)
    df = _read_csv(path, [ID, CATEGORY, LEN] + ATTR_COLS, OPTIONAL_TRAIN)
    if df.empty:
        raise DataError(f"{path}: no rows; training needs labelled rows")
    _check_ids(df, path)
    if "source_id" in df:
        source = pd.to_numeric(df["source_id"].where(df["source_id"].astype(str).str.fullmatch(r"\d{1,18}")),
                               errors="coerce")
        bad = source.isna() | ~source.isin(df[ID])
        if bad.any():
            pos = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(f"{where(path, pos, 'source_id', df[ID].iloc[pos])}: source_id "
                            f"{df['source_id'].iloc[pos]!r} is not an id of this table")
        df["source_id"] = source.astype(np.int64)
    if "image" in df:  # only the form augment.py writes: never a free path from the table
        bad = df["image"].notna() & ~df["image"].astype(str).str.fullmatch(r"train_images/\d{6,}\.jpg")
        if bad.any():
            pos = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(f"{where(path, pos, 'image', df[ID].iloc[pos])}: image {df['image'].iloc[pos]!r} "
                            f"is not of the form train_images/<id>.jpg")
    _check_categories(df, path, list(category_attrs), "category_attributes.parquet")
    expected = df[CATEGORY].map(lambda c: len(category_attrs[c]))
    lens = pd.to_numeric(df[LEN], errors="coerce")
    bad = lens != expected
    if bad.any():
        pos = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{where(path, pos, LEN, df[ID].iloc[pos])}: len is {df[LEN].iloc[pos]!r} "
                        f"but category {df[CATEGORY].iloc[pos]!r} has {expected.iloc[pos]} "
                        f"attributes in category_attributes.parquet")
    df[LEN] = expected.astype(np.int64)
    for slot, col in enumerate(ATTR_COLS, start=1):
        past = (slot > df[LEN]) & df[col].notna() & (df[col] != DUMMY)
        if past.any():
            pos = int(np.flatnonzero(past.to_numpy())[0])
            raise DataError(f"{where(path, pos, col, df[ID].iloc[pos])}: label "
                            f"{df[col].iloc[pos]!r} in a slot past len={df[LEN].iloc[pos]}")
        df.loc[slot > df[LEN], col] = np.nan  # dummy_value past len is the same as empty
    return df.reset_index(drop=True)


def read_test(path: str | Path, train_categories: list[str]) -> pd.DataFrame:
    """test.csv: integer ids, and only categories that train.csv has."""
    path = Path(path)
    df = _read_csv(path, [ID, CATEGORY])
    if df.empty:
        raise DataError(f"{path}: no rows; a submission needs at least one test id")
    _check_ids(df, path)
    _check_categories(df, path, train_categories, "train.csv")
    return df.reset_index(drop=True)


def read_submission(path: str | Path) -> pd.DataFrame:
    """A table in the submission layout (a submission, or the demo's test_solution.csv): integer
    ids (no duplicates), Category, an integer len, attr_1..attr_10 (stripped; empty = NaN). What
    the values must be is ``utils.ensemble.metric.validate_submission``'s to say."""
    path = Path(path)
    df = _read_csv(path, [ID, CATEGORY, LEN] + ATTR_COLS)
    if df.empty:
        raise DataError(f"{path}: no rows")
    _check_ids(df, path)
    lens = pd.to_numeric(df[LEN].where(df[LEN].astype(str).str.fullmatch(r"\d{1,2}")), errors="coerce")
    if lens.isna().any():
        pos = int(np.flatnonzero(lens.isna().to_numpy())[0])
        raise DataError(f"{where(path, pos, LEN, df[ID].iloc[pos])}: len {df[LEN].iloc[pos]!r} is not an integer")
    df[LEN] = lens.astype(np.int64)
    return df.reset_index(drop=True)


# ----------------------------------------------------------------------------- the schema

@dataclass(frozen=True)
class Head:
    category: str
    attribute: str
    slot: int  # 1-based: the head's labels are in column attr_<slot>
    vocab: tuple[str, ...]
    offset: int  # first logit of this head in the flat logits vector

    @property
    def width(self) -> int:
        return len(self.vocab)

    @property
    def column(self) -> str:
        return f"attr_{self.slot}"

    @property
    def name(self) -> str:
        return f"{self.category}/{self.attribute}"

    @property
    def logits(self) -> slice:
        return slice(self.offset, self.offset + self.width)


class Schema:
    """Categories, their attributes, and one head per (category, attribute)."""

    def __init__(self, category_attrs: dict[str, list[str]], vocabs: dict[str, list[str]],
                 counts: dict[str, list[int]] | None = None):
        self.category_attrs = {c: list(a) for c, a in category_attrs.items()}
        self.categories = list(self.category_attrs)
        heads, offset = [], 0
        for cat, attrs in self.category_attrs.items():
            for slot, attr in enumerate(attrs, start=1):
                vocab = tuple(vocabs[f"{cat}/{attr}"])
                heads.append(Head(cat, attr, slot, vocab, offset))
                offset += len(vocab)
        self.heads: list[Head] = heads
        self.n_logits = offset
        # train counts per class, used for priors and fallbacks; not part of the fingerprint
        self.counts = {h.name: list(counts[h.name]) if counts else [0] * h.width for h in heads}
        self.heads_of = {c: [i for i, h in enumerate(heads) if h.category == c]
                         for c in self.categories}
        self._index = {h.name: {v: i for i, v in enumerate(h.vocab)} for h in heads}

    # -- fitting and persistence
    @classmethod
    def fit(cls, train: pd.DataFrame, category_attrs: dict[str, list[str]]) -> "Schema":
        """Vocabularies (sorted) and class counts from a validated train table."""
        seen = [c for c in category_attrs if (train[CATEGORY] == c).any()]
        category_attrs = {c: category_attrs[c] for c in seen}
        vocabs, counts = {}, {}
        for cat, attrs in category_attrs.items():
            rows = train[train[CATEGORY] == cat]
            for slot, attr in enumerate(attrs, start=1):
                values = rows[f"attr_{slot}"].dropna().value_counts()
                if values.empty:
                    raise DataError(f"train.csv: head {cat}/{attr} (attr_{slot}) has no label at all")
                vocab = sorted(values.index)
                vocabs[f"{cat}/{attr}"] = vocab
                counts[f"{cat}/{attr}"] = [int(values[v]) for v in vocab]
        return cls(category_attrs, vocabs, counts)

    def to_dict(self) -> dict:
        return {"category_attrs": self.category_attrs,
                "vocabs": {h.name: list(h.vocab) for h in self.heads},
                "counts": self.counts}

    @classmethod
    def from_dict(cls, d: dict) -> "Schema":
        return cls(d["category_attrs"], d["vocabs"], d.get("counts"))

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Schema":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    @property
    def fingerprint(self) -> str:
        """A short hash of the layout (categories, heads, vocabularies), not of the counts."""
        layout = json.dumps([self.category_attrs, [list(h.vocab) for h in self.heads]])
        return hashlib.sha256(layout.encode()).hexdigest()[:16]

    def diff(self, other: "Schema") -> list[str]:
        """What differs between two layouts, in words, this one's side first (empty when they agree)."""
        out = []
        if self.categories != other.categories:
            out.append(f"categories {self.categories} vs {other.categories}")
        mine, theirs = {h.name: h for h in self.heads}, {h.name: h for h in other.heads}
        for name in mine.keys() - theirs.keys():
            out.append(f"head {name} only in the first")
        for name in theirs.keys() - mine.keys():
            out.append(f"head {name} only in the second")
        shared = sorted(mine.keys() & theirs.keys())
        for name in shared:
            a, b = mine[name], theirs[name]
            if a.vocab != b.vocab:
                out.append(f"head {name}: vocabulary {list(a.vocab)} vs {list(b.vocab)}")
        if not out:  # shifted offsets are only news when nothing above explains them
            out += [f"head {n}: offset {mine[n].offset} vs {theirs[n].offset}" for n in shared
                    if mine[n].offset != theirs[n].offset]
        return out

    def check_same(self, other: "Schema", what: str) -> None:
        differences = self.diff(other)
        if differences:
            raise DataError(f"{what} was made with a different schema (this run's first, the file's second): "
                            + "; ".join(differences[:5]))

    # -- encoding and decoding
    def category_index(self, categories) -> np.ndarray:
        lookup = {c: i for i, c in enumerate(self.categories)}
        try:
            return np.array([lookup[c] for c in categories], dtype=np.int64)
        except KeyError as err:
            raise DataError(f"unknown category {err.args[0]!r}; the schema knows "
                            f"{self.categories}") from None

    def encode(self, df: pd.DataFrame) -> np.ndarray:
        """Targets [N, n_heads]: the class index within each head, IGNORE_INDEX where the label
        is missing, is not in the head's vocabulary, or the head is not of the row's category."""
        targets = np.full((len(df), len(self.heads)), IGNORE_INDEX, dtype=np.int64)
        cats = df[CATEGORY].to_numpy()
        for j, head in enumerate(self.heads):
            rows = np.flatnonzero(cats == head.category)
            values = df[head.column].to_numpy()[rows]
            index = self._index[head.name]
            targets[rows, j] = [index.get(v, IGNORE_INDEX) for v in values]
        return targets

    def one_hot(self, targets: np.ndarray, dtype=np.float32) -> np.ndarray:
        """Encoded targets [N, n_heads] -> [N, n_logits] indicators laid out like the logits
        (all zeros where a label is missing)."""
        out = np.zeros((len(targets), self.n_logits), dtype=dtype)
        for j, head in enumerate(self.heads):
            given = np.flatnonzero(targets[:, j] >= 0)
            out[given, head.offset + targets[given, j]] = 1
        return out

    def head_values(self, logits: np.ndarray, j: int) -> np.ndarray:
        """Predicted class index of head j for every row (argmax within the head)."""
        return logits[:, self.heads[j].logits].argmax(axis=1)

    def decode(self, logits: np.ndarray, categories) -> pd.DataFrame:
        """Columns Category, len, attr_1..attr_10 for rows with these logits: each row's own
        category heads decoded by argmax, ``dummy_value`` past len."""
        return self.labels(self.predict(logits), categories)

    def predict(self, logits: np.ndarray) -> np.ndarray:
        """Each head's argmax class, int16 [N, heads]: the compact form of a decoded row."""
        return np.stack([logits[:, h.logits].argmax(axis=1) for h in self.heads], axis=1).astype(np.int16)

    def labels(self, pred: np.ndarray, categories) -> pd.DataFrame:
        """``predict``'s class indices as the submission's columns, for rows of these categories."""
        categories = np.asarray(categories, dtype=object)
        self.category_index(categories)  # raises on an unknown category
        out = pd.DataFrame({CATEGORY: categories,
                            LEN: [len(self.category_attrs[c]) for c in categories]})
        for col in ATTR_COLS:
            out[col] = DUMMY
        for j, head in enumerate(self.heads):
            rows = np.flatnonzero(categories == head.category)
            if len(rows):
                out.loc[rows, head.column] = np.asarray(head.vocab, dtype=object)[pred[rows, j]]
        return out

    def class_weights(self, name: str, power: float = 0.5, cap: float = 10.0) -> np.ndarray:
        """Inverse-frequency weight of each class of head ``name``: (n_max / n_c) ** power, capped
        at ``cap`` (float64). The weighted loss and the balanced sampler both use it."""
        counts = np.maximum(np.asarray(self.counts[name], dtype=np.float64), 1)
        return np.minimum((counts.max() / counts) ** power, cap)

    def prior_logits(self) -> np.ndarray:
        """log class frequency per head, laid out like the logits (argmax = the majority class)."""
        out = np.zeros(self.n_logits, dtype=np.float32)
        for h in self.heads:
            c = np.asarray(self.counts[h.name], dtype=np.float64) + 1e-3
            out[h.logits] = np.log(c / c.sum())
        return out


# ----------------------------------------------------------------------------- a dataset folder

@dataclass
class Dataset:
    root: Path
    category_attrs: dict[str, list[str]]
    train: pd.DataFrame
    test: pd.DataFrame

    @property
    def train_images(self) -> Path:
        return self.root / "train_images"

    @property
    def test_images(self) -> Path:
        return self.root / "test_images"


def read_dataset(root: str | Path, train_csv: str | None = None) -> Dataset:
    """Read and validate a dataset folder. ``train_csv`` replaces ``<root>/train.csv``
    (e.g. an augmented_train.csv)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found (make the demo data with "
                        f"`python -m utils.tools.demo_data --out {root}`, or see the README)")
    category_attrs = read_category_attributes(root / "category_attributes.parquet")
    train = read_train(Path(train_csv) if train_csv else root / "train.csv", category_attrs)
    test = read_test(root / "test.csv", sorted(train[CATEGORY].unique()))
    return Dataset(root, category_attrs, train, test)
