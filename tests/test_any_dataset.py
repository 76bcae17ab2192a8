"""The kit on a dataset that is not the competition's: other categories, attribute names and counts."""
import pandas as pd
import pytest

from tests.conftest import OTHER_WORLD, run_script
from utils.metric import validate_submission
from utils.schema import ATTR_COLS, CATEGORY, DUMMY, ID, LEN, Schema, read_dataset, read_submission

FAST = ["--img-size", "32", "--batch-size", "16", "--epochs", "1", "--workers", "0", "--n-folds", "2",
        "--progress", "false"]


@pytest.mark.slow
def test_default_options_train_and_the_pipeline_submits_on_another_dataset(other_data, tmp_path):
    """train.py with its default options (only sizes made small for the test), then ensemble.py,
    export.py and infer.py: a valid submission with every test id, each row as long as its own
    category's attribute list."""
    dirs = ["--data-dir", str(other_data), "--out-dir", str(tmp_path)]
    for model in ("test_efficientnet", "test_byobnet"):
        run_script("train.py", "--model", model, "--fold", "all", *dirs, *FAST)
    run_script("ensemble.py", *dirs, "--sto-population", "4", "--sto-iterations", "2", "--compare", "equal,sto",
               "--progress", "false")
    run_script("export.py", *dirs, "--parity-images", "4", "--timing-images", "4", "--progress", "false")
    out = tmp_path / "submission.csv"
    run_script("infer.py", *dirs, "--output", str(out), "--progress", "false")

    schema, data = Schema.load(tmp_path / "schema.json"), read_dataset(other_data)
    assert schema.category_attrs == {c: list(a) for c, a in OTHER_WORLD.items()}
    assert [h.width for h in schema.heads] == [len(v) for a in OTHER_WORLD.values() for v in a.values()]
    sub = read_submission(out)
    assert validate_submission(sub, data.test, schema) == []
    assert sorted(sub[ID]) == sorted(data.test[ID])
    lens = sub.set_index(ID)[LEN]
    for cat, attrs in OTHER_WORLD.items():
        rows = sub[sub[CATEGORY] == cat]
        assert (lens[rows[ID]] == len(attrs)).all()
        for slot, values in enumerate(attrs.values(), start=1):
            assert set(rows[f"attr_{slot}"]) <= set(values)  # each value from the head's own vocabulary
        assert (rows[ATTR_COLS[len(attrs):]] == DUMMY).all().all()


def test_a_category_rule_for_a_category_the_data_lacks_is_refused_before_any_work(other_data, tmp_path):
    """The competition's profile on another dataset: the kit's error, naming the key, the categories
    it names and what the data has; nothing decoded, no schema or folds written, no model built."""
    proc = run_script("train.py", "--model", "no_such_model", "--config", "configs/visual_taxonomy.yaml",
                      "--data-dir", str(other_data), "--out-dir", str(tmp_path / "run"), *FAST, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: key 'category_aug' has rules for categories ['Sarees', 'Men Tshirts', "
                                  "'Women Tshirts', 'Kurtis'] that ")
    assert "it has ['Bags', 'Hats & Caps', 'Shoes']" in proc.stderr
    assert not (tmp_path / "run").exists()  # (a model named no_such_model would fail if it were built)
    # replaced whole, the same profile trains: one documented syntax
    rules = "!replace {Bags: {hflip: {p: 1.0}}}"
    run_script("train.py", "--model", "test_byobnet", "--config", "configs/visual_taxonomy.yaml",
                      "--category-aug", rules, "--data-dir", str(other_data), "--out-dir", str(tmp_path / "run"),
                      *FAST, "--fold", "0", "--predict-test", "false")
    text = (tmp_path / "run" / "test_byobnet" / "fold0" / "config.yaml").read_text()
    assert "category_aug:\n  Bags:\n    hflip:\n      p: 1.0\n" in text and "Sarees" not in text


def test_augment_balances_the_data_s_own_slots_and_refuses_one_past_them(other_data, tmp_path):
    proc = run_script("augment.py", "--data-dir", str(other_data), "--out-dir", str(tmp_path), "--attr", "attr_4",
                      check=False)
    assert proc.returncode == 2
    assert "error: key 'attr': attr_4 is past every category's attributes; the data's categories have at most 3 " \
           "(attr_1, attr_2, attr_3)" in proc.stderr
    run_script("augment.py", "--data-dir", str(other_data), "--out-dir", str(tmp_path), "--attr", "attr_3",
               "--progress", "false")
    table = pd.read_csv(tmp_path / "augmented_train.csv")
    copies = table[table["source_id"] != table[ID]]
    assert len(copies) and set(copies[CATEGORY]) == {"Shoes"}  # only Shoes has a third attribute
