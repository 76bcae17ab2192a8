"""Mutated tables for every reader: each gives the kit's own error naming the file, or exactly the
table its mutation should give; never another exception, never a silent wrong parse.

Every mutation knows what a correct reader must return: "error", or the original table with a
known edit (a BOM or CRLF line ends change nothing; a row boundary truncation keeps the first
rows; a quoted line break inside a value is part of that value). A DataError is always an
acceptable answer to a mutated table as long as it names the file; anything else is a bug.
"""
import random

import numpy as np
import pandas as pd
import pytest

from utils.data.schema import Schema, read_category_attributes, read_submission, read_test, read_train
from utils.errors import DataError
from utils.metric import validate_submission

N_TABLES = 200


def lines_of(text: str) -> list[str]:
    return text.splitlines(keepends=True)


# Each mutation: (text, rng) -> (new bytes, expected) where expected is "error", "same", or a
# function of the original parsed table giving the expected one.

def truncate(text, rng):
    lines = lines_of(text)
    k = rng.randrange(1, len(lines))
    if rng.random() < 0.5:  # at a row boundary: a valid shorter table (header only: no rows)
        cut = "".join(lines[:k])
        return cut.encode(), ("error" if k == 1 else lambda df: df.iloc[: k - 1])
    cut = "".join(lines[:k]) + lines[k][: rng.randrange(1, max(2, len(lines[k]) - 1))]
    return cut.encode(), "error"  # no final line break: possibly truncated


def utf16(text, rng):
    return text.encode("utf-16"), "error"


def bom(text, rng):
    return b"\xef\xbb\xbf" + text.encode(), "same"


def crlf(text, rng):
    return text.replace("\n", "\r\n").encode(), "same"


def header_only(text, rng):
    return lines_of(text)[0].encode(), "error"


def cells(text):
    return [line.rstrip("\n").split(",") for line in lines_of(text)]


def join(rows):
    return ("\n".join(",".join(r) for r in rows) + "\n").encode()


def short_row(text, rng):
    rows = cells(text)
    r = rng.randrange(1, len(rows))
    rows[r] = rows[r][:-1]
    return join(rows), "error"


def long_row(text, rng):
    rows = cells(text)
    rows[rng.randrange(1, len(rows))].append("extra")
    return join(rows), "error"


def huge_field(text, rng):
    rows = cells(text)
    r, c = rng.randrange(1, len(rows)), rng.randrange(len(rows[0]))
    rows[r][c] = "x" * 200_000
    return join(rows), "error"


def nul_byte(text, rng):
    pos = rng.randrange(len(text) - 1)
    return (text[:pos] + "\0" + text[pos:]).encode(), "error"


def empty_file(text, rng):
    return rng.choice([b"", b"\n", b"  \n\n"]), "error"


def quoted_break(text, rng, columns_free=("attr_1", "attr_2", "attr_3")):
    """A quoted value with a line break inside, in a free-text label column: part of the value."""
    rows = cells(text)
    header = rows[0]
    free = [header.index(c) for c in columns_free if c in header]
    if not free:
        return join(rows), "same"
    r, c = rng.randrange(1, len(rows)), rng.choice(free)
    value = rows[r][c]
    if not value:
        return join(rows), "same"
    cut = rng.randrange(len(value) + 1)
    new = value[:cut] + "\n" + value[cut:]
    rows[r][c] = '"' + new + '"'

    def expected(df, r=r - 1, col=header[c], new=new.strip()):
        df = df.copy()
        df.loc[r, col] = new
        return df
    return join(rows), expected


def bad_len(text, rng):
    rows = cells(text)
    header = rows[0]
    if "len" not in header:
        return join(rows), "same"
    rows[rng.randrange(1, len(rows))][header.index("len")] = rng.choice(["nan", "inf", "-inf", "NaN", "1e400", ""])
    return join(rows), "error"


def bad_id(text, rng):
    rows = cells(text)
    rows[rng.randrange(1, len(rows))][0] = rng.choice(["1e3", "-4", "0x10", "", "3.5", "nan", "../x"])
    return join(rows), "error"


CSV_MUTATIONS = [truncate, utf16, bom, crlf, header_only, short_row, long_row, huge_field, nul_byte,
                 empty_file, quoted_break, bad_len, bad_id]


def check(read, path, mutated: bytes, expected, original: pd.DataFrame, what: str):
    path.write_bytes(mutated)
    try:
        got = read(path)
    except DataError as err:
        assert str(path) in str(err) or path.name in str(err), f"{what}: error without the file name: {err}"
        return "error"
    assert expected != "error", f"{what}: a table was read where an error was due"
    want = original if expected == "same" else expected(original)
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True), obj=what)
    return "parsed"


def fuzz(read, source_text: str, tmp_path, name: str, mutations, seed: int) -> dict:
    path = tmp_path / name
    path.write_text(source_text)
    original = read(path)
    rng, outcomes = random.Random(seed), {"error": 0, "parsed": 0}
    for k in range(N_TABLES):
        mutate = mutations[k % len(mutations)]
        mutated, expected = mutate(source_text, rng)
        outcomes[check(read, path, mutated, expected, original, f"{name} #{k} {mutate.__name__}")] += 1
    return outcomes


@pytest.fixture
def tables(tiny_data, tmp_path):
    return {"attrs": read_category_attributes(tiny_data / "category_attributes.parquet"),
            "train": (tiny_data / "train.csv").read_text(), "test": (tiny_data / "test.csv").read_text(),
            "solution": (tiny_data / "test_solution.csv").read_text()}


def test_train_and_test_readers_survive_mutated_tables(tables, tmp_path):
    attrs = tables["attrs"]
    cats = sorted(attrs)
    train = fuzz(lambda p: read_train(p, attrs), tables["train"], tmp_path, "train.csv", CSV_MUTATIONS, 1)
    test = fuzz(lambda p: read_test(p, cats), tables["test"], tmp_path, "test.csv", CSV_MUTATIONS, 2)
    for outcomes in (train, test):
        assert outcomes["error"] > 50 and outcomes["parsed"] > 30, outcomes


def test_submission_reader_and_validator_survive_mutated_tables(tables, tiny_data, tmp_path):
    attrs = tables["attrs"]
    schema = Schema.fit(read_train(tiny_data / "train.csv", attrs), attrs)
    test = read_test(tiny_data / "test.csv", sorted(attrs))

    def read_and_validate(path):
        sub = read_submission(path)
        validate_submission(sub, test, schema)  # a list of problems, never an exception
        return sub

    outcomes = fuzz(read_and_validate, tables["solution"], tmp_path, "submission.csv", CSV_MUTATIONS, 3)
    assert outcomes["error"] > 50 and outcomes["parsed"] > 30, outcomes


def parquet_mutations(attrs: dict):
    base = pd.DataFrame({"Category": list(attrs), "Attribute_list": [list(a) for a in attrs.values()],
                         "No_of_attribute": [len(a) for a in attrs.values()]})

    def edit(fn, expected):
        def mutate(rng):
            df = base.copy()
            return fn(df, rng), expected
        mutate.__name__ = fn.__name__
        return mutate

    def as_text(df, rng):  # "color,neck,..." instead of a list
        df["Attribute_list"] = df["Attribute_list"].map(rng.choice([",".join, str]))
        return df

    def count_off(df, rng):
        df.loc[rng.randrange(len(df)), "No_of_attribute"] += rng.choice([-1, 1, 7])
        return df

    def count_nan(df, rng):
        df["No_of_attribute"] = df["No_of_attribute"].astype(float)
        df.loc[rng.randrange(len(df)), "No_of_attribute"] = rng.choice([np.nan, np.inf, 2.5])
        return df

    def count_float(df, rng):
        df["No_of_attribute"] = df["No_of_attribute"].astype(float)
        return df

    def no_rows(df, rng):
        return df.iloc[:0]

    def drop_column(df, rng):
        return df.drop(columns=[rng.choice(list(df.columns))])

    def padded_names(df, rng):
        df["Category"] = " " + df["Category"] + " \n"
        return df

    def twice(df, rng):
        return pd.concat([df, df.iloc[[rng.randrange(len(df))]]])

    def extra_column(df, rng):
        return df.assign(notes="x")

    def number_as_category(df, rng):
        df["Category"] = rng.sample(range(100), len(df))
        return df

    same = attrs
    return [edit(as_text, "error"), edit(count_off, "error"), edit(count_nan, "error"), edit(count_float, same),
            edit(no_rows, "error"), edit(drop_column, "error"), edit(padded_names, same), edit(twice, "error"),
            edit(extra_column, same), edit(number_as_category, "error")]


def test_parquet_reader_survives_mutated_files(tables, tiny_data, tmp_path):
    attrs = tables["attrs"]
    mutations = parquet_mutations(attrs)
    rng, path = random.Random(4), tmp_path / "category_attributes.parquet"
    good = (tiny_data / "category_attributes.parquet").read_bytes()
    outcomes = {"error": 0, "parsed": 0}
    for k in range(N_TABLES):
        if k % 3 == 0:  # damaged bytes: truncated anywhere, or a run of bytes overwritten
            cut = rng.randrange(1, len(good))
            data = good[:cut] if k % 2 else good[:cut] + bytes(rng.randrange(256) for _ in range(8)) + good[cut + 8:]
            path.write_bytes(data)
            expected = None
        else:
            mutate = mutations[k % len(mutations)]
            df, expected = mutate(rng)
            df.to_parquet(path, index=False)
        try:
            got = read_category_attributes(path)
        except DataError as err:
            assert str(path) in str(err), err
            outcomes["error"] += 1
            continue
        assert expected != "error", f"#{k}: read {got}"
        assert got == attrs, f"#{k}: a damaged file read as {got}"  # a damaged file that still reads must be intact
        outcomes["parsed"] += 1
    assert outcomes["error"] > 80 and outcomes["parsed"] > 20, outcomes
