"""The whole flow on tiny generated data: train two backbones, ensemble, export, infer."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from tests.conftest import MODELS, TRAIN, pipeline, run_script
from utils.data.schema import ID, Schema, image_path, read_dataset
from utils.errors import DataError
from utils.io import load_logits
from utils.metric import validate_submission
from utils.run import RunDir


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run


def infer(data, out, output, *extra):
    return run_script("infer.py", "--data-dir", str(data), "--out-dir", str(out), "--output", str(output),
                      "--progress", "false", "--workers", "1", *extra)


def test_ensemble_json_and_onnx_parity(run):
    spec = json.loads((run / "ensemble.json").read_text())
    assert sorted(spec["models"]) == list(MODELS)
    assert np.isclose(sum(spec["weights"]), 1.0)
    assert len(spec["biases"]) == Schema.load(run / "schema.json").n_logits
    manifest = json.loads((run / "onnx" / "manifest.json").read_text())
    for member in manifest["members"]:
        assert len(member["folds"]) == 3
        for fold in member["folds"]:
            assert fold["parity_max_abs_diff"] <= 1e-3 and fold["parity_same_decoding"]
    assert manifest["merged"]["parity_max_abs_diff"] <= 1e-3
    assert manifest["use"] in ("merged", "separate")


def test_a_merged_graph_joins_its_folds_files_and_stores_what_they_share_once(run, tmp_path):
    """export_graph joins the folds' own ONNX files under the blend: one fold listed three times
    (as the frozen route's folds share a backbone) is stored once, and computes that fold's own
    per-head log-probabilities; two members blend as combine_members does on separate sessions."""
    import onnx

    from utils.blend import combine_members, head_log_softmax
    from utils.data.transforms import Preprocess
    from utils.serve.graph import export_graph, make_session

    rd, manifest = RunDir(run), json.loads((run / "onnx" / "manifest.json").read_text())
    schema, entries = rd.schema, {e["run"]: e for e in manifest["members"]}
    prep = Preprocess.from_dict(entries[MODELS[0]]["preprocess"])
    files = {r: [run / "onnx" / f["path"] for f in e["folds"]] for r, e in entries.items()}
    x = np.random.default_rng(0).normal(size=(3, 3, prep.img_size, prep.img_size)).astype(np.float32)
    bias = np.zeros(schema.n_logits, np.float32)
    export_graph([[files[MODELS[0]][0]] * 3], np.ones(1), bias, schema, prep, tmp_path / "three.onnx")
    export_graph([files[MODELS[0]][:1]], np.ones(1), bias, schema, prep, tmp_path / "one.onnx")
    fold = make_session(files[MODELS[0]][0], 1).run(None, {"image": x})[0]
    three = make_session(tmp_path / "three.onnx", 1).run(None, {"image": x})[0]
    np.testing.assert_allclose(three, head_log_softmax(fold, schema), atol=1e-4)
    stored = {n: onnx.load(str(tmp_path / f"{n}.onnx")).graph.initializer for n in ("one", "three")}
    folds = {n: [t.name for t in inits if t.name.startswith("fold")] for n, inits in stored.items()}
    assert folds["three"] == folds["one"] and all(n.startswith("fold0/") for n in folds["one"])  # once, not 3 times
    assert (tmp_path / "three.onnx").stat().st_size < 1.5 * (tmp_path / "one.onnx").stat().st_size
    weights, bias = np.array([0.3, 0.7]), np.linspace(-1, 1, schema.n_logits).astype(np.float32)
    export_graph([files[m] for m in MODELS], weights, bias, schema, prep, tmp_path / "two.onnx")
    logits = {m: [make_session(f, 1).run(None, {"image": x})[0] for f in files[m]] for m in MODELS}
    expected = combine_members(logits, {"models": list(MODELS), "weights": weights, "biases": bias}, schema)
    np.testing.assert_allclose(make_session(tmp_path / "two.onnx", 1).run(None, {"image": x})[0], expected, atol=1e-4)


def test_a_fold_graph_with_a_subgraph_is_joined_with_the_names_inside_it_renamed(run, tmp_path):
    """A fold's graph may hold subgraphs (an If's branches: the exporter writes one for a squeeze of
    a dynamic axis) that read the outer graph's names: joined twice, each copy's branches read its
    own fold's values, and the merged graph computes what the fold computes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from utils.blend import head_log_softmax
    from utils.data.transforms import Preprocess
    from utils.serve.graph import export_graph, make_session

    rd = RunDir(run)
    schema, size = rd.schema, 4
    w = np.random.default_rng(1).normal(size=(3 * size * size, schema.n_logits)).astype(np.float32)
    branch = lambda op, out: helper.make_graph([helper.make_node(op, ["z"], [out])], op.lower(), [],
                                               [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["image"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["z"]),
         helper.make_node("If", ["cond"], ["logits"], then_branch=branch("Identity", "then_out"),
                          else_branch=branch("Neg", "else_out"))],
        "fold", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", schema.n_logits])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(True), "cond")])
    fold = tmp_path / "fold.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(fold))
    prep = Preprocess.from_dict({**json.loads((run / "onnx" / "manifest.json").read_text())["members"][0]["preprocess"],
                                 "img_size": size})
    export_graph([[fold, fold]], np.ones(1), np.zeros(schema.n_logits, np.float32), schema, prep, tmp_path / "m.onnx")
    x = np.random.default_rng(2).normal(size=(2, 3, size, size)).astype(np.float32)
    merged = make_session(tmp_path / "m.onnx", 1).run(None, {"image": x})[0]
    np.testing.assert_allclose(merged, head_log_softmax(x.reshape(2, -1) @ w, schema), atol=1e-4)
    branches = [n for n in onnx.load(str(tmp_path / "m.onnx")).graph.node if n.op_type == "If"]
    assert [b.attribute[0].g.node[0].input[0] for b in branches] == ["fold0/z", "fold1/z"]


def test_valid_submission_and_backends_agree(run, tiny_data, tmp_path):
    proc = infer(tiny_data, run, tmp_path / "onnx.csv")
    assert "score against test_solution.csv" in proc.stdout
    infer(tiny_data, run, tmp_path / "torch.csv", "--backend", "torch")
    infer(tiny_data, run, tmp_path / "logits.csv", "--from-logits", "true")
    data = read_dataset(tiny_data)
    schema = Schema.load(run / "schema.json")
    sub = pd.read_csv(tmp_path / "onnx.csv", dtype=str, keep_default_na=False)
    sub["id"] = sub["id"].astype(int)
    sub["len"] = sub["len"].astype(int)
    assert validate_submission(sub, data.test, schema) == []
    scores = torch_blend(run, tiny_data)
    same_up_to_ties(tmp_path / "onnx.csv", tmp_path / "torch.csv", scores, schema)
    same_up_to_ties(tmp_path / "logits.csv", tmp_path / "torch.csv", scores, schema)


def torch_blend(run, data_dir):
    """The torch backend's blended scores of every test row, in test.csv order."""
    import torch

    from utils.blend import combine_members, load_ensemble
    from utils.data.schema import image_path, read_test
    from utils.run import RunDir
    from utils.serve.members import preprocess_batch, run_members, torch_members

    run_dir = RunDir(run)
    test = read_test(data_dir / "test.csv", run_dir.schema.categories)
    ens = load_ensemble(run_dir)
    members = torch_members(ens, run_dir.schema)
    with torch.inference_mode():
        images = {m.prep: preprocess_batch([image_path(data_dir / "test_images", i) for i in test.id], m.prep)
                  for m in members}
        return combine_members(run_members(members, images), ens, run_dir.schema)


def same_up_to_ties(a, b, scores, schema, tol=2e-3):
    """Two submissions (files) agree in every cell, except where the torch blend's top two classes
    are within ``tol`` of each other (float rounding between kernels may flip those), and such
    cells are rare. Any real difference (preprocessing, weights, layout) changes far more."""
    a, b = (pd.read_csv(p, dtype=str, keep_default_na=False) for p in (a, b))
    assert list(a.id) == list(b.id) and list(a.Category) == list(b.Category)
    differing = 0
    for j, head in enumerate(schema.heads):
        rows = np.flatnonzero((a.Category == head.category).to_numpy())
        for r in rows[(a[head.column].to_numpy()[rows] != b[head.column].to_numpy()[rows])]:
            top2 = np.sort(scores[r, head.logits])[-2:]
            assert top2[1] - top2[0] < tol, f"row {r} {head.name}: {a.at[r, head.column]} vs {b.at[r, head.column]}"
            differing += 1
    cells = sum(int((a.Category == h.category).sum()) for h in schema.heads)
    assert differing <= 0.01 * cells, (differing, cells)


@pytest.mark.slow
def test_unknown_test_category_is_a_clear_error(run, tiny_data, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_data, data_dir, ignore=shutil.ignore_patterns("*_images"))
    test = pd.read_csv(data_dir / "test.csv")
    test.loc[2, "Category"] = "Jeans"
    test.to_csv(data_dir / "test.csv", index=False)
    proc = run_script("infer.py", "--data-dir", str(data_dir), "--out-dir", str(run), "--output",
                      str(tmp_path / "sub.csv"), "--from-logits", "true", check=False)
    assert proc.returncode != 0
    assert "test.csv line 4" in proc.stderr and "'Jeans'" in proc.stderr
    assert not (tmp_path / "sub.csv").exists()


@pytest.mark.slow
def test_the_same_seed_reproduces_the_pipeline(run, tiny_data, tmp_path):
    again = pipeline(tiny_data, tmp_path / "again")
    assert (run / "folds.csv").read_bytes() == (again / "folds.csv").read_bytes()
    for model in MODELS:
        for k in range(3):
            a = np.load(run / model / f"fold{k}" / "oof_logits.npz")
            b = np.load(again / model / f"fold{k}" / "oof_logits.npz")
            assert (a["ids"] == b["ids"]).all()
            np.testing.assert_allclose(a["logits"], b["logits"], atol=1e-6, rtol=0)
    first, second = (json.loads((d / "ensemble.json").read_text()) for d in (run, again))
    assert first["weights"] == second["weights"] and first["biases"] == second["biases"]
    infer(tiny_data, run, tmp_path / "a.csv")
    infer(tiny_data, again, tmp_path / "b.csv")
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()


@pytest.mark.slow
def test_inference_memory_stays_flat(run, tiny_data):
    """2,000 rows of 32 px images through the streaming loop; holding on to every batch's images
    would add 0.9 x 2,000 x 3 x 32 x 32 x 4 bytes = 22 MB after the first tenth."""
    from utils.bench.memory import BenchMemoryConfig
    from utils.bench.memory import main as bench_memory
    from utils.config import parse_config

    stats = bench_memory(parse_config(BenchMemoryConfig, ["--data-dir", str(tiny_data), "--out-dir", str(run),
                                                          "--rows", "2000", "--infer-args", "--workers 1"]))
    assert stats["submission_rows"] == 2000
    assert stats["rss_growth_mb"] < 15, stats
    assert stats["pss_growth_mb"] < 15, stats


def test_onnx_file_from_another_schema_is_refused(run):
    from utils.serve.graph import make_session

    schema = Schema.load(run / "schema.json")
    manifest = json.loads((run / "onnx" / "manifest.json").read_text())
    paths = [run / "onnx" / manifest["merged"]["path"], run / "onnx" / manifest["members"][0]["folds"][0]["path"]]
    d = schema.to_dict()
    d["vocabs"]["Men Tshirts/color"] = d["vocabs"]["Men Tshirts/color"] + ["zebra"]
    for path in paths:
        with pytest.raises(DataError, match=r"exported for another schema.*Men Tshirts/color.*zebra"):
            make_session(path, 1, Schema.from_dict(d))
        assert make_session(path, 1, schema).get_inputs()[0].name == "image"  # its own schema is accepted


@pytest.mark.slow
def test_a_run_trained_with_the_mirror_is_served_with_it(tiny_data, tmp_path):
    """A run trained with tta_hflip made its OOF and test logits with the mirror averaged in (its
    ensemble weights rest on them); exported and served, on both backends, it gives those test
    logits again, not the plain image's, which differ here by far more than the tolerance."""
    import torch

    from utils.blend import load_ensemble
    from utils.serve.members import Member, onnx_members, preprocess_batch, run_members, torch_members

    dirs = ["--data-dir", str(tiny_data), "--out-dir", str(tmp_path)]
    run_script("train.py", "--model", "test_byobnet", *dirs, *TRAIN, "--tta-hflip", "true", "--name", "mirror",
               "--amp", "off")  # fp32 test logits: served ones match them to 1e-3
    run_script("export.py", *dirs, "--parity-images", "4", "--timing-images", "2", "--progress", "false")
    rd, test = RunDir(tmp_path), read_dataset(tiny_data).test
    ens, schema = load_ensemble(rd, ["mirror"]), rd.schema
    ids = test[ID].to_numpy()[:16]
    for members in (onnx_members(rd, ens, schema, False, 2)[0], torch_members(ens, schema)):
        (member,) = members
        assert member.hflip
        x = preprocess_batch([image_path(tiny_data / "test_images", i) for i in ids], member.prep)
        with torch.inference_mode():  # as infer.py serves
            served = run_members(members, {member.prep: x})["mirror"]
            plain = run_members([Member("plain", member.folds, member.prep)], {member.prep: x})["plain"]
        for k in range(3):
            saved_ids, saved = load_logits(rd.fold_file("mirror", k, "test_logits.npz"))
            saved = saved[pd.Series(np.arange(len(saved_ids)), index=saved_ids)[ids].to_numpy()]
            np.testing.assert_allclose(served[k], saved, atol=1e-3)
            assert np.abs(plain[k] - saved).max() > 2e-2
