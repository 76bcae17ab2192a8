"""The batched path of training's input (utils/data/batched.py): its augmentations draw from the
same distributions as the per-image path's (statistics over many draws, on CPU tensors), each image
by its own category's rules, reproducibly from the batch's seed; a batch gathered from the decode
cache is what the per-image items give, bad images included; a run chooses its path as
``batch_aug`` says."""
import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from tests.test_loading import PREP, build, images  # noqa: F401 (the fixture)
from utils.data.augmentations import DEFAULT_AUG
from utils.data.batched import BatchAugment, per_image_only
from utils.data.dataset import Batches, EpochSampler, ImageDataset, make_loader
from utils.data.transforms import build_transform

S, DRAWS = 64, 400
KS_LIMIT = 0.138  # the two-sample KS statistic's critical value at alpha 0.001 for 400 draws each
OFF = {name: {"p": 0.0} for name in DEFAULT_AUG}


def only(**on) -> dict:
    return {**OFF, **on}


def coordinates() -> np.ndarray:
    """Red says a pixel's column, green its row: what an augmented copy shows says where it came from."""
    ramp = np.round(np.arange(S) * 255 / (S - 1))
    image = np.full((S, S, 3), 128, np.uint8)
    image[..., 0], image[..., 1] = ramp[None, :], ramp[:, None]
    return image


def two_colours() -> np.ndarray:
    image = np.zeros((S, S, 3), np.uint8)
    image[:, : S // 2], image[:, S // 2:] = (180, 60, 40), (40, 120, 200)
    return image


def draws(image: np.ndarray, aug: dict, batched_aug: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """DRAWS augmented copies of ``image`` from each path, float [DRAWS, 3, S, S]: the per-image
    path seeded per copy, the batched one as one batch (with ``batched_aug``, other settings)."""
    tf = build_transform(S, train=True, aug=aug)
    per_image = np.stack([tf(image, None, seed) for seed in range(DRAWS)])
    pixels = torch.from_numpy(image).permute(2, 0, 1).expand(DRAWS, 3, S, S).contiguous()
    batched = BatchAugment(S, batched_aug or aug)(pixels, ["any"] * DRAWS, seed=1).numpy()
    return per_image.astype(np.float64), batched.astype(np.float64)


def crop_box(o: np.ndarray) -> dict:
    """Where each copy of ``coordinates()`` was taken from, in source pixels."""
    px = lambda v: v * (S - 1) / 255
    m = S // 2
    left, right, top, bottom = px(o[:, 0, m, 1]), px(o[:, 0, m, -2]), px(o[:, 1, 1, m]), px(o[:, 1, -2, m])
    return {"width": abs(right - left), "height": bottom - top, "x": (left + right) / 2, "y": (top + bottom) / 2,
            "flipped": (right < left).astype(float)}


def corners(o: np.ndarray) -> dict:
    return {"top-left x": o[:, 0, 0, 0], "top-left y": o[:, 1, 0, 0], "bottom-right x": o[:, 0, -1, -1],
            "bottom-right y": o[:, 1, -1, -1]}


def angles(o: np.ndarray) -> dict:
    """The direction, in degrees, in which the source's columns and rows run through the middle."""
    m, d = S // 2, 8
    along = lambda a, b: np.degrees(np.arctan2(a, b))
    return {"row": along(o[:, 1, m, m + d] - o[:, 1, m, m - d], o[:, 0, m, m + d] - o[:, 0, m, m - d]),
            "column": along(o[:, 0, m + d, m] - o[:, 0, m - d, m], o[:, 1, m + d, m] - o[:, 1, m - d, m])}


def columns_and_rows(o: np.ndarray) -> dict:
    """Which source column and row the middle row and column show at a quarter, half and three quarters."""
    px, m = lambda v: v * (S - 1) / 255, S // 2
    return {**{f"column at {q}": px(o[:, 0, m, q]) for q in (S // 4, S // 2, 3 * S // 4)},
            **{f"row at {q}": px(o[:, 1, q, m]) for q in (S // 4, S // 2, 3 * S // 4)}}


def edge() -> np.ndarray:
    image = np.full((S, S, 3), 60, np.uint8)
    image[:, S // 2:] = 180
    return image


def across_the_edge(o: np.ndarray) -> dict:
    m = S // 2
    return {**{f"at {d}": o[:, 0, m, m + d] for d in (-3, -2, -1, 0, 1, 2)}, "far left": o[:, 0, :, 4:12].mean((1, 2))}


def halves(o: np.ndarray) -> dict:
    return {f"{side} {'RGB'[c]}": o[:, c, :, cols].mean((1, 2))
            for side, cols in (("left", slice(0, S // 2)), ("right", slice(S // 2, S))) for c in range(3)}


def hue_turned(o: np.ndarray) -> dict:
    """How far the left half's HSV hue was turned, in degrees."""
    def hue(o):
        r, g, b = (o[:, c, :, : S // 2].mean((1, 2)) for c in range(3))
        v, chroma = np.maximum(np.maximum(r, g), b), np.ptp(np.stack([r, g, b]), axis=0)
        return 60 * np.where(v == r, (g - b) / chroma, np.where(v == g, 2 + (b - r) / chroma, 4 + (r - g) / chroma))

    return {"hue turned": (hue(o) - hue(two_colours().transpose(2, 0, 1)[None].astype(np.float64)) + 180) % 360 - 180}


def ks(a: dict, b: dict) -> dict:
    return {k: round(ks_2samp(a[k], b[k]).statistic, 3) for k in a}


JITTER = {"p": 1.0, "brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "hue": 0.0}
CASES = {  # name: (image, settings, statistics)
    "random resized crop and flip": (coordinates, only(hflip={"p": 0.5}, random_resized_crop={
        "p": 1.0, "scale": [0.3, 1.0], "ratio": [0.5, 2.0]}), crop_box),
    "neckline crop": (coordinates, only(neckline_crop={"p": 1.0, "top": [0.0, 0.2], "height": [0.4, 0.8]}), crop_box),
    "distort": (coordinates, only(distort={"p": 1.0, "limit": 0.3}), columns_and_rows),
    "sharpen or blur": (edge, only(sharpen_blur={"p": 0.8}), across_the_edge),
    "perspective": (coordinates, only(perspective={"p": 1.0, "scale": [0.05, 0.1]}), corners),
    "rotate": (coordinates, only(rotate={"p": 1.0, "degrees": 15}), angles),
    "shear": (coordinates, only(shear={"p": 1.0, "degrees": 15}), angles),
    "colour jitter, in random order": (two_colours, only(color_jitter=JITTER), halves),
    # OpenCV keeps a uint8 hue in 2-degree steps (the per-image path's turns are off by up to two); the
    # batched path turns continuously
    "hue": (two_colours, only(color_jitter={**JITTER, "brightness": 0, "contrast": 0, "saturation": 0, "hue": 0.1}),
            hue_turned),
    "gaussian noise": (lambda: np.full((S, S, 3), 128, np.uint8), only(gauss_noise={"p": 0.5, "std": [0.02, 0.1]}),
                       lambda o: {"std": o.std((1, 2, 3))}),
    "coarse dropout": (lambda: np.full((S, S, 3), 200, np.uint8),
                       only(coarse_dropout={"p": 0.5, "holes": [1, 4], "size": [0.05, 0.2]}),
                       lambda o: {"erased share": (o == 0).mean((1, 2, 3))}),
}


@pytest.mark.parametrize("case", CASES)
def test_the_batched_path_draws_from_the_per_image_paths_distributions(case):
    image, aug, stats = CASES[case]
    per_image, batched = draws(image(), aug)
    same = ks(stats(per_image), stats(batched))
    assert max(same.values()) < KS_LIMIT, same
    # and the comparison sees a wrong setting: each switched-on augmentation applied half as often,
    # its parameters drawn from half their range
    half = lambda v: [v[0], (v[0] + v[1]) / 2] if isinstance(v, list) else v / 2
    skewed = {name: {k: half(v) for k, v in s.items()} if s["p"] else s for name, s in aug.items()}
    _, wrong = draws(image(), aug, skewed)
    differ = ks(stats(per_image), stats(wrong))
    assert max(differ.values()) > 1.5 * KS_LIMIT, differ


def test_each_image_draws_from_its_own_categorys_rules_and_a_batch_from_its_seed():
    aug = only(hflip={"p": 0.0}, gauss_noise={"p": 0.0, "std": [0.1, 0.2]})
    rules = {"Mirrored": {"hflip": {"p": 1.0}}, "Noisy": {"gauss_noise": {"p": 1.0}}}
    augment = BatchAugment(S, aug, rules, ["Mirrored", "Noisy"])
    image = torch.from_numpy(coordinates()).permute(2, 0, 1)
    cats = ["Mirrored", "Noisy", "Unknown"] * 20
    out = augment(image.expand(len(cats), 3, S, S).contiguous(), cats, seed=3)
    mirrored, noisy, plain = out[0::3], out[1::3], out[2::3]
    assert torch.equal(mirrored, image.flip(-1).expand_as(mirrored))
    assert (noisy.float() - image.float()).abs().mean((1, 2, 3)).min() > 3  # every one noisy
    assert torch.equal(plain, image.expand_as(plain))  # a category without rules: the defaults (here nothing)
    again = augment(image.expand(len(cats), 3, S, S).contiguous(), cats, seed=3)
    assert torch.equal(out, again)
    assert not torch.equal(out, augment(image.expand(len(cats), 3, S, S).contiguous(), cats, seed=4))


def test_what_only_the_per_image_path_applies_is_named():
    assert per_image_only(None, None) == []
    assert per_image_only({"augmix": {"p": 0.5}}, None) == ["augmix"]
    assert per_image_only(None, {"Kurtis": {"distort": {"p": 0.2}, "sharpen_blur": {"p": 0.3}}}) == []
    assert per_image_only(None, {"Kurtis": {"augmix": {"p": 0.3}}}) == ["augmix"]
    assert per_image_only(None, {"Kurtis": {"neckline_crop": {"p": 0.25}}}) == []
    assert per_image_only(None, {"Kurtis": {"neckline_crop": {"p": 0.25}}}, resize="pad") == \
        ["neckline_crop with resize: pad (letterboxed per image)"]
    with pytest.raises(ValueError, match="augmix"):
        BatchAugment(S, {"augmix": {"p": 0.5}})


def test_a_batch_gathered_from_the_cache_is_what_the_per_image_items_give(images, tmp_path):
    paths, kinds = images  # eight of 24 broken, four of them unusable
    cache = build(tmp_path / "decoded", paths)
    targets = np.arange(len(paths) * 2).reshape(-1, 2)
    ds = ImageDataset(paths, [f"c{k % 3}" for k in range(len(paths))], targets, PREP.transform(), PREP,
                      augment_seed=5, images=cache)
    keys = [(k, 2) for k in (5, 0, 23, 3, 3, 9, 12, 6)]
    batch = Batches(ds)[keys]
    items = [ds[k] for k in keys]
    assert torch.equal(batch["image"], torch.stack([it["image"] for it in items]))
    assert batch["image"].is_contiguous(memory_format=torch.channels_last)  # a NHWC gather, not a copy
    assert batch["index"].tolist() == [k for k, _ in keys]
    assert batch["ok"].tolist() == [it["ok"] for it in items] and batch["error"] == [it["error"] for it in items]
    assert not all(batch["ok"].tolist()) and any(batch["ok"].tolist())
    assert torch.equal(batch["target"], torch.stack([it["target"] for it in items]))  # IGNORE_INDEX where unusable
    assert batch["category"] == [ds.categories[k] for k, _ in keys]
    assert batch["seed"] == Batches(ds)[keys]["seed"] != Batches(ds)[[(k, 3) for k, _ in keys]]["seed"]
    # a loader of them: the batches of the sampler, in its order
    sampler = EpochSampler(len(ds), seed=1)
    loader = make_loader(Batches(ds), None, 0, torch.utils.data.BatchSampler(sampler, 8, drop_last=True))
    rows = [b["index"].tolist() for b in loader]
    assert rows == [[k for k, _ in keys] for keys in torch.utils.data.BatchSampler(sampler, 8, True)]


@pytest.fixture(scope="module")
def cached(tiny_data, tmp_path_factory):
    """A dataset of 24 tiny_data images read from their decode cache."""
    paths = sorted((tiny_data / "train_images").glob("*.jpg"))[:24]
    cache = build(tmp_path_factory.mktemp("decoded"), paths)
    return ImageDataset(paths, ["x"] * len(paths), np.zeros((len(paths), 1)), PREP.transform(), PREP,
                        augment_seed=0, images=cache)


@pytest.mark.parametrize("setting, device, aug, rates, path", [
    ("auto", "cpu", {}, None, "image by image"),
    ("off", "cpu", {}, None, "image by image"),
    ("on", "cpu", {}, None, "per batch"),
    ("on", "cpu", {"augmix": {"p": 0.5}}, None, "image by image"),
    ("auto", "cuda", {}, (900.0, 2500.0), "per batch"),
    ("auto", "cuda", {}, (2500.0, 900.0), "image by image"),
])
def test_a_fold_takes_the_path_that_batch_aug_says(cached, monkeypatch, setting, device, aug, rates, path):
    """auto: image by image on CPU; on CUDA the faster of the two as measured (``input_rate``, faked
    here); on: per batch unless an augmentation exists per image only, which the log names."""
    from types import SimpleNamespace

    from utils.train import trainer
    from utils.train.distributed import Dist

    ds = cached
    measured = iter(rates or ())
    monkeypatch.setattr(trainer, "input_rate", lambda loader, device, augment=None: next(measured))
    logged = []
    cfg = SimpleNamespace(batch_aug=setting, aug=aug, category_aug={}, resize="squash", img_size=PREP.img_size)
    fold = SimpleNamespace(cfg=cfg, d=Dist(device=SimpleNamespace(type=device)), per_rank_batch=8, workers=0,
                           schema=SimpleNamespace(categories=["x"]), log=logged.append)
    stub = SimpleNamespace(fold=fold, trn_ds=ds, sampler=EpochSampler(len(ds), 0), images=ds.images)
    loader, augment = trainer.FoldTrainer.train_input(stub)
    assert (augment is not None) == (path == "per batch")
    assert isinstance(loader.dataset, Batches) == (path == "per batch")
    if aug:
        assert logged == ["augmented image by image: the batched path (batch_aug: on) cannot apply augmix"]
    if rates:
        assert logged[0].startswith(f"input measured: {rates[0]:,.0f} img/s augmented image by image, "
                                    f"{rates[1]:,.0f} per batch on the device; {path}")
