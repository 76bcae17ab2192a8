import numpy as np
import pandas as pd
import pytest

from utils.blend import blend, head_log_softmax, load_oof
from utils.data.schema import Schema
from utils.ensemble import search
from utils.errors import DataError
from utils.io import save_logits
from utils.metric import score
from utils.run import RunDir
from utils.serve.submission import make_submission
from utils.tools.demo_data import COUNTS, sample_labels


def sphere(x):
    return float((x ** 2).sum())


def rastrigin(x):
    return float(10 * len(x) + (x ** 2 - 10 * np.cos(2 * np.pi * x)).sum())


@pytest.mark.parametrize("fn, bound", [(sphere, 5.12), (rastrigin, 5.12)])
def test_sto_beats_random_search_at_equal_budget(fn, bound):
    wins = 0
    for seed in range(5):
        pop, iters = 20, 25
        budget = pop * (1 + 4 * iters)
        # shifted optimum, so the bounds' centre is not the answer
        shift = np.random.default_rng(100 + seed).uniform(-2, 2, 10)
        f = lambda x: fn(x - shift)
        _, f_sto = search.sto(f, 10, -bound, bound, pop, iters, np.random.default_rng(seed))
        _, f_rand = search.random_search(f, 10, -bound, bound, budget, np.random.default_rng(seed))
        wins += f_sto < f_rand
    assert wins == 5


def test_sto_counts_its_evaluations():
    calls = []
    search.sto(lambda x: calls.append(1) or sphere(x), 3, -1, 1, 6, 4, np.random.default_rng(0))
    assert len(calls) == 6 * (1 + 4 * 4)


@pytest.fixture
def synthetic():
    """Labels drawn like the real data, and three members of different skill."""
    rng = np.random.default_rng(0)
    train = sample_labels(1500, rng)
    train.insert(0, "id", np.arange(len(train)))
    schema = Schema.fit(train, {c: list(a) for c, a in COUNTS.items()})
    targets = schema.encode(train)
    onehot = schema.one_hot(targets)
    logits = [onehot * s + rng.normal(0, 1, onehot.shape).astype(np.float32) for s in (0.5, 1.0, 1.5)]
    folds = rng.integers(0, 3, len(train))
    return train, schema, targets, logits, folds


def test_objective_equals_the_metric_on_a_blend(synthetic):
    train, schema, targets, logits, _ = synthetic
    members = np.stack([head_log_softmax(z, schema) for z in logits])
    weights = np.array([0.2, 0.3, 0.5])
    bias = np.random.default_rng(1).normal(0, 0.3, schema.n_logits).astype(np.float32)
    obj = search.BlendObjective(members, targets, schema)
    sub = make_submission(train.id, train.Category, blend(members, weights, schema, bias), schema)
    expected, _ = score(train, sub)
    assert obj.score(weights, bias) == pytest.approx(expected, abs=1e-9)


def test_bias_fitting_improves_macro_f1_in_sample(synthetic):
    train, schema, targets, logits, _ = synthetic
    members = np.stack([head_log_softmax(z, schema) for z in logits])
    obj = search.BlendObjective(members, targets, schema)
    w = np.ones(3)
    bias = obj.fit_bias(w, rounds=1, span=2.0, steps=5)
    assert obj.score(w, bias) > obj.score(w)


def _fit_bias_point_by_point(obj, weights, rounds, span, steps):
    """The bias search scored one grid point at a time, through the metric's own f1_scores."""
    from utils.metric import f1_scores

    w, bias = obj.head_weights(weights), np.zeros(obj.schema.n_logits, dtype=np.float32)
    grid = np.linspace(-span, span, steps).astype(np.float32)
    for j, h in enumerate(obj.schema.heads):
        z, y, b = obj.blended(j, w), obj.y[j], np.zeros(h.width, dtype=np.float32)
        best = f1_scores(y, z.argmax(axis=1), h.width)[2]
        for _ in range(rounds):
            for c in range(h.width):
                keep = b[c]
                for value in grid:
                    b[c] = value
                    s = f1_scores(y, (z + b).argmax(axis=1), h.width)[2]
                    if s > best + 1e-12:
                        best, keep = s, value
                b[c] = keep
        bias[h.logits] = b
    return bias


@pytest.mark.parametrize("decimals", [None, 0])
def test_the_bias_search_scores_its_grid_at_once_exactly_as_point_by_point(synthetic, decimals):
    """The same biases as trying each grid point in turn, ties included: logits rounded to whole
    numbers make many rows tie between classes, where argmax's first-index rule decides."""
    train, schema, targets, logits, _ = synthetic
    members = np.stack([head_log_softmax(z, schema) for z in logits])
    if decimals is not None:
        members = np.round(members, decimals)
    obj = search.BlendObjective(members, targets, schema)
    w = np.array([0.2, 0.3, 0.5])
    fast, slow = obj.fit_bias(w, rounds=2, span=2.0, steps=9), _fit_bias_point_by_point(obj, w, 2, 2.0, 9)
    assert np.count_nonzero(slow) > 10
    np.testing.assert_array_equal(fast, slow)


def test_pure_noise_shows_no_nested_gain(synthetic):
    """Weights fitted on noise look good in sample; held-out folds must not show that gain.
    (Biases are left out here: on noise they still learn each head's class prior, a real gain
    that does carry over to held-out rows.)"""
    train, schema, targets, _, folds = synthetic
    rng = np.random.default_rng(5)
    noise = np.stack([head_log_softmax(rng.normal(0, 1, (len(train), schema.n_logits)).astype(np.float32), schema)
                      for _ in range(5)])
    budget = search.Budget(population=8, iterations=4)
    equal = search.nested_cv(noise, targets, folds, schema, "equal", False, False, budget, 42)["score"]
    nested = search.nested_cv(noise, targets, folds, schema, "sto", False, False, budget, 42)["score"]
    in_sample = search.BlendObjective(noise, targets, schema)
    in_sample_score = in_sample.score(search.fit_weights("sto", in_sample, False, budget, 0))
    assert in_sample_score > equal + 0.01
    assert nested < equal + 0.01
    assert in_sample_score - nested > 0.008


def test_the_paired_bootstrap_finds_the_standard_error_of_a_score_difference():
    """One balanced binary head, one prediction right everywhere and one wrong on a share p of the
    images (as often each way): the score is then about the accuracy, and the standard error of the
    difference about sqrt(p (1 - p) / n)."""
    n, p = 2000, 0.1
    schema = Schema({"c": ["a"]}, {"c/a": ["x", "y"]})
    truth = np.arange(n) % 2
    obj = search.BlendObjective(np.zeros((1, n, 2), np.float32), truth[:, None], schema)
    wrong = np.random.default_rng(0).permutation(n)[: int(p * n)]
    flipped = truth.copy()
    flipped[wrong] = 1 - flipped[wrong]
    se = search.paired_se(obj, [truth], [flipped], samples=400)
    assert se == pytest.approx(np.sqrt(p * (1 - p) / n), rel=0.15)
    assert search.paired_se(obj, [flipped], [flipped]) == 0.0
    half_flipped = truth.copy()
    half_flipped[wrong[: len(wrong) // 2]] ^= 1
    half = search.paired_se(obj, [truth], [half_flipped], samples=400)
    assert half < se  # fewer differing images, a smaller error


def _write_run(out, schema, train, folds, name, logits):
    schema.save(out / "schema.json")
    pd.DataFrame({"id": train.id, "fold": folds}).to_csv(out / "folds.csv", index=False)
    for k in range(3):
        rows = np.flatnonzero(folds == k)
        save_logits(out / name / f"fold{k}" / "oof_logits.npz", train.id.to_numpy()[rows], logits[rows],
                    schema.fingerprint, k)


def test_misaligned_ids_and_layouts_raise(synthetic, tmp_path):
    train, schema, targets, logits, folds = synthetic
    _write_run(tmp_path, schema, train, folds, "good", logits[0])
    # a run missing rows
    short = np.flatnonzero(folds == 0)[:-1]
    save_logits(tmp_path / "bad_ids" / "fold0" / "oof_logits.npz", train.id.to_numpy()[short], logits[0][short],
                schema.fingerprint, 0)
    for k in (1, 2):
        rows = np.flatnonzero(folds == k)
        save_logits(tmp_path / "bad_ids" / f"fold{k}" / "oof_logits.npz", train.id.to_numpy()[rows], logits[0][rows],
                    schema.fingerprint, k)
    with pytest.raises(DataError, match="run bad_ids: its OOF ids do not cover"):
        load_oof(RunDir(tmp_path), ["good", "bad_ids"], train.id.to_numpy())
    # a run made with another schema
    _write_run(tmp_path, schema, train, folds, "other_schema", logits[1])
    for k in range(3):
        path = tmp_path / "other_schema" / f"fold{k}" / "oof_logits.npz"
        z = np.load(path)
        save_logits(path, z["ids"], z["logits"], "0000000000000000", k)
    with pytest.raises(DataError, match="run other_schema: .*made with schema 0000000000000000"):
        load_oof(RunDir(tmp_path), ["good", "other_schema"], train.id.to_numpy())
    assert load_oof(RunDir(tmp_path), ["good"], train.id.to_numpy()).shape == (1, len(train), schema.n_logits)


def test_head_log_softmax_normalises_each_head_alone_in_numpy_and_in_the_merged_graph():
    """The numpy function (OOF blending) and the merged ONNX graph's padded form (serving) give
    the per-head log-softmax computed head by head, on the 42 real heads of uneven widths."""
    import torch

    from utils.serve.graph import Blend

    rng = np.random.default_rng(3)
    schema = Schema.fit(sample_labels(500, rng), {c: list(a) for c, a in COUNTS.items()})
    z = rng.normal(0, 4, (2, 9, schema.n_logits)).astype(np.float32)  # [folds, rows, logits]
    by_head = np.concatenate([z[..., h.logits] - np.log(np.exp(z[..., h.logits]).sum(-1, keepdims=True))
                              for h in schema.heads], axis=-1)
    graph = Blend([], np.zeros((0, schema.n_logits)), np.zeros(schema.n_logits), schema)
    np.testing.assert_allclose(graph.head_log_softmax(torch.from_numpy(z)).numpy(), by_head, atol=1e-5)
    for fold in range(2):
        np.testing.assert_allclose(head_log_softmax(z[fold], schema), by_head[fold], atol=1e-5)
    assert head_log_softmax(z[0], schema).flags["C_CONTIGUOUS"]


@pytest.mark.slow
def test_search_at_full_scale_fits_in_a_few_gb():
    """20 members x 70,000 rows x 42 heads: the logits alone are 0.95 GB of float32; the objective
    keeps one per-head copy. A float64 or per-evaluation copy would pass 3 GB."""
    from tests.conftest import run_script

    code = ("import resource, runpy, sys\n"
            "sys.argv = ['utils/bench/ensemble.py', '--models', '20', '--rows', '70000', '--sto-population', '2',\n"
            "            '--sto-iterations', '1']\n"
            "runpy.run_module('utils.bench.ensemble', run_name='__main__')\n"
            "print('peak_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    proc = run_script("-c", code)
    assert "STO N=2 T=1" in proc.stdout  # the peak is the data's, whatever the search's length
    peak_gb = int(proc.stdout.rsplit("peak_kb", 1)[1].split()[0]) / 2**20
    assert 0.95 < peak_gb < 3.0, peak_gb


def test_heldout_predicts_each_fold_as_train_py_did_and_scores_the_blend_as_infer_does(tiny_data, tiny_run, tmp_path,
                                                                                         monkeypatch):
    """``utils.bench.heldout``: a fold's logits predicted from its best.pt equal the test logits
    train.py saved; the second call reads them from its cache (a touched checkpoint too), a changed
    one is predicted again; the ensemble.json row scores what infer.py --from-logits scores, the served row what
    infer.py scores through export.py's choice."""
    import os
    import shutil

    import torch

    from tests.conftest import MODELS
    from utils.bench import heldout
    from utils.blend import load_test_logits
    from utils.data.schema import read_test
    from utils.serve.export import ExportConfig, export
    from utils.serve.infer import InferConfig, infer

    run, data = tmp_path / "run", tmp_path / "data"
    shutil.copytree(tiny_run, run)
    shutil.copytree(tiny_data, data)  # the same test photos under another folder: its own cache
    served = infer(InferConfig(data_dir=str(data), out_dir=str(run), from_logits=True,
                               output=str(tmp_path / "sub.csv"), progress=False))["score"]
    rd = RunDir(run)
    test = read_test(data / "test.csv", rd.schema.categories)
    saved = load_test_logits(rd, MODELS[0], test["id"].to_numpy())
    for k in range(rd.n_folds):
        rd.fold_file(MODELS[0], k, "test_logits.npz").unlink()
    cfg = heldout.HeldOutConfig(data_dir=str(data), out_dir=str(run), workers=0, progress=False)
    predicted = heldout.fold_logits(cfg, rd, MODELS[0], test)
    assert len(predicted) == rd.n_folds
    for k in range(rd.n_folds):
        np.testing.assert_allclose(predicted[k], saved[k], atol=1e-4)
    assert (run / "heldout" / "data" / MODELS[0] / "fold0.npz").is_file()

    def no_prediction(*args):
        raise AssertionError("predicted again")

    monkeypatch.setattr(heldout, "torch_members", no_prediction)
    again = heldout.fold_logits(cfg, rd, MODELS[0], test)
    assert all((a == p).all() for a, p in zip(again, predicted))
    ckpt = rd.fold_file(MODELS[0], 1, "best.pt")
    os.utime(ckpt, ns=(ckpt.stat().st_atime_ns, ckpt.stat().st_mtime_ns + 10 ** 9))  # touched, the same content
    heldout.fold_logits(cfg, rd, MODELS[0], test)
    original, state = ckpt.read_bytes(), torch.load(ckpt, weights_only=False)
    name = next(k for k, v in state["state_dict"].items() if v.is_floating_point())
    state["state_dict"][name] = state["state_dict"][name] + 1.0
    torch.save(state, ckpt)  # another checkpoint
    with pytest.raises(AssertionError, match="predicted again"):
        heldout.fold_logits(cfg, rd, MODELS[0], test)
    ckpt.write_bytes(original)  # the run's own again: its OOF logits and ensemble.json are not stale
    monkeypatch.undo()
    export(ExportConfig(data_dir=str(data), out_dir=str(run), budget_ms=1000, latency_images=4, parity_images=8,
                        timing_images=4, progress=False))  # a served choice in the manifest
    onnx = infer(InferConfig(data_dir=str(data), out_dir=str(run), output=str(tmp_path / "onnx.csv"),
                             workers=0, progress=False))["score"]  # what export.py chose, through ONNX
    table = heldout.main(cfg)
    blend_row = table[table["what"].str.startswith("ensemble.json")].iloc[0]
    assert blend_row["folds averaged"] == pytest.approx(served, abs=1e-6)
    assert table[table["what"].str.startswith("served")].iloc[0]["folds averaged"] == pytest.approx(onnx, abs=1e-6)
    assert list(table["what"][:2]) == list(MODELS) and table["OOF"][:2].notna().all()
