"""What a derived file was made from, and whether that still holds.

Every derived artifact records the fingerprints of its inputs (size, modification time and
SHA-256 of the content), with paths relative to the run folder so that a copied or moved folder
stays valid:

    OOF / test logits      <- the fold's best.pt, schema.json, folds.csv
    ensemble.json          <- every OOF logits file it read
    onnx/*.onnx, manifest  <- the checkpoints (and ensemble.json for the merged graph)
    embedding caches       <- the weights and the images they were computed from
    the decode cache       <- the images and their decoding (utils/data/decoded.py)

A consumer calls ``check`` before it uses the artifact: an input that is missing, or whose
content changed since, stops it with a StaleError that names the artifact, the input, what
changed, and the command that rebuilds it. When size and modification time are unchanged the
content is not hashed again, so a check costs a ``stat`` per input.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from utils.errors import StaleError

_HASHES: dict[tuple, str] = {}  # (path, size, mtime_ns) -> sha256, per process


def sha256(path: Path) -> str:
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def files_digest(paths, key=lambda p: Path(p).name) -> str:
    """A hash of the files' ``key`` (their names by default), sizes and modification times: a
    ``stat`` each, no read. Caches keyed by it are rebuilt when an input file changes."""
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{key(p)}:{st.st_size}:{st.st_mtime_ns};".encode())
        except OSError:
            h.update(f"{key(p)}:missing;".encode())
    return h.hexdigest()


def fingerprint(path: str | Path) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256(Path(path))}


def record(paths, root: str | Path, rebuild: str) -> dict:
    """The provenance of an artifact made from ``paths`` (inside ``root``), and the command that
    rebuilds it (``{root}`` in it stands for the run folder wherever it is when checked)."""
    root = Path(root)
    inputs = {Path(p).resolve().relative_to(root.resolve()).as_posix(): fingerprint(p) for p in paths}
    return {"inputs": inputs, "rebuild": rebuild}


def changes(provenance: dict, root: str | Path) -> list[tuple[str, str]]:
    """(input, what changed) for every input that no longer matches its fingerprint."""
    out = []
    for rel, was in provenance["inputs"].items():
        path = Path(root) / rel
        if not path.is_file():
            out.append((rel, "which is missing"))
            continue
        st = os.stat(path)
        if st.st_size == was["size"] and st.st_mtime_ns == was["mtime_ns"]:
            continue
        if sha256(path) != was["sha256"]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.st_mtime_ns / 1e9))
            out.append((rel, f"which changed since (other content; {was['size']:,} -> {st.st_size:,} bytes, "
                             f"modified {when})"))
    return out


def check(provenance: dict | None, root: str | Path, artifact: str | Path) -> None:
    """Raise StaleError when ``artifact`` no longer matches the inputs it was made from, or when
    one of those inputs is itself stale (ensemble.json <- OOF logits <- checkpoint). An artifact
    that records nothing (made outside the kit) has nothing to check."""
    if provenance is None:
        return
    found = changes(provenance, root)
    if not found:
        for rel in provenance["inputs"]:
            if rel.endswith((".npz", ".json")):
                check_file(Path(root) / rel, root)
    if found:
        listed = "; ".join(f"{rel}, {what}" for rel, what in found[:3]) + (f"; and {len(found) - 3} more" if len(found) > 3 else "")
        rebuild = provenance["rebuild"].replace("{root}", str(root))
        raise StaleError(f"{artifact} is stale: it was made from {listed}. Rebuild it with: {rebuild}")


def read(path: str | Path) -> dict | None:
    """The provenance stored in an artifact: the ``provenance`` key of a JSON file or of an
    ``.npz`` (as JSON text); None when it has none."""
    import json

    import numpy as np

    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return json.loads(str(z["provenance"])) if "provenance" in z.files else None
    return json.loads(path.read_text()).get("provenance")


def check_file(path: str | Path, root: str | Path) -> None:
    """``check`` an artifact against the provenance it stores."""
    check(read(path), root, path)
