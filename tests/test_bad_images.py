"""Bad image files in training and in inference: skipped or repaired, named, counted."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.conftest import run_script
from utils.blend import load_oof
from utils.data.schema import Schema, read_dataset
from utils.errors import StaleError
from utils.metric import score_logits, validate_submission
from utils.run import RunDir
from utils.serve import budget
from utils.serve import export as export_module
from utils.serve.manifest import Manifest

TRAIN = ["--model", "test_resnet", "--n-folds", "3", "--img-size", "32", "--batch-size", "16", "--epochs", "1",
         "--workers", "1", "--progress", "false", "--fold", "0"]


UNUSABLE = ("truncated", "empty", "1x1", "missing")


def break_images(folder, ids):
    """Eight kinds of bad file; returns {id: kind}."""
    kinds = {}
    paths = [folder / f"{i:06d}.jpg" for i in ids]
    paths[0].write_bytes(paths[0].read_bytes()[:400]); kinds[ids[0]] = "truncated"
    paths[1].write_bytes(b""); kinds[ids[1]] = "empty"
    Image.open(paths[2]).convert("RGBA").save(paths[2], format="PNG"); kinds[ids[2]] = "png named jpg"
    Image.open(paths[3]).convert("CMYK").save(paths[3], format="JPEG"); kinds[ids[3]] = "cmyk"
    Image.new("RGB", (1, 1), "red").save(paths[4], format="JPEG"); kinds[ids[4]] = "1x1"
    Image.new("L", (512, 20000), 128).save(paths[5], format="JPEG"); kinds[ids[5]] = "512x20000 grayscale"
    paths[6].unlink(); kinds[ids[6]] = "missing"
    Image.open(paths[7]).save(paths[7], format="WEBP"); kinds[ids[7]] = "webp named jpg"
    return kinds


@pytest.fixture(scope="module")
def broken(tiny_data, tmp_path_factory):
    """A copy of the tiny data with eight bad images among fold 0's training rows."""
    from utils.data.schema import read_dataset

    data = tmp_path_factory.mktemp("broken") / "data"
    shutil.copytree(tiny_data, data)
    _, table = RunDir(tmp_path_factory.mktemp("folds")).prepare(read_dataset(data), 3, 42)
    ids = table[table.fold != 0].id.to_numpy()[:8]
    return data, break_images(data / "train_images", [int(i) for i in ids])


@pytest.mark.slow
@pytest.mark.parametrize("route", [[], ["--frozen-backbone", "--epochs", "2"]], ids=["fine-tuned", "frozen"])
def test_training_skips_unusable_images_and_repairs_odd_ones(broken, tmp_path, route):
    broken, kinds = broken
    out = tmp_path / "run"
    proc = run_script("train.py", "--data-dir", str(broken), "--out-dir", str(out), *TRAIN, "--max-bad-images", "0.05",
                      *route)
    metrics = json.loads((out / "test_resnet" / "fold0" / "metrics.json").read_text())
    bad = {int(k) for k in metrics["bad_images"]["train"]}
    assert metrics["bad_images"]["test"] == {}
    unusable = {i for i, k in kinds.items() if k in UNUSABLE}
    repaired = set(kinds) - unusable
    assert bad == unusable  # skipped and counted; the others decode after conversion to RGB
    assert not bad & repaired
    if not route:  # (the frozen route finds them in its one embedding pass, and says so only in the count)
        for i in unusable:
            assert f"train image of id {i} could not be used" in proc.stderr
    assert f"{len(unusable)} unreadable image(s) skipped" in proc.stdout


@pytest.mark.slow
def test_a_students_unusable_test_image_is_named_as_a_test_image_and_learns_nothing(tiny_data, tiny_run, tmp_path):
    """Train and test ids overlap: a student's broken test image is reported under test, not as the
    train row of the same id, on both routes; and the frozen route gives it no teacher targets, as
    fine-tuning does not."""
    from utils.train.config import TrainConfig
    from utils.train.distributed import Dist
    from utils.train.fold import Fold
    from utils.train.frozen import FrozenFold

    data, out = tmp_path / "data", tmp_path / "run"
    shutil.copytree(tiny_data, data)
    shutil.copytree(tiny_run, out)  # the teacher: the shared pipeline's ensemble
    train_ids, test_ids = set(read_dataset(data).train["id"]), read_dataset(data).test["id"].tolist()
    broken = next(i for i in test_ids if i in train_ids)  # a test id that is also a train image's id
    (data / "test_images" / f"{broken:06d}.jpg").write_bytes(b"")
    student = [*TRAIN, "--workers", "0", "--teacher", str(out / "ensemble.json"), "--data-dir", str(data),
               "--out-dir", str(out)]
    for route, extra in (("finetuned", []), ("frozen", ["--frozen-backbone"])):
        run_script("train.py", *student, *extra, "--name", f"student_{route}")
        metrics = json.loads((out / f"student_{route}" / "fold0" / "metrics.json").read_text())
        assert metrics["bad_images"]["train"] == {} and list(metrics["bad_images"]["test"]) == [str(broken)], route
    cfg = TrainConfig(model="test_resnet", n_folds=3, img_size=32, fold="0", frozen_backbone=True, progress=False,
                      teacher=str(out / "ensemble.json"), data_dir=str(data), out_dir=str(out), workers=0)
    schema, table = RunDir(out).prepare(read_dataset(data), 3, 42)
    frozen = FrozenFold(Fold(cfg, schema, table, read_dataset(data), 0, Dist(), RunDir(out)))
    n, k = len(frozen.fold.trn), test_ids.index(broken)
    soft_heads = frozen.trn_t["soft_heads"].numpy()
    assert not soft_heads[n + k].any()  # the unusable test image: no head learns from its teacher targets
    assert soft_heads[n + (k + 1) % len(test_ids)].any()  # a usable one does


@pytest.mark.slow
def test_a_students_bad_image_gate_counts_its_train_rows_on_both_routes(tiny_data, tiny_run, tmp_path):
    """Four of fold 0's n train images are empty files; a student also trains on the test images.
    With max_bad_images between 4 / (n + tests) and 4 / n, both routes stop and count 4 of n (a gate
    that counted the test rows too would let the fine-tuned one train on)."""
    data, out = shutil.copytree(tiny_data, tmp_path / "data"), shutil.copytree(tiny_run, tmp_path / "run")
    folds = pd.read_csv(out / "folds.csv")
    for i in folds[folds.fold != 0].id[:4]:
        (data / "train_images" / f"{i:06d}.jpg").write_bytes(b"")
    n, tests = int((folds.fold != 0).sum()), len(read_dataset(data).test)
    share = round((4 / n + 4 / (n + tests)) / 2, 5)
    student = [*TRAIN, "--workers", "0", "--teacher", str(out / "ensemble.json"), "--data-dir", str(data),
               "--out-dir", str(out), "--max-bad-images", str(share)]
    for route, extra in (("finetuned", []), ("frozen", ["--frozen-backbone"])):
        proc = run_script("train.py", *student, *extra, "--name", f"student_{route}", check=False)
        assert proc.returncode == 2, (route, proc.stderr[-2000:])
        assert f"error: 4 of {n} train images are unreadable (more than max_bad_images={share})" in proc.stderr, route


@pytest.mark.slow
def test_too_many_bad_images_stop_training(broken, tmp_path):
    broken, _ = broken
    proc = run_script("train.py", "--data-dir", str(broken), "--out-dir", str(tmp_path / "run2"), *TRAIN,
                      "--max-bad-images", "0.001", check=False)
    assert proc.returncode != 0
    assert "train images are unreadable (more than max_bad_images=0.001)" in proc.stderr


@pytest.mark.slow
def test_inference_writes_every_row_whatever_the_image(tiny_data, tiny_run, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    test = pd.read_csv(data / "test.csv")
    kinds = break_images(data / "test_images", [int(i) for i in test.id[:8]])
    proc = run_script("infer.py", "--data-dir", str(data), "--out-dir", str(tiny_run), "--output",
                      str(tmp_path / "sub.csv"), "--progress", "false", "--workers", "1")
    unusable = {i for i, k in kinds.items() if k in UNUSABLE}
    assert f"{len(unusable)} test image(s) could not be used" in proc.stdout
    for i, kind in kinds.items():
        assert (f"test image of id {i} could not be used" in proc.stderr) == (i in unusable), kind
    sub = pd.read_csv(tmp_path / "sub.csv", dtype=str, keep_default_na=False)
    sub["id"], sub["len"] = sub["id"].astype(int), sub["len"].astype(int)
    schema = Schema.load(tiny_run / "schema.json")
    assert sorted(sub.id) == sorted(test.id)
    assert validate_submission(sub, read_dataset(data).test, schema) == []
    # an unusable image's row holds its category's most frequent values
    for i in unusable:
        row = sub[sub.id == i].iloc[0]
        for h in schema.heads:
            if h.category == row.Category:
                assert row[h.column] == h.vocab[int(np.argmax(schema.counts[h.name]))]


@pytest.mark.slow
def test_export_skips_and_reports_bad_parity_calibration_and_timing_images(tiny_data, tiny_run, tmp_path, monkeypatch):
    """An unreadable image among export's parity (validation), int8 calibration (train) and timing
    (test) images is skipped and named, as training and infer.py tolerate it; every merged graph
    (under a budget, one per candidate) is checked against its separate sessions."""
    data, run = shutil.copytree(tiny_data, tmp_path / "data"), shutil.copytree(tiny_run, tmp_path / "run")
    rows = RunDir(run).train_rows(read_dataset(data).train)
    first_val, first_calib = rows[rows.fold == 0].id.iloc[0], rows[rows.fold != 0].id.iloc[0]
    first_test = read_dataset(data).test.id.iloc[0]
    for folder, i in (("train_images", first_val), ("train_images", first_calib), ("test_images", first_test)):
        (data / folder / f"{i:06d}.jpg").write_bytes(b"")
    export = ["export.py", "--data-dir", str(data), "--out-dir", str(run), "--int8", "--budget-ms", "100000",
              "--parity-images", "4", "--timing-images", "4", "--latency-images", "6", "--calib-images", "16",
              "--progress", "false", "--models", "test_byobnet,test_efficientnet"]
    exported = {}  # what export measured of each run: its manifest entry, its fp32 and int8 OOF logits

    def export_run(run_name, *args, **kwargs):
        exported[run_name] = real_export_run(run_name, *args, **kwargs)
        return exported[run_name]

    real_export_run = export_module.export_run
    monkeypatch.setattr(export_module, "export_run", export_run)
    proc = run_script(*export, "--int8-max-drop", "1")
    assert f"fold 0: parity: 1 unreadable image(s) skipped: {first_val:06d}.jpg" in proc.stdout
    assert f"fold 0: int8 calibration: 1 unreadable image(s) skipped: {first_calib:06d}.jpg" in proc.stdout
    assert f"budget: timing: 1 unreadable image(s) skipped: {first_test:06d}.jpg" in proc.stdout
    manifest = json.loads((run / "onnx" / "manifest.json").read_text())
    table = pd.read_csv(run / "onnx" / "budget.csv", keep_default_na=False)
    merged = table[table.format == "merged"]  # the budget's merged graphs, the ensemble's among them
    assert "test_byobnet+test_efficientnet" in set(merged.candidate) and manifest.get("merged") is None
    assert (pd.to_numeric(merged.merged_parity) <= 1e-3).all()
    assert manifest["serve"]["images"] == 6 and manifest["serve"]["tail"] == "max of 6"  # six usable images
    # the int8 report: its fp32 side is the training OOF score (ONNX against PyTorch, a bad image as
    # the same placeholder), and int8 variants are candidates (a drop of up to 1 allowed)
    for entry in manifest["members"]:
        oof = load_oof(RunDir(run), [entry["run"]], rows.id.to_numpy())[0]
        trained, _ = score_logits(RunDir(run).schema, RunDir(run).schema.encode(rows), oof)
        assert entry["oof_fp32"] == pytest.approx(trained, abs=2e-3) and 0 < entry["oof_int8"] <= 1
    assert set(table["int8"]) - {"-"} and set(table["tail"]) == {"max of 6"}
    # the gate, on the drops and int8 logits export measured: a limit between the two runs' drops makes
    # int8 candidates of the run below it only (the budget's choice, as export.py makes it; merged
    # graphs, checked above, left out)
    assert set(exported) == {e["run"] for e in manifest["members"]}
    drops = sorted(e["oof_fp32"] - e["oof_int8"] for e in manifest["members"])
    assert drops[0] < drops[1]
    limit = (drops[0] + drops[1]) / 2
    budget.choose_serving(RunDir(run), exported, read_dataset(data), budget_ms=100000, int8_max_drop=limit,
                          merge=False, latency_images=6, parity_images=4, threads=2, progress=False)
    below = {e["run"] for e in manifest["members"] if e["oof_fp32"] - e["oof_int8"] < limit}
    table = pd.read_csv(run / "onnx" / "budget.csv", keep_default_na=False)
    assert len(below) == 1 and {r for v in table["int8"] if v != "-" for r in v.split(",")} == below
    # the budget weighs its candidates with ensemble.json's method, even when --models names the runs:
    # the manifest is made from it, and stale once it changes
    assert "ensemble.json" in manifest["provenance"]["inputs"]
    spec = json.loads((run / "ensemble.json").read_text())
    (run / "ensemble.json").write_text(json.dumps({**spec, "method": "equal"}))
    with pytest.raises(StaleError, match="ensemble.json"):
        Manifest.read(RunDir(run))
