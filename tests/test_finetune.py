"""The fine-tuning regime of the winning entries: weights from files (timm and OpenCLIP layouts),
MLP heads, layer-wise LR decay, EMA, gradient accumulation, the frozen-feature route with its
cache and kNN head, and local experiment tracking."""
import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import run_script
from utils.config import parse_config
from utils.data.schema import Schema, read_dataset
from utils.errors import DataError
from utils.metric import score_logits
from utils.run import RunDir
from utils.train.config import TrainConfig
from utils.train.distributed import Dist
from utils.train.engine import predict, train_step
from utils.train.fold import Fold
from utils.train.kfold import fit
from utils.train.model import AttributeModel, HeadLoss, build_optimizer, group_lrs, load_checkpoint, load_from_file
from utils.train.trainer import FoldTrainer

TINY = ["--n-folds", "3", "--img-size", "32", "--batch-size", "16", "--workers", "0", "--progress", "false"]


def tiny_clip(tmp_path):
    """A real OpenCLIP checkpoint, written by open_clip itself, of a tiny ViT with quick GELU."""
    open_clip = pytest.importorskip("open_clip")  # a test dependency in requirements.txt
    from open_clip import factory

    factory._MODEL_CONFIGS["kit-tiny-clip"] = {
        "embed_dim": 32, "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    model = open_clip.create_model("kit-tiny-clip").eval()
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), path)
    return model, path


# the timm architecture that matches kit-tiny-clip's image tower (its projection is timm's head)
TIMM_TINY_CLIP = dict(embed_dim=64, depth=2, num_heads=2, patch_size=8, img_size=32, num_classes=32)


def test_an_openclip_file_loads_into_the_matching_timm_model_with_every_weight_used(tmp_path):
    clip, path = tiny_clip(tmp_path)
    timm_model = load_from_file("vit_base_patch32_clip_quickgelu_224", str(path), **TIMM_TINY_CLIP).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # every weight used and converted right: the same image embedding
        np.testing.assert_allclose(timm_model(x).numpy(), clip.encode_image(x).numpy(), atol=1e-5)
    with pytest.raises(DataError, match=r"does not fit vit_base_patch32_clip_quickgelu_224: 12 missing key\(s\) "
                                        r"\['blocks.2.norm1.weight'"):
        load_from_file("vit_base_patch32_clip_quickgelu_224", str(path), **{**TIMM_TINY_CLIP, "depth": 3})
    with pytest.raises(DataError, match="file not found"):
        load_from_file("vit_base_patch32_clip_quickgelu_224", str(tmp_path / "nothing.bin"))


@pytest.mark.slow
def test_train_py_fine_tunes_from_an_openclip_file_on_the_clip_embedding(tiny_data, tmp_path):
    clip, path = tiny_clip(tmp_path)
    arch = {k: v for k, v in TIMM_TINY_CLIP.items() if k != "img_size"}
    run_script("train.py", "--model", "vit_base_patch32_clip_quickgelu_224", "--pretrained-file", str(path),
               "--model-kwargs", json.dumps(arch), "--keep-head", "--head", "mlp", "--head-hidden", "16",
               "--data-dir", str(tiny_data), "--out-dir", str(tmp_path / "run"), *TINY, "--epochs", "1", "--fold", "0",
               "--lr-backbone", "0")
    ckpt = torch.load(tmp_path / "run" / "vit_base_patch32_clip_quickgelu_224" / "fold0" / "best.pt", weights_only=True)
    model, _ = load_checkpoint(tmp_path / "run" / "vit_base_patch32_clip_quickgelu_224" / "fold0" / "best.pt")
    assert model.heads.fc1.in_features == 32  # the heads sit on CLIP's 32-d image embedding
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # backbone learning rate 0: the checkpoint still holds OpenCLIP's tower exactly
        np.testing.assert_allclose(model.backbone(x).numpy(), clip.encode_image(x).numpy(), atol=1e-5)
    assert ckpt["preprocess"]["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])  # CLIP's, from timm


def test_a_timm_state_dict_loads_and_a_file_of_another_model_names_its_keys(tmp_path):
    import timm

    torch.manual_seed(3)
    source = timm.create_model("test_resnet")
    torch.save(source.state_dict(), tmp_path / "resnet.pth")
    loaded = load_from_file("test_resnet", str(tmp_path / "resnet.pth"), num_classes=0)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, source.state_dict()[name]), name
    with pytest.raises(DataError, match=r"does not fit test_efficientnet: .*(missing|size mismatch)"):
        load_from_file("test_efficientnet", str(tmp_path / "resnet.pth"), num_classes=0)


@pytest.fixture(scope="module")
def schema_and_rows(tiny_data):
    data = read_dataset(tiny_data)
    schema = Schema.fit(data.train, data.category_attrs)
    return schema, data.train


def test_grad_accumulation_2x16_gives_the_update_of_1x32_without_batch_norm(schema_and_rows):
    """The same gradient, so the same update whatever the optimiser (compared before AdamW, whose
    first step divides by |g| and so magnifies float rounding on near-zero gradients)."""
    schema, train = schema_and_rows
    torch.manual_seed(0)
    model = AttributeModel("test_vit", [h.width for h in schema.heads], dropout=0.0, loss=HeadLoss(schema),
                           img_size=32, head="mlp", head_hidden=16)
    model.heads.drop.p = 0.0
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.as_tensor(schema.encode(train.iloc[:32]))
    assert (t[:16] >= 0).sum() != (t[16:] >= 0).sum()  # unequal label counts: per-chunk means would differ

    def gradients(step):
        m = copy.deepcopy(model)
        step(m, torch.optim.SGD(m.parameters(), lr=0.0))
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    whole = gradients(lambda m, opt: train_step(m, x, t, opt, clip_grad=1.0, grad_accum=1))
    chunked = gradients(lambda m, opt: train_step(m, x, t, opt, clip_grad=1.0, grad_accum=2))
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], atol=1e-7, rtol=1e-4, msg=name)

    def naive(m, opt):  # each chunk normalised by its own label count
        for xc, tc in zip(x.chunk(2), t.chunk(2)):
            m(xc, tc)["loss"].backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    wrong = gradients(naive)
    assert any(not torch.allclose(wrong[n], whole[n], atol=1e-7, rtol=1e-4) for n in whole)


def test_layer_decay_gives_each_block_a_smaller_rate_than_the_one_above(schema_and_rows):
    schema, _ = schema_and_rows
    model = AttributeModel("test_vit", [h.width for h in schema.heads], img_size=32)
    opt = build_optimizer(model, 1e-3, 5e-3, 0.01, layer_decay=0.5)
    backbone = sorted({round(g["lr"], 12) for g in opt.param_groups if g["role"] == "backbone"})
    assert backbone[-1] == pytest.approx(1e-3) and len(backbone) >= 3
    for low, high in zip(backbone, backbone[1:]):
        assert low == pytest.approx(high * 0.5)
    assert group_lrs(opt) == {"backbone": pytest.approx(1e-3), "head": 5e-3}
    (first_block,) = [g["lr"] for g in opt.param_groups for p in g["params"] if p is model.backbone.blocks[0].attn.qkv.weight]
    assert first_block == pytest.approx(backbone[1])  # the embedding below it has the smallest rate


def test_ema_weights_are_the_ones_scored_and_saved(tiny_data, tmp_path):
    cfg = parse_config(TrainConfig, ["--model", "test_vit", "--data-dir", str(tiny_data), "--out-dir", str(tmp_path),
                                     *TINY, "--epochs", "1", "--ema-decay", "0.5", "--fold", "0"])
    data = read_dataset(tiny_data)
    schema, table = RunDir(tmp_path).prepare(data, 3, cfg.seed)
    fold = Fold(cfg, schema, table, data, 0, Dist(), RunDir(tmp_path), RunDir(tmp_path).fold_dir(cfg.run_name, 0))
    trainer = FoldTrainer(fold)
    fit(fold, trainer)
    best = torch.load(tmp_path / "test_vit" / "fold0" / "best.pt", weights_only=True)
    ema, raw = fold.ema.module.state_dict(), fold.model.state_dict()
    assert all(torch.equal(best["state_dict"][k], ema[k]) for k in ema)
    assert any(not torch.equal(best["state_dict"][k], raw[k]) for k in raw)
    idx, logits = predict(fold.ema.module, trainer.val_loader, torch.device("cpu"), prep=fold.prep,
                          amp_dtype=fold.dtype, progress=False)
    assert best["val_score"] == pytest.approx(score_logits(schema, fold.val_targets[idx], logits)[0], abs=1e-12)
    d = schema.to_dict()
    d["vocabs"][schema.heads[0].name] = ["only-one"]
    with pytest.raises(DataError, match="different schema"):  # the schema checks hold for these runs too
        load_checkpoint(tmp_path / "test_vit" / "fold0" / "best.pt", Schema.from_dict(d))


def pipeline_takes(data, out, run, *expected_files):
    """ensemble.py, export.py (parity checked inside) and infer.py on the run folder."""
    run_script("ensemble.py", "--data-dir", str(data), "--out-dir", str(out), "--compare", "equal", "--progress", "false")
    run_script("export.py", "--data-dir", str(data), "--out-dir", str(out), "--timing-images", "2", "--progress", "false")
    proc = run_script("infer.py", "--data-dir", str(data), "--out-dir", str(out), "--output", str(out / "sub.csv"),
                      "--progress", "false", "--workers", "0")
    manifest = json.loads((out / "onnx" / "manifest.json").read_text())
    assert all(f["parity_max_abs_diff"] <= 1e-3 for m in manifest["members"] for f in m["folds"])
    assert "score against test_solution.csv" in proc.stdout
    return pd.read_csv(out / "sub.csv")


@pytest.mark.slow
def test_the_issue_recipe_vit_mlp_layer_decay_ema_accumulation_runs_through_the_pipeline(tiny_data, tmp_path):
    run_script("train.py", "--model", "vit_tiny_patch16_224", "--img-size", "64", "--epochs", "1", "--fold", "all",
               "--head", "mlp", "--layer-decay", "0.75", "--ema-decay", "0.99", "--grad-accum", "2",
               "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--n-folds", "2", "--batch-size", "16",
               "--workers", "0", "--progress", "false", "--amp", "off")  # (amp auto's timing: test_loading.py)
    ckpt = torch.load(tmp_path / "vit_tiny_patch16_224" / "fold1" / "best.pt", weights_only=True)
    assert ckpt["model_args"]["head"] == "mlp" and ckpt["model_args"]["img_size"] == 64
    assert len(pipeline_takes(tiny_data, tmp_path, "vit_tiny_patch16_224")) == len(read_dataset(tiny_data).test)


@pytest.mark.slow
def test_the_frozen_route_caches_embeddings_reuses_them_and_runs_through_the_pipeline(tiny_data, tmp_path):
    common = ["--model", "test_resnet", "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), *TINY,
              "--fold", "all", "--frozen-backbone"]
    first = run_script("train.py", *common, "--head", "mlp", "--epochs", "8", "--name", "frozen_mlp")
    assert first.stdout.count("embedded 240 train images") == 1  # the first fold embeds, the others reuse
    second = run_script("train.py", *common, "--head", "knn", "--knn-k", "5", "--name", "frozen_knn")
    assert "embedded" not in second.stdout and second.stdout.count("embeddings reused") == 3
    assert len(list((tmp_path / "embeddings").glob("*.npz"))) == 1
    third = run_script("train.py", *common, "--head", "knn", "--img-size", "40", "--name", "frozen_knn40")
    assert "embedded 240 train images" in third.stdout  # another preprocessing is another cache
    assert len(list((tmp_path / "embeddings").glob("*.npz"))) == 2
    # another architecture argument (the same weights) is another cache too
    pooled = run_script("train.py", *common, "--head", "knn", "--model-kwargs", "{global_pool: max}", "--fold", "0",
                        "--name", "frozen_knn_max")
    assert "embedded 240 train images" in pooled.stdout
    assert len(list((tmp_path / "embeddings").glob("*.npz"))) == 3
    for run in ("frozen_mlp", "frozen_knn"):
        assert json.loads((tmp_path / run / "oof_score.json").read_text())["oof_score"] > 0.3
    assert len(pipeline_takes(tiny_data, tmp_path, "frozen_mlp")) == len(read_dataset(tiny_data).test)


@pytest.mark.slow
def test_tracking_logs_the_history_to_local_tensorboard_and_mlflow_files(tiny_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for kind in ("tensorboard", "mlflow"):
        run_script("train.py", "--model", "test_resnet", "--data-dir", str(tiny_data), "--out-dir", str(tmp_path),
                   *TINY, "--fold", "0", "--frozen-backbone", "--epochs", "3", "--patience", "0", "--log", kind,
                   "--name", kind)
        history = pd.read_csv(tmp_path / kind / "fold0" / "history.csv")
        if kind == "tensorboard":
            events = EventAccumulator(str(tmp_path / kind / "fold0" / "tensorboard"))
            events.Reload()
            logged = [(e.step, e.value) for e in events.Scalars("val_score")]
        else:
            import mlflow

            mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
            client = mlflow.tracking.MlflowClient()
            (run,) = mlflow.search_runs(experiment_names=["mlflow"], output_format="list")
            logged = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_score")]
            assert run.data.params["head"] == "linear" and run.data.params["frozen_backbone"] == "True"
        assert [s for s, _ in logged] == list(history.epoch)
        np.testing.assert_allclose([v for _, v in logged], history.val_score, rtol=1e-6)


def test_the_frozen_cache_key_changes_with_everything_an_embedding_depends_on(tiny_data, tmp_path, monkeypatch):
    """Through the call site that gathers what the key hashes (FrozenFold.embeddings): architecture
    arguments, weights, autocast dtype, timm's version and, with views, the seed each give another
    cache file; the same everything finds the same one."""
    import timm

    from utils.train.frozen import FrozenFold

    weights = tmp_path / "weights.pth"  # fixed weights, whatever the seed
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), weights)
    data, run_dir = read_dataset(tiny_data), RunDir(tmp_path / "run")
    schema, table = run_dir.prepare(data, 3, 42)

    def key(**changes) -> str:
        cfg = TrainConfig(**{"model": "test_resnet", "n_folds": 3, "img_size": 32, "frozen_backbone": True,
                             "progress": False, "workers": 0, "data_dir": str(tiny_data), "out_dir": str(run_dir.path),
                             "pretrained_file": str(weights), "amp": "off", **changes})
        return FrozenFold(Fold(cfg, schema, table, data, 0, Dist(), run_dir)).cache_path.stem

    base = key()
    assert key() == base  # the same everything: the same key (the cache is found again)
    assert key(seed=7) == base  # without views the seed changes no embedding
    assert key(model_kwargs={"global_pool": "max"}) != base  # same weights, other pooling
    assert key(pretrained_file=None) != base  # other weights
    assert key(amp="bf16") != base
    assert key(img_size=40) != base
    assert key(frozen_views=1) != key(frozen_views=1, seed=7)
    monkeypatch.setattr(timm, "__version__", "0.0.1")
    assert key() != base
    assert len(list((run_dir.path / "embeddings").glob("*.npz"))) == 8


def test_a_knn_vote_never_finds_the_row_itself_or_its_own_fold(tiny_data, tmp_path):
    """The kNN bank of fold k holds the embeddings of the rows outside fold k and nothing else, so a
    validation row (its OOF logits) is voted on by other folds' rows only, never by itself."""
    import torch.nn.functional as F

    from utils.run import RunDir
    from utils.train.config import TrainConfig
    from utils.train.frozen import FrozenFold

    cfg = TrainConfig(model="test_resnet", n_folds=3, img_size=32, fold="1", frozen_backbone=True, head="knn",
                      knn_k=1, progress=False, data_dir=str(tiny_data), out_dir=str(tmp_path), workers=0)
    data, run_dir = read_dataset(tiny_data), RunDir(tmp_path)
    schema, table = run_dir.prepare(data, 3, 42)
    frozen = FrozenFold(Fold(cfg, schema, table, data, 1, Dist(), run_dir))
    fold = frozen.fold
    assert not set(fold.trn["id"]) & set(fold.val["id"]) and set(fold.trn["fold"]) == {0, 2}
    torch.testing.assert_close(fold.model.heads.bank, F.normalize(frozen.trn_x[: len(fold.trn)], dim=1))
    nearest = (F.normalize(frozen.val_x, dim=1) @ fold.model.heads.bank.T).max(1).values
    assert (nearest < 1 - 1e-4).all()  # no validation row finds its own embedding in the bank


def test_a_knn_bank_holds_each_usable_original_image_once(tiny_data, tmp_path):
    """Augmented copies (augment.py's rows) take their source's embedding, and an unusable image is
    a grey placeholder: neither votes. The bank holds the fold's original train rows with a usable
    image, each once, with its own labels; the checkpoint rebuilds it."""
    import shutil

    import torch.nn.functional as F

    from utils.data.schema import ID, image_path
    from utils.train.frozen import FrozenFold

    data_dir = shutil.copytree(tiny_data, tmp_path / "data")
    data = read_dataset(data_dir)
    _, table = RunDir(tmp_path / "folds").prepare(data, 3, 42)
    outside = table[table.fold != 0][ID].to_numpy()
    image_path(data_dir / "train_images", outside[0]).write_bytes(b"")  # unusable
    train = data.train.assign(source_id=data.train[ID], image=[f"train_images/{i:06d}.jpg" for i in data.train[ID]])
    copies = train[train[ID].isin(outside[:20])].assign(**{ID: lambda t: t[ID] + 10_000})
    augmented = data_dir / "augmented_train.csv"
    pd.concat([train, copies]).to_csv(augmented, index=False)
    cfg = TrainConfig(model="test_resnet", n_folds=3, img_size=32, fold="0", frozen_backbone=True, head="knn",
                      progress=False, data_dir=str(data_dir), out_dir=str(tmp_path / "run"), workers=0,
                      train_csv=str(augmented), max_bad_images=0.05)
    data = read_dataset(data_dir, str(augmented))
    schema, table = RunDir(cfg.out_dir).prepare(data, 3, 42)
    frozen = FrozenFold(Fold(cfg, schema, table, data, 0, Dist(), RunDir(cfg.out_dir)))
    fold = frozen.fold
    assert len(fold.trn) == len(outside) + 20
    voters = fold.trn[(fold.trn[ID] < 10_000) & (fold.trn[ID] != outside[0])]
    heads = fold.model.heads
    assert len(heads.bank) == len(voters) == len(outside) - 1
    keep = fold.trn.index.isin(voters.index)
    torch.testing.assert_close(heads.bank, F.normalize(frozen.trn_x[: len(fold.trn)][keep], dim=1))
    torch.testing.assert_close(heads.votes, torch.from_numpy(schema.one_hot(schema.encode(voters))).float())
    fit(fold, frozen)
    model, ckpt = load_checkpoint(fold.dir / "best.pt", schema)
    assert ckpt["model_args"]["knn_bank"] == len(voters)
    torch.testing.assert_close(model.heads.bank, heads.bank)
