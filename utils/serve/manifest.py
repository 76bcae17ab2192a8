"""The serving manifest, ``<out-dir>/onnx/manifest.json``: what export.py exported and chose, and
what infer.py serves. This type is the one place that writes it and reads it back.

    models      ensemble.json's runs: what infer.py blends by default
    schema      the fingerprint of the schema every file was exported for
    members     one entry per exported run: run, model, preprocess, tta_hflip, [oof_fp32, oof_int8]
                and folds: [{fold, path, [int8_path], parity_max_abs_diff, parity_same_decoding, ...}]
    use         "merged" or "separate": how ensemble.json's blend is served
    merged      the merged graph: path, preprocess, parity against separate sessions, and the digest
                of the blend it bakes in (``ensemble``)
    timing_ms_per_image   without a budget: separate sessions against the merged graph, one image
    serve       under ``--budget-ms``: the configuration chosen (utils/serve/budget.py)
    config      export.py's options
    provenance  the checkpoints, ONNX files and ensemble.json it was made from (utils/provenance.py)
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Optional

from utils import provenance
from utils.errors import DataError
from utils.io import atomic_write_json
from utils.run import RunDir


@dataclass
class Manifest:
    models: list[str]
    schema: str
    members: list[dict]
    config: dict
    use: str = "separate"
    merged: Optional[dict] = None
    timing_ms_per_image: Optional[dict] = None
    serve: Optional[dict] = None
    provenance: Optional[dict] = None

    @property
    def by_run(self) -> dict[str, dict]:
        return {e["run"]: e for e in self.members}

    def onnx_files(self) -> list[str]:
        """Every ONNX file it lists, relative to the onnx folder."""
        files = [f[key] for e in self.members for f in e["folds"] for key in ("path", "int8_path") if key in f]
        files += [part["path"] for part in (self.merged, self.serve) if part and part.get("path")]
        return files

    def write(self, run_dir: RunDir, rebuild: str, with_ensemble: bool) -> None:
        """Record what it is made from (every exported run's checkpoints, the ONNX files it lists and,
        ``with_ensemble``, ensemble.json, whose weights a merged graph bakes in and whose method weighs
        the budget's candidates), then write it atomically."""
        used = [run_dir.fold_file(e["run"], f["fold"], "best.pt") for e in self.members for f in e["folds"]]
        used += [run_dir.onnx_dir / name for name in self.onnx_files()]
        if with_ensemble and run_dir.ensemble_path.is_file():
            used.append(run_dir.ensemble_path)
        self.provenance = provenance.record(used, run_dir.path, rebuild=rebuild)
        atomic_write_json(run_dir.manifest_path, {k: v for k, v in dataclasses.asdict(self).items() if v is not None})

    @classmethod
    def read(cls, run_dir: RunDir, models: list[str] = ()) -> Manifest:
        """The run folder's manifest, checked against the files it was made from and to hold every
        one of ``models`` (it may hold more: ``--budget-ms`` exports every complete run, so
        ``infer.py --models student`` works)."""
        path = run_dir.manifest_path
        if not path.is_file():
            raise DataError(f"{path} not found: run `python export.py --out-dir {run_dir.path}` first, "
                            f"or use --backend torch")
        try:
            manifest = cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as err:
            raise DataError(f"{path}: not a manifest export.py wrote ({err}); re-run export.py") from None
        provenance.check(manifest.provenance, run_dir.path, path)
        exported = [e["run"] for e in manifest.members]
        if missing := [m for m in models if m not in exported]:
            raise DataError(f"{path} was exported for runs {exported}, which lack {missing}; re-run export.py "
                            f"(with --models {','.join(models)}, or --budget-ms to export every run)")
        return manifest
