"""ONNX files: one fold's graph, the merged ensemble graph, the metadata each file carries about
itself, sessions, and int8 quantisation."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from utils.blend import expand_weights
from utils.data.schema import Schema
from utils.data.transforms import Preprocess
from utils.errors import DataError
from utils.io import atomic_path
from utils.train.model import load_checkpoint


class LogitsOnly(nn.Module):
    """The exported graph of one fold: normalised image [B, 3, S, S] -> raw logits [B, L]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        return self.model.logits(image)


class EnsembleGraph(nn.Module):
    """A whole ensemble in one graph: for every member, per-head log-softmax of each fold's logits,
    averaged over folds, weighted per logit, summed, plus the biases -> blended scores [B, L]
    (the same arithmetic as utils.blend.combine_members).

    The per-head log-softmax is one padded operation, not one per head: logits [..., L] are
    gathered into [..., heads, widest head] (padding at -1e30, which softmax weighs 0), normalised
    along the last axis and gathered back. A handful of graph nodes per member instead of ~85 per
    fold: faster to export, and to run."""

    def __init__(self, fold_models: list[list[nn.Module]], per_logit_weights: np.ndarray, bias: np.ndarray,
                 schema: Schema):
        super().__init__()
        self.members = nn.ModuleList(nn.ModuleList(folds) for folds in fold_models)
        self.register_buffer("weights", torch.as_tensor(per_logit_weights, dtype=torch.float32))
        self.register_buffer("bias", torch.as_tensor(bias, dtype=torch.float32))
        width = max(h.width for h in schema.heads)
        gather = torch.zeros(len(schema.heads), width, dtype=torch.long)
        pad = torch.full((len(schema.heads), width), -1e30)
        back = torch.zeros(schema.n_logits, dtype=torch.long)  # where logit l sits in [heads * width]
        for j, head in enumerate(schema.heads):
            gather[j, :head.width] = torch.arange(head.offset, head.offset + head.width)
            pad[j, :head.width] = 0.0
            back[head.offset:head.offset + head.width] = torch.arange(j * width, j * width + head.width)
        self.register_buffer("gather", gather, persistent=False)
        self.register_buffer("pad", pad, persistent=False)
        self.register_buffer("back", back, persistent=False)

    def head_log_softmax(self, z):
        padded = z[..., self.gather] + self.pad
        return torch.log_softmax(padded, dim=-1).flatten(-2)[..., self.back]

    def forward(self, image):
        total = self.bias.unsqueeze(0)
        for m, folds in enumerate(self.members):
            lp = self.head_log_softmax(torch.stack([f.logits(image) for f in folds])).mean(0)
            total = total + self.weights[m] * lp
        return total


def metadata(schema: Schema, run: str, prep: Preprocess, **extra) -> dict:
    """What an ONNX file says about itself (``read_metadata`` reads it back; ``make_session`` checks
    its schema): the schema, the run, the preprocessing, and ``extra`` (fold, model)."""
    return {"fingerprint": schema.fingerprint, "schema": schema.to_dict(), "run": run,
            "preprocess": prep.to_dict(), **extra}


def export_graph(fold_paths: list[list[Path]], weights, biases, schema: Schema, prep: Preprocess, path: Path) -> None:
    """Runs' fold checkpoints (one list per run), blended with ``weights`` and ``biases``, as one
    ONNX graph: what separate sessions blended by utils.blend.combine_members compute."""
    fold_models = [[load_checkpoint(p, schema)[0] for p in paths] for paths in fold_paths]
    graph = EnsembleGraph(fold_models, expand_weights(weights, schema), biases, schema)
    export_onnx(graph, path, prep.img_size, metadata(schema, "ensemble", prep))


def export_onnx(module: nn.Module, path: Path, img_size: int, metadata: dict) -> None:
    """Export with a dynamic batch size (TorchScript exporter: fast, and dynamic axes by name),
    then embed ``metadata`` (JSON) in the file so it describes itself."""
    module = module.eval()
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter, chosen knowingly
        torch.onnx.export(module, (torch.zeros(2, 3, img_size, img_size),), str(tmp), input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
        add_metadata(tmp, metadata)


def add_metadata(path: Path, metadata: dict) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = "kit", json.dumps(metadata)
    onnx.save(model, str(path))


def read_metadata(path: Path) -> dict:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for entry in model.metadata_props:
        if entry.key == "kit":
            return json.loads(entry.value)
    raise DataError(f"{path}: no kit metadata; re-export it with export.py")


def make_session(path: Path, threads: int = 0, schema: Schema | None = None):
    """An ONNX Runtime CPU session with all graph optimisations; with ``schema``, refuse a file
    exported for another schema."""
    import onnxruntime as ort

    if schema is not None:
        meta = read_metadata(path)
        if meta.get("fingerprint") != schema.fingerprint:
            other = Schema.from_dict(meta["schema"]) if "schema" in meta else None
            detail = "; ".join(schema.diff(other)[:5]) if other else "no schema stored"
            raise DataError(f"{path} was exported for another schema (this run's first, the file's second: {detail})")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or (os.cpu_count() or 1)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def quantize_int8(src: Path, dst: Path, calibration: list[np.ndarray]) -> None:
    """Static int8 quantisation (QDQ, per-channel weights), calibrated on preprocessed images."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"image": batch}

    prepared = dst.with_name(dst.stem + ".pre.onnx")
    quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
    with atomic_path(dst) as tmp:
        quantize_static(str(prepared), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        add_metadata(tmp, read_metadata(src))
    prepared.unlink(missing_ok=True)
