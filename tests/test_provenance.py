"""Nothing stale: every derived file knows what it was made from, and serving uses exactly the
preprocessing a checkpoint was trained and validated with."""
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import run_script
from utils import provenance
from utils.blend import load_ensemble
from utils.data.dataset import ImageDataset
from utils.data.schema import ID, image_path, read_dataset
from utils.errors import StaleError
from utils.run import RunDir
from utils.serve.members import onnx_members, preprocess_batch, torch_members
from utils.train.model import checkpoint_preprocess, load_checkpoint


@pytest.fixture
def run(tiny_run, tmp_path):
    """A private copy of the tiny trained, ensembled and exported run."""
    return shutil.copytree(tiny_run, tmp_path / "run")


def infer(data, run, out, *extra):
    return run_script("infer.py", "--data-dir", str(data), "--out-dir", str(run), "--output", str(out),
                      "--progress", "false", "--workers", "0", *extra, check=False)


def test_a_copied_run_folder_stays_valid_and_a_changed_input_is_named(tmp_path):
    (tmp_path / "a").mkdir()
    src = tmp_path / "a" / "best.pt"
    src.write_bytes(b"weights" * 1000)
    rec = provenance.record([src], tmp_path / "a", rebuild="python train.py ...")
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # new modification times, same content
    os.utime(tmp_path / "b" / "best.pt", ns=(1, 1))
    provenance.check(rec, tmp_path / "b", "oof_logits.npz")
    (tmp_path / "b" / "best.pt").write_bytes(b"other" * 1000)
    with pytest.raises(StaleError, match=r"oof_logits.npz is stale: it was made from best.pt, which changed since "
                                         r".*7,000 -> 5,000 bytes.*Rebuild it with: python train.py"):
        provenance.check(rec, tmp_path / "b", "oof_logits.npz")
    (tmp_path / "b" / "best.pt").unlink()
    with pytest.raises(StaleError, match="best.pt, which is missing"):
        provenance.check(rec, tmp_path / "b", "oof_logits.npz")


@pytest.mark.slow
def test_ensemble_rerun_after_export_makes_infer_refuse_naming_ensemble_json(run, tiny_data, tmp_path):
    before = json.loads((run / "ensemble.json").read_text())
    other_bias = "off" if before["bias"] else "on"
    run_script("ensemble.py", "--data-dir", str(tiny_data), "--out-dir", str(run), "--method", "equal",
               "--bias", other_bias, "--compare", "equal", "--progress", "false")
    after = json.loads((run / "ensemble.json").read_text())
    assert (after["bias"], after["biases"]) != (before["bias"], before["biases"])
    proc = infer(tiny_data, run, tmp_path / "sub.csv")
    assert proc.returncode == 2 and not (tmp_path / "sub.csv").exists()
    assert "manifest.json is stale: it was made from ensemble.json, which changed since" in proc.stderr
    assert "Rebuild it with: python export.py" in proc.stderr
    # the torch backend reads the checkpoints, whose logits ensemble.json was fitted on: it serves
    assert infer(tiny_data, run, tmp_path / "torch.csv", "--backend", "torch").returncode == 0
    run_script("export.py", "--data-dir", str(tiny_data), "--out-dir", str(run), "--timing-images", "3",
               "--progress", "false")
    assert infer(tiny_data, run, tmp_path / "sub.csv").returncode == 0  # re-exported: served again


def test_a_relabelled_train_csv_with_the_same_vocabularies_is_refused(run, tiny_data, tmp_path):
    """The schema sees vocabularies, not labels: one label changed to another value of the same head
    leaves schema.json and folds.csv agreeing, so labels.json records the labels themselves, and
    every reader of the train labels (ensemble.py, export.py, a student, train.py) refuses."""
    data = shutil.copytree(tiny_data, tmp_path / "data")
    train = pd.read_csv(data / "train.csv", dtype=str, keep_default_na=False)
    head = train.groupby(["Category", "attr_1"]).size()
    cat, value = head[head >= 2].index[0]  # a value that stays in the vocabulary after one row changes
    other = next(v for (c, v), n in head.items() if c == cat and v not in (value, ""))
    train.loc[train.index[(train["Category"] == cat) & (train["attr_1"] == value)][0], "attr_1"] = other
    train.to_csv(data / "train.csv", index=False)
    for script in ("ensemble.py", "export.py"):
        proc = run_script(script, "--data-dir", str(data), "--out-dir", str(run), "--progress", "false", check=False)
        assert proc.returncode == 2 and f"the train labels differ from those {run} was made with" in proc.stderr
    proc = run_script("train.py", "--model", "test_byobnet", "--data-dir", str(data), "--out-dir", str(run),
                      "--n-folds", "3", "--fold", "0", "--resume", check=False)
    assert proc.returncode == 2 and "labels.json" in proc.stderr
    # the original labels pass the same check
    run_script("ensemble.py", "--data-dir", str(tiny_data), "--out-dir", str(run), "--progress", "false",
               "--sto-population", "4", "--sto-iterations", "1", "--compare", "equal,sto")


@pytest.mark.slow
def test_a_checkpoint_replaced_after_export_is_refused(run, tiny_data, tmp_path):
    path = run / "test_byobnet" / "fold1" / "best.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, path)
    for backend in ("onnx", "torch"):  # the fold's OOF logits (so ensemble.json's fit) and its ONNX file
        proc = infer(tiny_data, run, tmp_path / f"{backend}.csv", "--backend", backend)
        assert proc.returncode == 2 and not (tmp_path / f"{backend}.csv").exists()
        assert "test_byobnet/fold1/oof_logits.npz is stale: it was made from test_byobnet/fold1/best.pt, which changed since" \
            in proc.stderr
        assert f"python train.py --config {run}/test_byobnet/fold1/config.yaml --out-dir {run} --fold 1" in proc.stderr
    with pytest.raises(StaleError, match=r"manifest.json is stale: it was made from test_byobnet/fold1/best.pt"):
        onnx_members(RunDir(run), {"models": ["test_byobnet", "test_efficientnet"]}, RunDir(run).schema, False, 1)


def test_models_override_is_served_by_the_per_fold_files_not_the_merged_graph(run, tiny_data, tmp_path):
    manifest = json.loads((run / "onnx" / "manifest.json").read_text())
    manifest["use"] = "merged"  # whatever the timing said: the merged graph holds ensemble.json's weights
    (run / "onnx" / "manifest.json").write_text(json.dumps(manifest))
    rd = RunDir(run)
    asked = load_ensemble(rd, ["test_byobnet", "test_efficientnet"])  # equal weights, no biases
    members, merged, _ = onnx_members(rd, asked, rd.schema, False, 1)
    assert not merged and [m.run for m in members] == ["test_byobnet", "test_efficientnet"]
    members, merged, _ = onnx_members(rd, load_ensemble(rd, ["test_efficientnet"]), rd.schema, False, 1)
    assert not merged and [m.run for m in members] == ["test_efficientnet"]  # one exported run alone
    members, merged, _ = onnx_members(rd, load_ensemble(rd), rd.schema, False, 1)
    assert merged  # ensemble.json's own weights: the merged graph serves


@pytest.mark.slow
def test_a_draft_false_run_is_served_exactly_the_pixels_it_validated_on(tiny_data, tmp_path):
    out = tmp_path / "run"
    run_script("train.py", "--model", "test_resnet", "--data-dir", str(tiny_data), "--out-dir", str(out), "--n-folds", "2",
               "--img-size", "40", "--epochs", "1", "--batch-size", "16", "--workers", "0", "--fold", "all",
               "--draft", "false", "--progress", "false")
    run_script("export.py", "--data-dir", str(tiny_data), "--out-dir", str(out), "--timing-images", "2",
               "--progress", "false")
    rd = RunDir(out)
    trained = checkpoint_preprocess(load_checkpoint(rd.fold_file("test_resnet", 0, "best.pt"))[1])
    assert trained.draft is False and trained.img_size == 40
    ens = load_ensemble(rd)
    served = [m.prep for m in torch_members(ens, rd.schema)] + [m.prep for m in onnx_members(rd, ens, rd.schema, False, 1)[0]]
    assert served and all(p == trained for p in served)
    # the pixels: the trainer's validation dataset against what infer.py and export.py compute
    data = read_dataset(tiny_data)
    row = rd.train_rows(data.train).query("fold == 0").iloc[0]
    path = image_path(data.train_images, row[ID])
    pixels = ImageDataset([path], [row.Category], None, trained.transform(), trained)[0]["image"]
    validated = trained.normalize(pixels).numpy()
    from utils.data.dataset import TestImages
    for prep in served:
        np.testing.assert_array_equal(prep.normalize(TestImages([row[ID]], data.train_images, [prep])[0]["images"][0]).numpy(),
                                      validated)
        np.testing.assert_array_equal(preprocess_batch([path], prep)[0], validated)
    drafted = preprocess_batch([path], type(trained)(**{**trained.to_dict(), "draft": True}))[0]
    assert not np.array_equal(drafted, validated)  # draft decoding would have served other pixels
    folds = pd.read_csv(rd.folds_path)  # the folds the served pixels were checked on: every train row once
    assert sorted(folds[ID]) == sorted(data.train[ID]) and set(folds["fold"]) == set(range(rd.n_folds))
