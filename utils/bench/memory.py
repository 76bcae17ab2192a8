"""Inference memory over a large test set: infer.py's memory as the images stream by.

    python -m utils.bench.memory --data-dir data/demo --out-dir runs/demo --rows 30000 \
        --infer-args "--backend onnx --batch-size 32 --workers 2"

Builds a test set of ``--rows`` rows in a scratch folder (``test.csv`` and hard links to the data's
own test images under new ids: no image is copied), runs inference on it (``utils.serve.infer.infer``,
what infer.py runs, with ``--infer-args`` and a scratch submission) in a fresh process of its own
whose loader workers fork as under ``python infer.py``, and samples its memory as the batches go by
(read from its progress bar, ``done/total``): the resident set (RSS) of the process itself, and the
proportional set (PSS, shared pages split between processes) of the process with its children
(loader workers). Prints both at every tenth of the batches, then the growth while streaming: from
the first tenth to the last batch. Linux only (it reads /proc).
"""
from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from utils.bench import fresh_process, machine
from utils.config import CommonConfig, option, parse_config, run_command
from utils.data.schema import CATEGORY, ID, image_path, read_test
from utils.run import RunDir


@dataclass
class BenchMemoryConfig(CommonConfig):
    rows: int = option(30000, "test rows to stream (hard links to the data's own test images)")
    infer_args: str = option("", "infer.py's options besides --data-dir, --out-dir and --output, "
                                 "e.g. '--backend onnx --batch-size 32 --workers 2'")


def make_test_set(data_dir: Path, dst: Path, rows: int, categories: list[str]) -> None:
    """``rows`` test rows cycling through the data's own test images, with new ids 0..rows-1."""
    source = read_test(data_dir / "test.csv", categories)
    (dst / "test_images").mkdir(parents=True)
    shutil.copy(data_dir / "category_attributes.parquet", dst / "category_attributes.parquet")
    picks = source.iloc[[k % len(source) for k in range(rows)]].reset_index(drop=True)
    for new_id, old_id in enumerate(picks[ID]):
        src, link = image_path(data_dir / "test_images", int(old_id)), image_path(dst / "test_images", new_id)
        if src.exists():
            try:
                os.link(src, link)
            except OSError:
                os.symlink(src.resolve(), link)
    pd.DataFrame({ID: range(rows), CATEGORY: picks[CATEGORY]}).to_csv(dst / "test.csv", index=False)


def _kb(path: str, field: str) -> int:
    try:
        with open(path) as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field))
    except (OSError, StopIteration, ValueError):
        return 0


def _tree(pid: int) -> list[int]:
    """pid and its descendants."""
    pids, k = [pid], 0
    while k < len(pids):
        try:
            for task in os.listdir(f"/proc/{pids[k]}/task"):
                with open(f"/proc/{pids[k]}/task/{task}/children") as f:
                    pids += [int(c) for c in f.read().split()]
        except OSError:
            pass
        k += 1
    return pids


def sample(pid: int) -> tuple[float, float]:
    """(RSS of pid, PSS of pid and its descendants), in MB."""
    rss = _kb(f"/proc/{pid}/status", "VmRSS:")
    pss = sum(_kb(f"/proc/{p}/smaps_rollup", "Pss:") for p in _tree(pid))
    return rss / 1024, pss / 1024


def infer_logged(argv: list[str], log: str) -> None:
    """What infer.py runs (``utils.serve.infer.infer`` on its parsed config), its output, progress
    bar included, written to ``log``."""
    from utils.serve.infer import InferConfig, infer

    with open(log, "w") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        infer(parse_config(InferConfig, argv))


def last_bar(log: Path) -> tuple[int, int]:
    """(done, total) of the last progress bar in the log's last 4 KB, or (0, 0)."""
    with contextlib.suppress(OSError), open(log, "rb") as f:
        f.seek(max(0, log.stat().st_size - 4096))
        found = re.findall(r"(\d+)/(\d+) \[", f.read().decode(errors="replace"))
        if found:
            return tuple(map(int, found[-1]))
    return 0, 0


def measure(argv: list[str], log: Path, interval: float = 0.2) -> pd.DataFrame:
    """Run inference with ``argv`` (its progress bar on) in a fresh process and sample its memory;
    one row per sample with the share of batches done, read from its progress bar."""
    proc = fresh_process(infer_logged, argv, str(log))
    samples, start = [], time.perf_counter()
    while proc.is_alive():
        rss, pss = sample(proc.pid)
        done, total = last_bar(log)
        if rss and total:
            samples.append({"seconds": time.perf_counter() - start, "done": done / total, "rss_mb": rss, "pss_mb": pss})
        time.sleep(interval)
    proc.join()
    if proc.exitcode != 0:
        tail = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
        raise RuntimeError(f"inference with {shlex.join(argv)} failed ({proc.exitcode}):\n{tail}")
    return pd.DataFrame(samples)


def summarize(samples: pd.DataFrame, rows: int) -> tuple[pd.DataFrame, dict]:
    """Memory at each tenth of the batches; growth while streaming, from the first tenth (once the
    models, the loader workers and the allocator have settled) to the last batch."""
    if samples.empty:
        raise RuntimeError("inference finished before a sample was taken; measure more --rows")
    table = []
    for tenth in range(1, 11):
        upto = samples[samples.done <= tenth / 10]
        if len(upto):
            last = upto.iloc[-1]
            table.append({"batches_done": f"{tenth * 10}%", "images": int(round(last.done * rows)),
                          "rss_mb": round(last.rss_mb, 1), "with_children_pss_mb": round(last.pss_mb, 1)})
    streaming = samples[samples.done < 1.0]  # the last batch done: the table is assembled and written
    settled = streaming[streaming.done >= 0.1]
    first = settled.iloc[0] if len(settled) else samples.iloc[0]
    tail = streaming[streaming.done >= 0.5]
    tail = tail if len(tail) else samples.iloc[-1:]
    stats = {"rows": rows, "peak_rss_mb": float(samples.rss_mb.max()), "peak_pss_mb": float(samples.pss_mb.max()),
             "rss_growth_mb": float(tail.rss_mb.max() - first.rss_mb),
             "pss_growth_mb": float(tail.pss_mb.max() - first.pss_mb)}
    return pd.DataFrame(table), stats


def main(cfg: BenchMemoryConfig) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as scratch:
        scratch = Path(scratch)
        make_test_set(Path(cfg.data_dir), scratch / "data", cfg.rows, RunDir(cfg.out_dir).schema.categories)
        argv = [*shlex.split(cfg.infer_args), "--data-dir", str(scratch / "data"), "--out-dir", cfg.out_dir,
                "--output", str(scratch / "submission.csv"), "--progress", "true"]
        start = time.perf_counter()
        samples = measure(argv, scratch / "infer.log")
        seconds = time.perf_counter() - start
        written = len(pd.read_csv(scratch / "submission.csv", usecols=[ID]))
    table, stats = summarize(samples, cfg.rows)
    stats.update(seconds=seconds, submission_rows=written)
    print(f"\nmemory of infer.py {cfg.infer_args} over {cfg.rows} test rows; {machine()}")
    print(table.to_string(index=False))
    print(f"peak: RSS {stats['peak_rss_mb']:.0f} MB, with children PSS {stats['peak_pss_mb']:.0f} MB; growth while "
          f"streaming (first tenth to last batch): RSS {stats['rss_growth_mb']:+.1f} MB, PSS "
          f"{stats['pss_growth_mb']:+.1f} MB; {written} rows written in {seconds:.0f} s")
    return stats


if __name__ == "__main__":
    run_command(main, BenchMemoryConfig, __doc__)
