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


class LogitsOnly(nn.Module):
    """The exported graph of one fold: normalised image [B, 3, S, S] -> raw logits [B, L]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        return self.model.logits(image)


class Blend(nn.Module):
    """A merged graph's blend: for every member, the per-head log-softmax of each fold's logits,
    averaged over folds, weighted per logit, summed, plus the biases -> blended scores [B, L] (the
    same arithmetic as utils.blend.combine_members). ``folds``: the number of folds of each member;
    ``forward`` takes every fold's logits [B, L], member by member.

    The per-head log-softmax is one padded operation, not one per head: logits [..., L] are
    gathered into [..., heads, widest head] (padding at -1e30, which softmax weighs 0), normalised
    along the last axis and gathered back. A handful of graph nodes per member instead of ~85 per
    fold: faster to export, and to run."""

    def __init__(self, folds: list[int], per_logit_weights: np.ndarray, bias: np.ndarray, schema: Schema):
        super().__init__()
        self.folds = list(folds)
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

    def forward(self, *fold_logits):
        total, first = self.bias.unsqueeze(0), 0
        for m, n in enumerate(self.folds):
            lp = self.head_log_softmax(torch.stack(fold_logits[first:first + n])).mean(0)
            total, first = total + self.weights[m] * lp, first + n
        return total


class EnsembleGraph(nn.Module):
    """A whole ensemble as one module: image [B, 3, S, S] -> every fold model of every member ->
    ``Blend`` (the latency benchmark traces it; export.py joins the folds' own ONNX files instead,
    ``export_graph``)."""

    def __init__(self, fold_models: list[list[nn.Module]], per_logit_weights: np.ndarray, bias: np.ndarray,
                 schema: Schema):
        super().__init__()
        self.members = nn.ModuleList(nn.ModuleList(folds) for folds in fold_models)
        self.blend = Blend([len(folds) for folds in fold_models], per_logit_weights, bias, schema)

    def forward(self, image):
        return self.blend(*[f.logits(image) for folds in self.members for f in folds])


def metadata(schema: Schema, run: str, prep: Preprocess, **extra) -> dict:
    """What an ONNX file says about itself (``read_metadata`` reads it back; ``make_session`` checks
    its schema): the schema, the run, the preprocessing, and ``extra`` (fold, model)."""
    return {"fingerprint": schema.fingerprint, "schema": schema.to_dict(), "run": run,
            "preprocess": prep.to_dict(), **extra}


def export_graph(fold_files: list[list[Path]], weights, biases, schema: Schema, prep: Preprocess, path: Path) -> None:
    """Runs' fold ONNX files (one list per run), blended with ``weights`` and ``biases``, as one
    ONNX graph: what separate sessions blended by utils.blend.combine_members compute. The folds'
    own graphs are joined by the blend's (``Blend``, the only part traced here), each fold's names
    prefixed: tracing six Lite0 folds again as one module took 4.5 s on two cores, joining them 0.6 s."""
    import io

    import onnx

    n = sum(len(files) for files in fold_files)
    inputs = [f"fold{i}_logits" for i in range(n)]
    blend = Blend([len(files) for files in fold_files], expand_weights(weights, schema), biases, schema).eval()
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter, chosen knowingly
        torch.onnx.export(blend, tuple(torch.zeros(2, schema.n_logits) for _ in range(n)), buffer, input_names=inputs,
                          output_names=["logits"], dynamic_axes={x: {0: "batch"} for x in inputs + ["logits"]},
                          opset_version=17, dynamo=False)
    blend_model = onnx.load_from_string(buffer.getvalue())
    graph, known = onnx.GraphProto(name="ensemble"), {}
    folds = [file for files in fold_files for file in files]
    for i, file in enumerate(folds):
        fold = onnx.load(str(file))
        image, logits = fold.graph.input[0].name, fold.graph.output[0].name
        if i == 0:
            graph.input.extend(fold.graph.input[:1])
        join(graph, fold.graph, f"fold{i}/", {image: graph.input[0].name, logits: inputs[i]}, known)
    join(graph, blend_model.graph, "blend/", {**{x: x for x in inputs}, "logits": "logits"}, known)
    graph.output.extend(blend_model.graph.output)
    model = onnx.helper.make_model(graph, opset_imports=blend_model.opset_import, ir_version=blend_model.ir_version)
    set_metadata(model, metadata(schema, "ensemble", prep))
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))


def join(graph, part, prefix: str, names: dict, known: dict) -> None:
    """Append ``part``'s nodes and initializers to ``graph``, every name prefixed except those of
    ``names`` (old -> new: the shared image input, the fold's logits into the blend). An initializer
    equal to one already joined is not added again but shared (``known``: its content -> its name),
    as torch's exporter shares equal weights when it traces: the frozen route's folds share their
    backbone (three Lite0 folds at 64 px: 24 MB, not 52), which a runtime may then compute once."""
    import hashlib

    import onnx

    names, constants = dict(names), set()
    for node in part.node:  # constants as initializers, shared alike (ReLU6's bounds, shapes: a fold's 235)
        if node.op_type == "Constant" and [a.name for a in node.attribute] == ["value"]:
            constants.add(node.output[0])
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            part.initializer.append(tensor)
    for init in part.initializer:
        content = onnx.TensorProto()
        content.CopyFrom(init)
        content.name = ""
        key = hashlib.blake2b(content.SerializeToString()).digest()
        if key in known:
            names[init.name] = known[key]
            continue
        init.name = known[key] = names.get(init.name, prefix + init.name)
        graph.initializer.append(init)
    rename = lambda name: names.get(name, prefix + name) if name else name
    for node in part.node:
        if node.op_type == "Constant" and node.output[0] in constants:
            continue
        rename_node(node, prefix, rename)
        graph.node.append(node)


def rename_node(node, prefix: str, rename) -> None:
    """``node``'s name prefixed, its inputs and outputs renamed by ``rename``, and so every name in
    the subgraphs it holds (an If's branches: the exporter writes one for a squeeze of a dynamic
    axis), whose references to the outer graph follow the outer renaming."""
    node.name = prefix + node.name if node.name else ""  # (unique when given; a nameless node stays nameless)
    for names in (node.input, node.output):
        renamed = [rename(x) for x in names]
        del names[:]
        names.extend(renamed)
    for attr in node.attribute:
        for sub in [attr.g] if attr.type == attr.GRAPH else attr.graphs if attr.type == attr.GRAPHS else []:
            for item in (*sub.input, *sub.output, *sub.value_info, *sub.initializer):
                item.name = rename(item.name)
            for inner in sub.node:
                rename_node(inner, prefix, rename)


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
    set_metadata(model, metadata)
    onnx.save(model, str(path))


def set_metadata(model, metadata: dict) -> None:
    """``metadata`` as the ONNX model's only "kit" entry (``read_metadata`` reads it back)."""
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = "kit", json.dumps(metadata)


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
