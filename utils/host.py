"""The CPU a run is on, as /proc/cpuinfo names it: what timings depend on. One reader for the
benchmarks' ``machine:`` line (utils/bench) and for amp auto's cache key (utils/train/precision.py)."""
from __future__ import annotations

import functools
import platform


@functools.lru_cache(maxsize=None)
def cpu() -> tuple[str, tuple[str, ...]]:
    """(the CPU's model name, its flags): from the first processor of /proc/cpuinfo, else
    (``platform.processor()`` or the architecture, no flags)."""
    model, flags = "", ()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = tuple(value.split())
                    break
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags
