import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import run_script
from utils.config import parse_config
from utils.data.schema import IGNORE_INDEX, Schema, read_dataset
from utils.errors import DataError
from utils.io import load_logits
from utils.metric import score_logits
from utils.run import RunDir
from utils.train import kfold
from utils.train.config import TrainConfig
from utils.train.distributed import Dist
from utils.train.model import AttributeModel, HeadLoss, WarmupCosine, load_checkpoint

TINY = ["--model", "resnet18", "--n-folds", "3", "--img-size", "32", "--batch-size", "16",
        "--workers", "0", "--progress", "false", "--amp", "off"]


def cfg_for(tiny_data, out, *extra):
    return parse_config(TrainConfig, ["--data-dir", str(tiny_data), "--out-dir", str(out), *TINY, *extra],
                        model_config=True)


def test_smoke_real_script_writes_every_output(tiny_data, tmp_path):
    run_script("train.py", "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), *TINY,
               "--epochs", "1", "--fold", "0", "--workers", "1")
    data = read_dataset(tiny_data)
    schema = Schema.load(tmp_path / "schema.json")
    folds = pd.read_csv(tmp_path / "folds.csv")
    fold_dir = tmp_path / "resnet18" / "fold0"
    for name in ("best.pt", "last.pt", "oof_logits.npz", "test_logits.npz", "history.csv",
                 "history.png", "metrics.json", "config.yaml"):
        assert (fold_dir / name).is_file(), name
    ids, oof = load_logits(fold_dir / "oof_logits.npz", schema.fingerprint)
    assert oof.shape == (int((folds.fold == 0).sum()), schema.n_logits)
    assert set(ids) == set(folds.id[folds.fold == 0])
    test_ids, test_logits = load_logits(fold_dir / "test_logits.npz", schema.fingerprint)
    assert test_logits.shape == (len(data.test), schema.n_logits)
    assert (np.sort(test_ids) == np.sort(data.test.id.to_numpy())).all()
    assert np.isfinite(oof).all() and np.isfinite(test_logits).all()
    metrics = json.loads((fold_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["val_score"] <= 1.0
    assert len(metrics["per_head"]) == len(schema.heads)
    history = pd.read_csv(fold_dir / "history.csv")
    assert list(history.epoch) == [1] and history.images_per_s.iloc[0] > 0
    # the checkpoint describes itself: the model is rebuilt from the file alone
    model, ckpt = load_checkpoint(fold_dir / "best.pt", schema)
    assert ckpt["preprocess"]["img_size"] == 32 and len(ckpt["preprocess"]["mean"]) == 3 and ckpt["model"] == "resnet18"
    with pytest.raises(ValueError, match="different schema"):
        d = schema.to_dict()
        d["vocabs"][schema.heads[0].name] = ["only-one"]
        load_checkpoint(fold_dir / "best.pt", Schema.from_dict(d))


def test_loss_ignores_heads_outside_the_row_category(tiny_data):
    data = read_dataset(tiny_data)
    schema = Schema.fit(data.train, data.category_attrs)
    model = AttributeModel("resnet18", [h.width for h in schema.heads], loss=HeadLoss(schema))
    sarees = data.train[data.train.Category == "Sarees"].head(4)
    targets = torch.as_tensor(schema.encode(sarees))
    model(torch.randn(4, 3, 32, 32), targets)["loss"].backward()
    for j, head in enumerate(schema.heads):
        grad = model.heads[j].weight.grad
        if head.category != "Sarees":
            assert grad is None or torch.count_nonzero(grad) == 0, head.name
        elif (targets[:, j] != IGNORE_INDEX).any():
            assert torch.count_nonzero(grad) > 0, head.name


@pytest.mark.parametrize("kind", ["ce", "weighted_ce", "focal", "logit_adjusted"])
def test_losses(tiny_data, kind):
    data = read_dataset(tiny_data)
    schema = Schema.fit(data.train, data.category_attrs)
    targets = torch.as_tensor(schema.encode(data.train.head(32)))
    logits = torch.randn(32, schema.n_logits, generator=torch.Generator().manual_seed(0))
    loss = HeadLoss(schema, kind)(logits, targets)
    ce = HeadLoss(schema, "ce")(logits, targets)
    assert torch.isfinite(loss) and loss > 0
    if kind == "focal":
        assert loss < ce  # (1 - p_t)^gamma < 1 shrinks every term
    if kind == "logit_adjusted":
        # equals plain CE on logits shifted by log priors
        shifted = logits.clone()
        for h in schema.heads:
            c = torch.tensor(schema.counts[h.name], dtype=torch.float32).clamp(min=1)
            shifted[:, h.logits] += torch.log(c / c.sum())
        assert loss.item() == pytest.approx(HeadLoss(schema, "ce")(shifted, targets).item(), rel=1e-5)
    all_ignored = torch.full_like(targets, IGNORE_INDEX)
    assert HeadLoss(schema, kind)(logits, all_ignored).item() == 0.0


@pytest.mark.slow
def test_frozen_backbone_does_not_change(tiny_data, tmp_path):
    cfg = cfg_for(tiny_data, tmp_path, "--epochs", "1", "--freeze-epochs", "1", "--fold", "0")
    data = read_dataset(tiny_data)
    schema, table = RunDir(tmp_path).prepare(data, 3, cfg.seed)
    kfold.train_fold(cfg, schema, table, data, 0, Dist())
    ckpt = torch.load(tmp_path / "resnet18" / "fold0" / "best.pt", weights_only=True)
    torch.manual_seed(cfg.seed)  # train_fold builds its model right after this seed
    fresh = AttributeModel(**ckpt["model_args"])
    for name, value in fresh.backbone.state_dict().items():
        assert torch.equal(value, ckpt["state_dict"]["backbone." + name]), name
    heads_changed = any(not torch.equal(v, ckpt["state_dict"]["heads." + k])
                        for k, v in fresh.heads.state_dict().items())
    assert heads_changed


FINETUNE = ["--ema-decay", "0.9", "--grad-accum", "2", "--head", "mlp", "--head-hidden", "32", "--layer-decay", "0.8"]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--workers", "2", "--channels-last", "on", *FINETUNE]],
                         ids=["plain", "persistent-workers-channels-last-ema-accum-mlp-layer-decay"])
def test_resume_matches_an_uninterrupted_run_that_decodes_on_the_fly(tiny_data, tmp_path, extra):
    extra = ["--model", "test_resnet", *extra]  # timm's small ResNet: the same code path as resnet18's, in less time
    full = cfg_for(tiny_data, tmp_path / "full", "--epochs", "2", "--fold", "0", "--decode-cache", "false", *extra)
    kfold.train(full)
    assert not (tmp_path / "full" / "decoded").exists()
    part = cfg_for(tiny_data, tmp_path / "part", "--epochs", "2", "--fold", "0", "--stop-after", "1", *extra)
    stopped = kfold.train(part)[0]
    run = "test_resnet"
    assert not (tmp_path / "part" / run / "fold0" / "oof_logits.npz").exists()
    resumed = cfg_for(tiny_data, tmp_path / "part", "--epochs", "2", "--fold", "0", "--resume", "true", *extra)
    kfold.train(resumed)
    assert len(list((tmp_path / "part" / "decoded").glob("*.bin"))) == 1  # built once, found again on resume
    a = np.load(tmp_path / "full" / run / "fold0" / "oof_logits.npz")
    b = np.load(tmp_path / "part" / run / "fold0" / "oof_logits.npz")
    assert (a["ids"] == b["ids"]).all()
    np.testing.assert_allclose(a["logits"], b["logits"], atol=1e-5)
    ha = pd.read_csv(tmp_path / "full" / run / "fold0" / "history.csv")
    hb = pd.read_csv(tmp_path / "part" / run / "fold0" / "history.csv")
    np.testing.assert_allclose(ha.val_score, hb.val_score, atol=1e-6)
    # the stopped call returned its epoch's validation logits (fit.py's rate search weighs them)
    assert stopped["stopped"] and len(stopped["val_idx"]) == len(stopped["val_logits"]) == len(stopped["val_targets"])
    schema = RunDir(tmp_path / "part").schema
    assert score_logits(schema, stopped["val_targets"], stopped["val_logits"])[0] == pytest.approx(hb.val_score[0])


def test_resume_refuses_a_changed_config_and_takes_a_safe_change(tiny_data, tmp_path):
    """--resume continues the run it started: a changed learning rate is refused, naming the key, and
    config.yaml is left as it was; more epochs or other workers (keys safe on resume) are taken."""
    from utils.errors import ConfigError

    args = ["--model", "test_resnet", "--epochs", "2", "--fold", "0", "--decode-cache", "false"]
    kfold.train(cfg_for(tiny_data, tmp_path, *args, "--stop-after", "1"))
    saved = tmp_path / "test_resnet" / "fold0" / "config.yaml"
    before = saved.read_text()
    with pytest.raises(ConfigError, match=r"another config \(lr_head: 0\.001 then, 0\.002 now\)\. Only epochs, "):
        kfold.train(cfg_for(tiny_data, tmp_path, *args, "--resume", "--lr-head", "0.002"))
    assert saved.read_text() == before and not (saved.parent / "metrics.json").exists()
    kfold.train(cfg_for(tiny_data, tmp_path, *args[:2], "--epochs", "3", *args[4:], "--resume", "--workers", "0"))
    history = pd.read_csv(saved.parent / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3] and (saved.parent / "metrics.json").is_file()


def test_resume_with_more_epochs_continues_the_learning_rate_without_a_jump(tiny_data, tmp_path, capsys):
    """Stopped after 2 of 3 epochs (no warm-up), the rate is at 0.2575 of its base; resumed with 6
    epochs it goes on down from there to the floor at the new end (the new cosine recomputed at that
    step would jump up to 0.505)."""
    args = ["--model", "test_resnet", "--frozen-backbone", "--fold", "0", "--warmup-epochs", "0", "--lr-head", "0.01"]
    kfold.train(cfg_for(tiny_data, tmp_path, *args, "--epochs", "3", "--stop-after", "2"))
    kfold.train(cfg_for(tiny_data, tmp_path, *args, "--epochs", "6", "--resume", "--patience", "0"))
    lr = pd.read_csv(tmp_path / "test_resnet" / "fold0" / "history.csv")["lr_head"].to_numpy() / 0.01
    assert lr[1] == pytest.approx(0.01 + 0.99 * 0.25)
    assert lr[2] == pytest.approx(0.01 + (lr[1] - 0.01) * 0.5 * (1 + np.cos(np.pi / 4)))  # a quarter of the new cosine
    assert np.all(np.diff(lr) < 0)
    assert lr[-1] == pytest.approx(0.01)
    assert "epochs changed: the schedule of" in capsys.readouterr().out
    schedule = WarmupCosine(100, 10)
    before = schedule(60)
    schedule.retarget(60, 300)
    assert schedule(60) == pytest.approx(before) and schedule(300) == pytest.approx(0.01)


def test_select_last_predicts_from_the_last_epoch_and_best_from_the_best(tiny_data, tmp_path):
    """The same seeded run twice: ``--select best`` writes the logits of its best validation epoch,
    ``--select last`` those of its last (an OOF score with no choice in it), and no patience stops it."""
    args = ["--model", "test_resnet", "--frozen-backbone", "--fold", "0", "--warmup-epochs", "0", "--lr-head", "0.5",
            "--epochs", "6", "--patience", "1"]
    out = {}
    for select in ("best", "last"):
        metrics = kfold.train(cfg_for(tiny_data, tmp_path / select, *args, "--select", select))[0]
        history = pd.read_csv(tmp_path / select / "test_resnet" / "fold0" / "history.csv")
        out[select] = metrics, history.val_score.to_numpy()
    (best, val_best), (last, val_last) = out["best"], out["last"]
    assert len(val_last) == 6 and val_last[:len(val_best)] == pytest.approx(val_best)  # one run, seeded
    assert val_last.argmax() < 5, "the test needs a run whose last epoch is not its best"
    assert last["best_epoch"] == 6 and last["val_score"] == pytest.approx(val_last[-1])
    assert best["best_epoch"] == val_best.argmax() + 1 and best["val_score"] == pytest.approx(val_best.max())


@pytest.mark.parametrize("frozen", [True, False])
def test_a_report_retargets_the_epochs_of_a_fold_while_it_runs(tiny_data, tmp_path, capsys, frozen):
    """fit.py's report (``kfold.Report``) after the first of 3 epochs: told 5, the fold runs 5, its rate
    going on down from where it was to the floor at the new end; told 2, it ends after 2, at the floor;
    told 1, it stops there."""
    args = ["--model", "test_resnet", "--fold", "0", "--warmup-epochs", "0", "--lr-head", "0.01", "--epochs", "3",
            "--patience", "0", "--frozen-backbone", str(frozen).lower()]
    for told in (5, 2, 1):
        report = lambda epoch, score: told if epoch == 0 else None
        kfold.train(cfg_for(tiny_data, tmp_path / str(told), *args), report=report)
        lr = pd.read_csv(tmp_path / str(told) / "test_resnet" / "fold0" / "history.csv")["lr_head"].to_numpy() / 0.01
        assert len(lr) == told
        assert lr[0] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi / 3)))  # a third of the 3-epoch cosine
        if told > 1:
            assert lr[-1] == pytest.approx(0.01) and np.all(np.diff(lr) < 0)
        if told == 5:
            assert lr[1] == pytest.approx(0.01 + (lr[0] - 0.01) * 0.5 * (1 + np.cos(np.pi / 4)))
    out = capsys.readouterr().out
    assert "epochs 3 -> 5, as the time left allows" in out and "epochs 3 -> 2" in out
    assert "stopped after epoch 1: its time is up" in out


def test_pretrained_hub_unreachable_names_both_options(monkeypatch):
    import timm

    from utils.train import model as model_module

    def offline(*args, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return timm.models.create_model(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(RuntimeError, match=r"(?s)Hugging Face hub.*pretrained_file.*pretrained: false"):
        model_module.create_backbone("resnet18", pretrained=True)


def test_unknown_config_key_is_an_error(tiny_data, tmp_path):
    proc = run_script("train.py", "--data-dir", str(tiny_data), "--out-dir", str(tmp_path / "run"), "--epoch", "3",
                      check=False)
    assert proc.returncode == 2 and "unrecognized arguments: --epoch 3" in proc.stderr  # not taken as --epochs
    assert not (tmp_path / "run").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr_backbon: 0.001\n")
    proc = run_script("train.py", "--data-dir", str(tiny_data), "--config", str(bad), check=False)
    assert proc.returncode == 2 and "bad.yaml: unknown config key 'lr_backbon' (did you mean lr_backbone?)" in proc.stderr


def test_a_poisoned_checkpoint_is_refused_and_nothing_in_it_runs(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "best.pt"
    torch.save({"state_dict": {}, "model_args": {}, "payload": Payload()}, path)
    with pytest.raises(DataError, match=r"refusing to load .*best.pt.*could run code \(.*GLOBAL posix.system"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["ce", "weighted_ce", "focal", "logit_adjusted"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_all_heads_at_once_equal_cross_entropy_head_by_head(tiny_data, kind, smoothing):
    """The vectorised loss against F.cross_entropy per head, on that head's given rows."""
    import torch.nn.functional as F

    data = read_dataset(tiny_data)
    schema = Schema.fit(data.train, data.category_attrs)
    targets = torch.as_tensor(schema.encode(data.train.head(64)))
    logits = 3 * torch.randn(64, schema.n_logits, generator=torch.Generator().manual_seed(0))
    loss = HeadLoss(schema, kind, label_smoothing=smoothing)
    total, count = 0.0, 0
    for j, head in enumerate(schema.heads):
        given = targets[:, j] != IGNORE_INDEX
        if not given.any():
            continue
        z, t = logits[given][:, head.logits], targets[given, j]
        if kind == "logit_adjusted":
            z = z + loss.shift[head.logits]
        weight = loss.weight[head.logits] if kind == "weighted_ce" else None
        ce = F.cross_entropy(z, t, weight=weight, reduction="none", label_smoothing=smoothing)
        if kind == "focal":
            ce = (1 - torch.exp(-F.cross_entropy(z, t, reduction="none"))) ** loss.gamma * ce
        total, count = total + ce.sum(), count + int(given.sum())
    assert loss(logits, targets).item() == pytest.approx((total / count).item(), rel=1e-6)
