import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from tests.conftest import run_script
from utils.data.schema import ATTR_COLS, DUMMY, Schema, read_dataset
from utils.metric import f1_score_rows, f1_scores, score, validate_submission
from utils.serve.submission import majority_logits, make_submission


def frame(rows):
    """rows: (id, Category, len, [values...]) -> a table in the submission layout."""
    out = []
    for i, cat, n, values in rows:
        values = list(values) + [DUMMY] * (10 - len(values))
        out.append({"id": i, "Category": cat, "len": n, **dict(zip(ATTR_COLS, values))})
    return pd.DataFrame(out)


def test_hand_computed_head():
    # truth a a b c, prediction a b b b: accuracy 2/4;
    # F1(a) = 2*1/(2+1) = 2/3, F1(b) = 2*1/(1+3) = 1/2, F1(c) = 0 -> macro 7/18
    truth = frame([(0, "C", 1, ["a"]), (1, "C", 1, ["a"]), (2, "C", 1, ["b"]), (3, "C", 1, ["c"])])
    pred = frame([(0, "C", 1, ["a"]), (1, "C", 1, ["b"]), (2, "C", 1, ["b"]), (3, "C", 1, ["b"])])
    final, table = score(truth, pred)
    micro, macro = 0.5, 7 / 18
    assert table.loc[0, "micro_f1"] == pytest.approx(micro)
    assert table.loc[0, "macro_f1"] == pytest.approx(macro)
    assert final == pytest.approx(2 * micro * macro / (micro + macro))


def test_missing_truth_rows_and_heads_are_left_out():
    # head 1: the row with no truth is ignored (its wrong guess costs nothing);
    # head 2 has no truth at all and is left out of the category mean
    truth = frame([(0, "C", 2, ["a", None]), (1, "C", 2, [None, None]), (2, "C", 2, ["b", None])])
    pred = frame([(0, "C", 2, ["a", "x"]), (1, "C", 2, ["b", "y"]), (2, "C", 2, ["b", "z"])])
    final, table = score(truth, pred)
    assert table.loc[0, "n"] == 2 and table.loc[0, "score"] == pytest.approx(1.0)
    assert table.loc[1, "n"] == 0 and np.isnan(table.loc[1, "score"])
    assert final == pytest.approx(1.0)


def test_outside_vocabulary_and_dummy_value_count_as_wrong_labels():
    truth = frame([(0, "C", 1, ["a"]), (1, "C", 1, ["a"])])
    pred = frame([(0, "C", 1, ["a"]), (1, "C", 1, [DUMMY])])
    _, table = score(truth, pred)
    # labels {a, dummy}: F1(a) = 2*1/(2+1), F1(dummy) = 0
    assert table.loc[0, "micro_f1"] == pytest.approx(0.5)
    assert table.loc[0, "macro_f1"] == pytest.approx((2 / 3 + 0) / 2)


def test_categories_weigh_equally_whatever_their_size():
    truth = frame([(i, "Big", 1, ["a"]) for i in range(9)] + [(9, "Small", 1, ["a"])])
    pred = frame([(i, "Big", 1, ["a"]) for i in range(9)] + [(9, "Small", 1, ["b"])])
    final, _ = score(truth, pred)
    assert final == pytest.approx(0.5)


def test_f1_scores_match_sklearn_on_random_data():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n_labels = int(rng.integers(2, 12))
        y_true = rng.integers(0, n_labels, size=int(rng.integers(1, 300)))
        # skewed predictions, so some classes are never predicted
        y_pred = np.minimum(rng.integers(0, n_labels, size=len(y_true)), rng.integers(0, n_labels))
        micro, macro, s = f1_scores(y_true, y_pred, n_labels)
        assert micro == pytest.approx(f1_score(y_true, y_pred, average="micro"))
        assert macro == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
        assert s == pytest.approx(0 if micro + macro == 0 else 2 * micro * macro / (micro + macro))


def test_f1_score_rows_equal_f1_scores_row_by_row():
    rng = np.random.default_rng(1)
    for _ in range(30):
        n_labels = int(rng.integers(1, 12))
        y_true = rng.integers(0, n_labels, size=int(rng.integers(1, 200)))
        y_preds = np.minimum(rng.integers(0, n_labels, size=(7, len(y_true))), rng.integers(0, n_labels, (7, 1)))
        y_preds[0] = y_true  # a perfect row, and one with no hit at all
        y_preds[1] = (y_true + 1) % n_labels
        rows = f1_score_rows(y_true, y_preds, n_labels)
        assert rows == pytest.approx([f1_scores(y_true, p, n_labels)[2] for p in y_preds], abs=1e-12)


def test_both_zero_scores_zero():
    assert f1_scores(np.array([0, 0]), np.array([1, 1]), 2) == (0.0, 0.0, 0.0)


def test_cli_prints_one_for_the_solution_and_baseline_below(tiny_data, tmp_path):
    out = run_script("-m", "utils.metric", "--submission", str(tiny_data / "test_solution.csv"),
                     "--solution", str(tiny_data / "test_solution.csv"))
    assert float(out.stdout.strip().splitlines()[-1]) == pytest.approx(1.0)
    run_script("-m", "utils.tools.baseline", "--data-dir", str(tiny_data), "--out", str(tmp_path / "b.csv"))
    out = run_script("-m", "utils.metric", "--submission", str(tmp_path / "b.csv"),
                     "--solution", str(tiny_data / "test_solution.csv"))
    assert 0.1 < float(out.stdout.strip().splitlines()[-1]) < 0.7


@pytest.fixture
def valid(tiny_data):
    data = read_dataset(tiny_data)
    schema = Schema.fit(data.train, data.category_attrs)
    sub = make_submission(data.test.id, data.test.Category, majority_logits(schema, len(data.test)), schema)
    assert validate_submission(sub, data.test, schema) == []
    return sub, data.test, schema


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.iloc[1:], "test id(s) missing"),
    (lambda s: pd.concat([s, s.iloc[:2]]), "duplicate id"),
    (lambda s: s.drop(columns=["len"]), "columns are"),
    (lambda s: s.assign(len=s["len"] + 1), "whose len is not their category's"),
    (lambda s: s.assign(attr_1="not-a-value"), "outside the vocabulary"),
    (lambda s: s.assign(attr_10=np.where(s["len"] < 10, "zari", DUMMY)), "past len without 'dummy_value'"),
    (lambda s: s.assign(attr_2=None), "empty cell"),
    (lambda s: s.assign(id=s.id + 100000), "not in test.csv"),
    (lambda s: s.assign(Category="Jeans"), "unknown Category"),
])
def test_validator_catches_each_problem(valid, edit, message):
    sub, test, schema = valid
    problems = validate_submission(edit(sub.copy()), test, schema)
    assert any(message in p for p in problems), problems


def test_validator_reports_every_problem_not_only_the_first(valid):
    sub, test, schema = valid
    bad = sub.iloc[1:].assign(attr_1="not-a-value", len=sub["len"].iloc[1:] + 1)
    assert len(validate_submission(bad, test, schema)) >= 3
