"""What feeds the training step: the decode cache (utils/data/decoded.py) holds the pixels and reasons
decoding gives, one cache per state of the images, and no cache rather than a full disk; seeded
augmentation draws each transform's decision independently; a step reuses the memory the one
before it freed (utils/train/throughput.py)."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import ROOT
from tests.test_bad_images import UNUSABLE, break_images
from utils.config import parse_config
from utils.data import decoded
from utils.data.dataset import ImageDataset, make_loader, read_or_placeholder
from utils.data.decoded import DecodedImages
from utils.data.transforms import Preprocess
from utils.train.config import TrainConfig
from utils.train.distributed import Dist
from utils.train.engine import model_input
from utils.train.throughput import configure_device, keep_freed_memory

PREP = Preprocess(48, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))  # draft decoding on: 1/8 to 1/2 scale


@pytest.fixture
def images(tiny_data, tmp_path):
    """24 train images, eight of them broken in eight ways (see test_bad_images.py)."""
    folder = tmp_path / "images"
    folder.mkdir()
    paths = [Path(shutil.copy(p, folder)) for p in sorted((tiny_data / "train_images").glob("*.jpg"))[:24]]
    return paths, break_images(folder, [int(p.stem) for p in paths][::3])


def build(folder, paths, prep=PREP):
    return DecodedImages.build_or_load(folder, paths, prep, workers=2, progress=False, log=lambda text: None)


def test_the_cache_holds_what_decoding_returns_and_the_dataset_gives_the_same_items(images, tmp_path, monkeypatch):
    paths, kinds = images
    monkeypatch.setattr(decoded, "IN_PROCESS_BELOW", 0)  # decoded by 2 worker processes, in order
    cache = build(tmp_path / "decoded", paths)
    reasons = []
    for path, slot in zip(paths, cache.slots(paths)):
        want, why = read_or_placeholder(path, PREP)
        got, why_cached = cache.read(slot)
        assert why_cached == why, path
        assert got.dtype == np.uint8 and got.flags.writeable and np.array_equal(got, want), path
        reasons.append(why)
    assert sum(bool(r) for r in reasons) == sum(k in UNUSABLE for k in kinds.values()) == 4
    assert {got.shape for got in (cache.read(s)[0] for s in cache.slots(paths))} == {(48, 48, 3)}  # sized once
    # augmented and seeded items are the same, read from the cache or decoded, in any order of paths
    tf = PREP.transform(train=True)
    shuffled = paths[::-1]
    plain = ImageDataset(shuffled, ["x"] * len(paths), None, tf, PREP, augment_seed=5)
    cached = ImageDataset(shuffled, ["x"] * len(paths), None, tf, PREP, augment_seed=5, images=cache)
    for k in range(len(paths)):
        a, b = plain[(k, 3)], cached[(k, 3)]
        assert a["error"] == b["error"] and a["ok"] == b["ok"]
        assert torch.equal(a["image"], b["image"]), shuffled[k]
    with pytest.raises(KeyError, match="not in the decode cache"):
        cache.slots([tmp_path / "elsewhere.jpg"])


def test_a_changed_image_or_other_decoding_gets_a_new_cache(images, tmp_path):
    paths, kinds = images
    paths = [p for p in paths if int(p.stem) not in kinds][:6]
    folder = tmp_path / "decoded"
    first = build(folder, paths)
    assert DecodedImages.find(folder, paths, PREP).bin == first.bin
    assert DecodedImages.find(folder, list(reversed(paths)), PREP).bin == first.bin  # the order does not matter
    assert DecodedImages.find(folder, paths, Preprocess(96, PREP.mean, PREP.std)) is None  # another size
    assert DecodedImages.find(folder, paths, Preprocess(48, PREP.mean, PREP.std, interpolation="linear")) is None
    old = first.read(first.slots(paths[:1])[0])[0]
    Image.open(paths[0]).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(paths[0], format="JPEG")
    os.utime(paths[0], ns=(1, 1))
    assert DecodedImages.find(folder, paths, PREP) is None
    second = build(folder, paths)
    assert second.bin != first.bin
    new = second.read(second.slots(paths[:1])[0])[0]
    assert np.array_equal(new, read_or_placeholder(paths[0], PREP)[0]) and not np.array_equal(new, old)


def test_a_cache_that_would_fill_the_disk_is_abandoned_with_a_warning(images, tmp_path, monkeypatch):
    paths = images[0]
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(decoded.shutil, "disk_usage", lambda p: usage(10 << 30, 0, (2 << 30) + 50_000))
    folder = tmp_path / "decoded"
    with pytest.warns(UserWarning, match="would leave less than 2 GB or 5 % of the disk.*decodes images on the fly"):
        assert build(folder, paths) is None
    assert list(folder.iterdir()) == []  # neither pixels nor index, nor a temporary file
    assert DecodedImages.find(folder, paths, PREP) is None


def test_seeded_augmentations_decide_independently_of_each_other():
    """hflip and noise, each at p 0.5: both apply to about a quarter of the seeds, not to half (one
    generator per transform, seeded alike, would make every draw the same)."""
    prep = Preprocess(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    aug = {name: {"p": 0.0} for name in ("random_resized_crop", "perspective", "color_jitter", "coarse_dropout")}
    tf = prep.transform(train=True, aug={**aug, "hflip": {"p": 0.5}, "gauss_noise": {"p": 0.5, "std": [0.1, 0.2]}})
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, :16] = 200
    plain = prep.transform()(image).astype(np.float32)
    flipped = noisy = both = 0
    seeds = 400
    for seed in range(seeds):
        out = tf(image, None, seed).astype(np.float32)
        f = np.abs(out - plain[:, :, ::-1]).mean() < np.abs(out - plain).mean()
        n = np.abs(out - (plain[:, :, ::-1] if f else plain)).max() > 1e-3
        flipped, noisy, both = flipped + f, noisy + n, both + (f and n)
        np.testing.assert_array_equal(out, tf(image, None, seed))  # and a seed gives the same pixels again
    assert 0.4 < flipped / seeds < 0.6 and 0.4 < noisy / seeds < 0.6
    assert 0.17 < both / seeds < 0.33


def test_the_neckline_crop_zooms_into_the_top_of_the_sized_image_for_its_category_only():
    prep = Preprocess(64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    off = {name: {"p": 0.0} for name in ("random_resized_crop", "hflip", "perspective", "color_jitter",
                                          "gauss_noise", "coarse_dropout")}
    top_half = {"p": 1.0, "top": [0.0, 0.0], "height": [0.5, 0.5]}
    tf = prep.transform(train=True, aug=off, category_aug={"Kurtis": {"neckline_crop": top_half}},
                        categories=["Kurtis", "Sarees"])
    image = np.full((64, 64, 3), 200, np.uint8)
    image[:32] = 0  # the top half dark
    for seed in range(5):
        kurti = tf(image, "Kurtis", seed)
        assert kurti.shape == (3, 64, 64) and kurti.max() == 0  # the dark half, sized again to 64 x 64
        np.testing.assert_array_equal(tf(image, "Sarees", seed), image.transpose(2, 0, 1))


class SchedulingClass(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return os.sched_getscheduler(0)


@pytest.mark.skipif(not hasattr(os, "sched_getscheduler"), reason="Linux scheduling classes")
def test_loader_workers_yield_the_cores_to_a_cpu_step_only():
    classes = lambda device: {int(c) for c in make_loader(SchedulingClass(), 1, 1, device=torch.device(device))}
    assert classes("cpu") == {os.SCHED_IDLE}
    with warnings.catch_warnings():  # without a GPU, pinning is skipped with a warning: the class is what counts
        warnings.simplefilter("ignore")
        assert classes("cuda") == {os.SCHED_OTHER}
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the training process itself is untouched


def test_cudnn_autotuning_only_when_asked():
    before = torch.backends.cudnn.benchmark
    try:
        for asked in (True, False):  # the flag is set without a GPU; only the CUDA branch sets it
            torch.backends.cudnn.benchmark = not asked
            configure_device(Dist(device=torch.device("cuda")), asked)
            assert torch.backends.cudnn.benchmark is asked
        configure_device(Dist(device=torch.device("cuda")), TrainConfig().cudnn_benchmark)
        assert torch.backends.cudnn.benchmark is False  # the default: ~45 s a fold for efficientnet_b0
    finally:
        torch.backends.cudnn.benchmark = before
        torch.set_float32_matmul_precision("highest")


def test_loaders_carry_uint8_pixels_that_the_step_normalises_once(images):
    good = images[0][1]  # every third image is broken
    prep = Preprocess(16, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    item = ImageDataset([good], ["x"], None, prep.transform(train=True), prep, augment_seed=0)[0]["image"]
    assert item.dtype == torch.uint8 and item.shape == (3, 16, 16)
    pixels = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = (torch.tensor(v, dtype=torch.float64).view(3, 1, 1) for v in (prep.mean, prep.std))
    x = prep.normalize(pixels)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x.double(), (pixels / 255.0 - mean) / std, atol=1e-5, rtol=0)
    # the same numbers from an array (one image served) and in NHWC (the training step)
    np.testing.assert_array_equal(prep.normalize(pixels.numpy()), x.numpy())
    nhwc = model_input(pixels, prep, torch.device("cpu"), channels_last=True)
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and torch.equal(nhwc, x)
    np.testing.assert_array_equal(prep(good), prep.normalize(prep.transform()(prep.size(prep.decode(good)))))
    with pytest.raises(ValueError, match="needs the Preprocess"):
        model_input(pixels, None, torch.device("cpu"))
    with pytest.raises(TypeError, match="uint8"):
        prep.normalize(x)  # normalised twice would be silent garbage


@pytest.mark.slow
def test_the_training_benchmark_measures_what_it_documents(tiny_data):
    """``python -m utils.bench.train`` on a few images: every row, each rate measured, the full
    step fed by the real loader (uint8 batches normalised in the step) with its data wait."""
    from utils.bench.train import BenchTrainConfig, main
    args = ["--data-dir", str(tiny_data), "--models", "resnet18", "--sizes", "32", "--images", "64",
            "--batch-size", "16", "--repeats", "1", "--workers", "0", "--workers-sweep", "0", "--epoch", "false"]
    table = main(parse_config(BenchTrainConfig, args))
    measured = table.dropna(subset=["img_per_s"]).set_index("measure")
    assert {"decode cache, built once", "loader alone", "loader alone, decoding on the fly",
            "loader alone, batched: the gathers", "loader alone, batched: gathers + augmentation on cpu",
            "ceiling, channels_last (auto)", "ceiling, contiguous", "full step",
            "full step, decoding on the fly", "full step, batched (augmented on cpu)"} <= set(measured.index)
    assert (measured.img_per_s > 0).all()
    # the batched path's augmentation is work on top of its gathers
    assert measured.loc["loader alone, batched: the gathers", "img_per_s"] > \
        measured.loc["loader alone, batched: gathers + augmentation on cpu", "img_per_s"]
    for row in ("full step", "full step, decoding on the fly", "full step, batched (augmented on cpu)"):
        assert 0 < measured.loc[row, "of_ceiling"] and 0 <= measured.loc[row, "data_wait"] < 1


STEPS = textwrap.dedent("""
    import ctypes, resource, torch
    from utils.train.throughput import keep_freed_memory
    libc = ctypes.CDLL("libc.so.6")  # glibc's starting thresholds (128 KB), pinned: how far they adapted
    libc.mallopt(-3, 128 << 10), libc.mallopt(-1, 128 << 10)  # while torch was imported must not matter
    faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    def step():  # a step's working set: eight 12 MB activations, freed at its end
        xs = [torch.ones(3 << 20) for _ in range(8)]
        del xs
    def faults_of_three_steps():
        for _ in range(3):  # the heap grows to the step's working set
            step()
        before = faults()
        for _ in range(3):
            step()
        return faults() - before
    print(faults_of_three_steps(), int(keep_freed_memory()), faults_of_three_steps())
""")


def test_a_step_reuses_the_memory_the_step_before_freed(monkeypatch):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", STEPS], capture_output=True, text=True, env=env, check=True)
    default, changed, kept = map(int, out.stdout.split())
    assert default > 60_000  # mapped afresh at every allocation: 3 x 24,576 pages faulted in again
    assert changed == 1 and kept < 100  # the 96 MB stayed: no page is faulted in again
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert keep_freed_memory() is False  # glibc variables the user set win


def test_amp_auto_takes_the_dtype_that_measured_faster_once_per_machine_model_and_size(tmp_path, monkeypatch):
    from utils.train import precision
    from utils.train.engine import amp_dtype

    monkeypatch.setenv("KIT_CACHE_DIR", str(tmp_path))
    speeds = {32: {"fp32": 0.2, "bf16": 0.1}, 64: {"fp32": 0.3, "bf16": 0.5}}
    timed, logged = [], []

    def fake_timing(model, img_size, batch, device, train, channels_last):
        timed.append((img_size, batch, train))
        return speeds[img_size]

    monkeypatch.setattr(precision, "time_steps", fake_timing)
    cpu = torch.device("cpu")
    choose = lambda size, batch=32, train=True: amp_dtype("auto", lambda: precision.measured_dtype(
        None, "resnet18", size, batch, cpu, train, False, log=logged.append))
    assert choose(32) is torch.bfloat16 and choose(64) is None
    assert choose(32) is torch.bfloat16 and choose(64, batch=64) is None  # from the cache
    assert timed == [(32, precision.MEASURE_BATCH, True), (64, precision.MEASURE_BATCH, True)]
    assert choose(32, train=False) is torch.bfloat16 and timed[-1] == (32, precision.MEASURE_BATCH, False)
    assert logged[0] == ("amp auto: bf16 (training step of 16 images at 32 px: fp32 200 ms, bf16 100 ms; "
                         f"timed now, cached in {tmp_path / 'precision.json'})")
    assert logged[2].startswith("amp auto: bf16 (")
    assert logged[2].endswith(f"; cached in {tmp_path / 'precision.json'})")
    cached = json.loads((tmp_path / "precision.json").read_text())
    assert len(cached) == 3 and all(json.loads(k)["machine"] == precision.machine(cpu) for k in cached)
    # the named settings are taken as named, without measuring
    assert [amp_dtype(a) for a in ("off", "bf16", "fp16")] == [None, torch.bfloat16, torch.float16]
    with pytest.raises(ValueError, match="measuring"):
        amp_dtype("auto")


def test_ranks_decide_the_precision_on_their_mean_and_a_later_run_reads_the_same_decision(tmp_path, monkeypatch):
    """Two ranks time a model whose precisions are close: this one saw bf16 faster, the other fp32 by
    more, so their mean takes fp32. The cache keeps that mean, so a later run on the machine (one
    rank, from the cache) takes fp32 too: a rank's own timing, cached, had made a two-node run train in
    bf16 where the one-node run had trained in fp32 (its logits 0.013 apart)."""
    from utils.train import precision

    monkeypatch.setenv("KIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(precision, "time_steps", lambda *args: {"fp32": 0.034, "bf16": 0.032})
    other = [0.030, 0.036]  # the other rank's fp32 and bf16 seconds
    mean = lambda values: [(a + b) / 2 for a, b in zip(values, other)]
    args = (None, "test_resnet", 32, 16, torch.device("cpu"), True, False)
    assert precision.measured_dtype(*args, total=mean, log=lambda text: None) is None
    monkeypatch.setattr(precision, "time_steps", lambda *args: pytest.fail("timed again: the cache was not read"))
    assert precision.measured_dtype(*args, log=lambda text: None) is None
    (seconds,) = json.loads((tmp_path / "precision.json").read_text()).values()
    assert seconds == pytest.approx({"fp32": 0.032, "bf16": 0.034})


def test_timing_the_precisions_and_fit_speeds_leaves_the_model_and_the_random_state_as_they_were():
    from utils.fit.measure import timed_rate
    from utils.train.model import AttributeModel
    from utils.train.precision import time_steps

    model = AttributeModel("test_resnet", [3, 2], loss=None).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    for train in (True, False):
        seconds = time_steps(model, 32, 4, torch.device("cpu"), train, channels_last=False)
        assert set(seconds) == {"fp32", "bf16"} and min(seconds.values()) > 0
        assert timed_rate(model, 32, 4, torch.device("cpu"), train, False, torch.bfloat16) > 0
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # batch-norm statistics too
    assert torch.equal(torch.get_rng_state(), rng)
