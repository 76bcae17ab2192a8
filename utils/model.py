"""A timm backbone with one linear head per (category, attribute), and the imbalance-aware losses.

``AttributeModel(images, targets=None)`` returns ``{"logits": [B, n_logits]}`` and, with
targets, ``"loss"``: a new head or loss never changes the training loop. Targets are
``[B, n_heads]`` class indices with ``IGNORE_INDEX`` for a missing label or a head outside the
row's category, so a row's loss covers only its own category's given labels.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.io import load_torch
from utils.schema import IGNORE_INDEX, Schema
from utils.transforms import Preprocess

LOSSES = ("ce", "weighted_ce", "focal", "logit_adjusted")


def create_backbone(name: str, pretrained: bool = False, pretrained_file: str | None = None,
                    drop_path_rate: float = 0.0) -> nn.Module:
    """A timm model without its classifier (``num_classes=0``). Pretrained weights come from the
    Hugging Face hub (``pretrained``) or a local file (``pretrained_file``)."""
    import timm

    kwargs = {"num_classes": 0}
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    if pretrained_file:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": pretrained_file},
                                 **kwargs)
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as err:  # network errors surface as many types (OSError, hub errors, ...)
        raise RuntimeError(
            f"could not load pretrained weights for '{name}' from the Hugging Face hub ({type(err).__name__}: "
            f"{err}). The hub may be unreachable from this machine. Either download the weights "
            f"elsewhere and set `pretrained_file: PATH` (a .pth or .safetensors state dict for "
            f"this timm model), or train from scratch with `pretrained: false`.") from err


def data_config(backbone: nn.Module) -> tuple[list[float], list[float]]:
    """Mean and std from the backbone's pretrained config, as timm resolves them."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=backbone)
    return [float(x) for x in cfg["mean"]], [float(x) for x in cfg["std"]]


class AttributeModel(nn.Module):
    def __init__(self, backbone: str, head_widths: list[int], dropout: float = 0.2,
                 pretrained: bool = False, pretrained_file: str | None = None,
                 drop_path_rate: float = 0.0, loss: nn.Module | None = None):
        super().__init__()
        self.backbone = create_backbone(backbone, pretrained, pretrained_file, drop_path_rate)
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleList(nn.Linear(self.backbone.num_features, w) for w in head_widths)
        self.loss = loss
        self.backbone_frozen = False

    def freeze_backbone(self, frozen: bool) -> None:
        """Gradual unfreezing: while frozen, the backbone runs without gradients and with its
        batch-norm statistics fixed, and only the heads learn."""
        self.backbone_frozen = frozen

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.backbone_frozen:
            self.backbone.eval()
        return self

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        if self.backbone_frozen:
            with torch.no_grad():
                features = self.backbone(images)
        else:
            features = self.backbone(images)
        features = self.dropout(features)
        return torch.cat([head(features) for head in self.heads], dim=1)

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> dict:
        logits = self.logits(images)
        out = {"logits": logits}
        if targets is not None and self.loss is not None:
            out["loss"] = self.loss(logits.float(), targets)
        return out


class HeadLoss(nn.Module):
    """Cross-entropy summed over every given label of every head, divided by their number.

    kind:
      ce              plain cross-entropy
      weighted_ce     class weights (n_max / n_c) ** power per head, capped at ``weight_cap``
      focal           focal loss, (1 - p_t) ** gamma down-weights easy examples
      logit_adjusted  Menon et al. (2021): CE on logits + tau * log(prior); at inference the raw
                      logits are used, which shifts decisions toward rare classes (good for macro-F1)
    """

    def __init__(self, schema: Schema, kind: str = "ce", weight_cap: float = 10.0, power: float = 0.5,
                 gamma: float = 2.0, tau: float = 1.0, label_smoothing: float = 0.0):
        super().__init__()
        if kind not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")
        self.kind, self.gamma, self.label_smoothing = kind, gamma, label_smoothing
        self.slices = [h.logits for h in schema.heads]
        for j, h in enumerate(schema.heads):
            counts = torch.tensor(schema.counts[h.name], dtype=torch.float32).clamp(min=1.0)
            weight = torch.as_tensor(schema.class_weights(h.name, power, weight_cap), dtype=torch.float32)
            self.register_buffer(f"weight{j}", weight / (weight * counts).sum() * counts.sum(), persistent=False)
            self.register_buffer(f"shift{j}", tau * torch.log(counts / counts.sum()), persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        total = logits.new_zeros(())
        count = 0
        for j, head in enumerate(self.slices):
            t = targets[:, j]
            given = t != IGNORE_INDEX
            n = int(given.sum())
            if n == 0:
                continue
            z, t = logits[given, head], t[given]
            if self.kind == "logit_adjusted":
                z = z + getattr(self, f"shift{j}")
            # class weights are normalised so that their mean over the train labels is 1
            weight = getattr(self, f"weight{j}") if self.kind == "weighted_ce" else None
            ce = F.cross_entropy(z, t, weight=weight, reduction="none", label_smoothing=self.label_smoothing)
            if self.kind == "focal":
                p_t = torch.exp(-F.cross_entropy(z, t, reduction="none"))
                ce = (1 - p_t) ** self.gamma * ce
            total = total + ce.sum()
            count += n
        return total / max(count, 1)


def build_optimizer(model: AttributeModel, lr_backbone: float, lr_head: float, weight_decay: float):
    """AdamW with separate learning rates for backbone and heads; no decay on norms and biases."""
    groups = []
    for part, lr in ((model.backbone, lr_backbone), (nn.ModuleList([model.heads]), lr_head)):
        decay = [p for p in part.parameters() if p.ndim > 1]
        no_decay = [p for p in part.parameters() if p.ndim <= 1]
        groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay, "base_lr": lr})
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "base_lr": lr})
    return torch.optim.AdamW(groups)


def warmup_cosine(total_steps: int, warmup_steps: int, min_factor: float = 0.01):
    """LambdaLR factor: linear warm-up, then cosine decay to ``min_factor``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def load_checkpoint(path: str | Path, schema: Schema | None = None) -> tuple[AttributeModel, dict]:
    """Rebuild a model from a best.pt alone (weights_only loading); refuse another schema's file.
    Returns (model in eval mode, the checkpoint dict); ``Preprocess.from_dict(ckpt["preprocess"])``
    is how its images must be prepared."""
    ckpt = load_torch(path)
    if schema is not None:
        schema.check_same(Schema.from_dict(ckpt["schema"]), f"checkpoint {path}")
    model = AttributeModel(**ckpt["model_args"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt


def checkpoint_preprocess(ckpt: dict) -> Preprocess:
    return Preprocess.from_dict(ckpt["preprocess"])
