"""The kit on a dataset that is not the competition's: other categories, attribute names and counts."""
import pandas as pd
import pytest

from tests.conftest import OTHER_WORLD, run_script
from utils.data.schema import ATTR_COLS, CATEGORY, DUMMY, ID, LEN, Schema, read_dataset, read_submission
from utils.metric import validate_submission

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
    # in a process of its own: refused before torch is even imported (in well under a second)
    code = ("import runpy, sys; sys.argv = ['train.py', '--config', 'configs/visual_taxonomy.yaml', '--data-dir', "
            f"{str(other_data)!r}, '--out-dir', {str(tmp_path / 'run')!r}]\n"
            "try:\n    runpy.run_path('train.py', run_name='__main__')\n"
            "except SystemExit as end:\n    print('exit', end.code, 'torch imported:', 'torch' in sys.modules)")
    alone = run_script("-c", code)
    assert alone.stdout.strip() == "exit 2 torch imported: False" and "error: key 'category_aug'" in alone.stderr
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


def _idx_files(folder, n: int, seed: int, short_class: int | None = None) -> None:
    """The four Fashion-MNIST idx files (gzipped), with ``n`` random 28 x 28 photos per split (of
    ``short_class``, only 2 in the train split)."""
    import gzip

    import numpy as np

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for images, labels in (("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                           ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")):
        y = np.arange(n, dtype=np.uint8) % 10
        if short_class is not None and images.startswith("train"):
            y = y[(y != short_class) | (np.cumsum(y == short_class) <= 2)]
        x = (y[:, None, None] * 25 + rng.integers(0, 5, (len(y), 28, 28))).astype(np.uint8)  # brightness = class
        with gzip.open(folder / f"{images}.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (len(y), 28, 28)) + x.tobytes())
        with gzip.open(folder / f"{labels}.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 1]) + len(y).to_bytes(4, "big") + y.tobytes())


def test_the_real_photo_dataset_is_written_in_the_competition_layout(tmp_path):
    """utils.tools.real_data on idx files: three categories of its own, one attribute each, labels from the
    photos' classes (held-out test labels only in test_solution.csv), a share missing."""
    import numpy as np
    from PIL import Image

    from utils.errors import DataError
    from utils.tools.real_data import CLASSES, build

    _idx_files(tmp_path / "idx", 60, seed=0)
    out = build(tmp_path / "real", source=str(tmp_path / "idx"), n_train=50, n_test=20, missing=0.2, progress=False)
    data = read_dataset(out)
    assert data.category_attrs == {"Tops": ["garment"], "Footwear": ["style"], "Trousers & Bags": ["item"]}
    assert len(data.train) == 50 and len(data.test) == 20 and "attr_1" not in data.test
    assert data.train.groupby(CATEGORY).size().to_dict() == {"Tops": 25, "Footwear": 15, "Trousers & Bags": 10}
    given = data.train[data.train["attr_1"].notna()]
    assert 0.05 < 1 - len(given) / 50 < 0.4
    for _, row in given.iterrows():  # each label is its photo's class: the brightness the idx files gave it
        level = np.asarray(Image.open(out / "train_images" / f"{row[ID]:06d}.jpg")).mean()
        assert CLASSES[int(round(level / 25))] == (row[CATEGORY], row["attr_1"])
    solution = read_submission(out / "test_solution.csv")
    assert solution["attr_1"].notna().all() and (solution[LEN] == 1).all()
    (tmp_path / "idx" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"idx files .* are not all there"):
        build(tmp_path / "again", source=str(tmp_path / "idx"), n_train=5, n_test=5, progress=False)


def _folder_files(folder) -> dict:
    """{relative path: bytes} of every file in a dataset folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_rebuild_into_the_same_folder_gives_exactly_a_fresh_build(tmp_path):
    """Building the real-photo dataset again into a folder with another seed or size leaves no old
    photo beside a new label: every file equals a fresh build's (and the same options again keep
    the photos, as an interrupted build goes on). A source with too few photos of a class is
    refused, naming the class and the counts, before a file changes."""
    from utils.errors import DataError
    from utils.tools.real_data import build

    _idx_files(tmp_path / "idx", 60, seed=0)
    idx, again = str(tmp_path / "idx"), tmp_path / "again"
    for seed, n_train in ((0, 50), (1, 50), (1, 30)):
        build(again, source=idx, n_train=n_train, n_test=20, seed=seed, progress=False)
        fresh = build(tmp_path / f"fresh_{seed}_{n_train}", source=idx, n_train=n_train, n_test=20, seed=seed,
                      progress=False)
        assert _folder_files(again) == _folder_files(fresh)
    photo = again / "train_images" / "000003.jpg"
    stamp = photo.stat().st_mtime_ns
    build(again, source=idx, n_train=30, n_test=20, seed=1, progress=False)
    assert photo.stat().st_mtime_ns == stamp  # the same options: the photos already written are kept

    before = _folder_files(again)
    _idx_files(tmp_path / "short", 60, seed=0, short_class=3)
    with pytest.raises(DataError, match=r"official train split .* too few photos of some classes for 30 .*"
                                        r": class 3 \(dress\): 2 photos, 3 needed\. Ask for fewer"):
        build(again, source=str(tmp_path / "short"), n_train=30, n_test=20, seed=1, progress=False)
    assert _folder_files(again) == before


def test_a_regenerated_demo_dataset_gives_exactly_a_fresh_one(tmp_path):
    """The demo generator too: another seed into the same folder rewrites every image."""
    from utils.tools.demo_data import generate

    generate(tmp_path / "again", n_train=12, n_test=4, seed=0, workers=1, progress=False)
    generate(tmp_path / "again", n_train=10, n_test=4, seed=1, workers=1, progress=False)
    generate(tmp_path / "fresh", n_train=10, n_test=4, seed=1, workers=1, progress=False)
    assert _folder_files(tmp_path / "again") == _folder_files(tmp_path / "fresh")


def test_the_solar_cell_dataset_holds_out_a_quarter_of_every_type_and_grade(monkeypatch, tmp_path):
    """utils.tools.elpv_data (benchmark data of another domain): its split is stratified, and
    without its package the error says how to get it."""
    import sys

    import numpy as np

    from utils.errors import DataError
    from utils.tools import elpv_data

    rng = np.random.default_rng(0)
    types = np.array(["mono"] * 400 + ["poly"] * 600)
    grades = rng.choice(4, size=1000, p=[0.6, 0.1, 0.05, 0.25])
    test = elpv_data.split(grades, types, 0.25, np.random.default_rng(1))
    for t in ("mono", "poly"):
        for g in range(4):
            n = ((types == t) & (grades == g)).sum()
            assert abs(test[(types == t) & (grades == g)].sum() - n / 4) <= 0.5
    monkeypatch.setitem(sys.modules, "elpv_dataset.utils", None)  # not installed
    with pytest.raises(DataError, match="pip install elpv-dataset"):
        elpv_data.build(tmp_path / "elpv")
