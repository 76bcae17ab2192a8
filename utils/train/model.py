"""A timm backbone with one linear head per (category, attribute), and the imbalance-aware losses.

``AttributeModel(images, targets=None)`` returns ``{"logits": [B, n_logits]}`` and, with
targets, ``"loss"``: a new head or loss never changes the training loop. Targets are
``[B, n_heads]`` class indices with ``IGNORE_INDEX`` for a missing label or a head outside the
row's category, so a row's loss covers only its own category's given labels.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.data.schema import IGNORE_INDEX, Schema
from utils.data.transforms import Preprocess
from utils.errors import DataError
from utils.io import load_torch
from utils.train.config import HEADS, LOSSES
from utils.train.weights import is_lukemelas_efficientnet, lukemelas_to_timm, read_state_dict, state_dict_keys


@contextlib.contextmanager
def _recorded_loads():
    """Record what every ``load_state_dict`` inside the block used: timm's pretrained loader
    drops the checkpoint's classifier and loads non-strictly when the class count differs, so a
    file that does not fit would otherwise load in part, silently."""
    results, original = [], nn.Module.load_state_dict

    def recording(module, state_dict, strict=True, assign=False):
        result = original(module, state_dict, strict=False, assign=assign)
        results.append((sorted(state_dict), result))
        return result

    nn.Module.load_state_dict = recording
    try:
        yield results
    finally:
        nn.Module.load_state_dict = original


RESAMPLERS = {"resample_patch_embed": "patch embedding", "resample_abs_pos_embed": "position embedding",
              "resample_abs_pos_embed_nhwc": "position embedding"}


@contextlib.contextmanager
def _recorded_resamples():
    """Record every resampling timm's checkpoint filters do inside the block (a patch-8 ViT's weights
    resized into a patch-16 model, a position embedding to another grid): (tensor, shape before,
    shape after). timm does it silently; the caller decides whether it was asked for. A call that
    gives back what it was given (some converters call the resamplers whatever the sizes) resampled
    nothing and is not recorded; one that changes the values at the same shape (a grid of the same
    number of tokens in another layout) is."""
    import sys

    import timm  # noqa: F401  (its model modules, whose filters call the resamplers, are loaded with it)

    calls, patched = [], []

    def recording(fn, what):
        def resample(tensor, *args, **kwargs):
            out = fn(tensor, *args, **kwargs)
            if out is not tensor and (out.shape != tensor.shape or not torch.equal(out, tensor)):
                calls.append((what, tuple(tensor.shape), tuple(out.shape)))
            return out
        return resample

    for module in [m for n, m in list(sys.modules.items()) if n.startswith("timm") and m is not None]:
        for name, what in RESAMPLERS.items():
            fn = getattr(module, name, None)
            if callable(fn):
                patched.append((module, name, fn))
                setattr(module, name, recording(fn, what))
    try:
        yield calls
    finally:
        for module, name, fn in patched:
            setattr(module, name, fn)


def _refuse_resamples(calls: list, source: str, name: str) -> None:
    if calls:
        shapes = "; ".join(f"{what} {list(a)} -> {list(b)}" for what, a, b in calls)
        raise DataError(f"{source} would be resampled to fit {name}: {shapes}. The weights were made for another "
                        f"patch size or image size: choose the model and img_size they were made for, or set "
                        f"pretrained_resample: true to accept the resampled weights")


def _create(name: str, **kwargs) -> nn.Module:
    """timm.create_model, with ``img_size`` passed only to architectures that take it (a ViT's
    position embedding is sized for it; a CNN has no such argument)."""
    import timm

    try:
        return timm.create_model(name, **kwargs)
    except TypeError as err:
        if "img_size" not in kwargs or "img_size" not in str(err):
            raise
        return timm.create_model(name, **{k: v for k, v in kwargs.items() if k != "img_size"})


def load_from_file(name: str, path: str, resample: bool = False, **kwargs) -> nn.Module:
    """A timm model with weights from a local file: a lukemelas EfficientNet-PyTorch checkpoint
    converted by ``utils/train/weights.py``, anything else through timm's own pretrained loading, which
    converts other layouts to timm's (an OpenCLIP ``open_clip_pytorch_model.bin`` with keys
    ``visual.*``, for one). A file that does not fit the model, in either direction, is an error
    naming the keys."""
    if not Path(path).is_file():
        raise DataError(f"pretrained_file {path}: file not found")
    if is_lukemelas_efficientnet(state_dict_keys(path)):
        model = _create(name, pretrained=False, **kwargs)
        model.load_state_dict(lukemelas_to_timm(read_state_dict(path), model, path))  # strict: every key was checked
        return model
    overlay = {"file": str(path)}
    if kwargs.get("num_classes"):  # a head of another size than the pretrained config's is kept: it is in the file
        overlay["num_classes"] = kwargs["num_classes"]
    with _recorded_loads() as loads, _recorded_resamples() as resamples:
        try:
            model = _create(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        except RuntimeError as err:  # a shape mismatch, or a file timm cannot read
            raise DataError(f"pretrained_file {path} does not fit {name}: {' '.join(str(err).split())[:600]}") from None
    if not resample:
        _refuse_resamples(resamples, f"pretrained_file {path}", name)
    if not loads:
        raise DataError(f"pretrained_file {path}: timm loaded nothing from it for {name}")
    _, result = loads[-1]
    if result.missing_keys or result.unexpected_keys:
        raise DataError(f"pretrained_file {path} does not fit {name}: {len(result.missing_keys)} missing key(s) "
                        f"{result.missing_keys[:8]}, {len(result.unexpected_keys)} unexpected key(s) "
                        f"{result.unexpected_keys[:8]}")
    return model


def create_backbone(name: str, pretrained: bool = False, pretrained_file: str | None = None,
                    drop_path_rate: float = 0.0, img_size: int | None = None, keep_head: bool = False,
                    model_kwargs: dict | None = None, pretrained_resample: bool = False) -> nn.Module:
    """A timm model whose output feeds the attribute heads: its pooled features (``num_classes=0``)
    or, with ``keep_head``, its own pretrained head's output (a CLIP image tower's projection, the
    embedding the winning entries put their heads on). Weights from the Hugging Face hub
    (``pretrained``) or a local file (``pretrained_file``); ``model_kwargs`` go to timm as they are.
    Weights that timm would resample to fit (another patch size or position grid) are refused, naming
    the tensors and shapes, unless ``pretrained_resample``."""
    kwargs = {**({} if keep_head else {"num_classes": 0}), **(model_kwargs or {})}
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    if img_size:
        kwargs["img_size"] = img_size
    if pretrained_file:
        return load_from_file(name, pretrained_file, pretrained_resample, **kwargs)
    if not pretrained:
        return _create(name, pretrained=False, **kwargs)
    try:
        with _recorded_resamples() as resamples:
            model = _create(name, pretrained=True, **kwargs)
    except Exception as err:  # network errors surface as many types (OSError, hub errors, ...)
        raise RuntimeError(
            f"could not load pretrained weights for '{name}' from the Hugging Face hub ({type(err).__name__}: "
            f"{err}). The hub may be unreachable from this machine. Either download the weights "
            f"elsewhere and set `pretrained_file: PATH` (a .pth or .safetensors state dict for "
            f"this timm model, or an OpenCLIP open_clip_pytorch_model.bin), or train from scratch with "
            f"`pretrained: false`.") from err
    if not pretrained_resample:
        _refuse_resamples(resamples, f"the hub's weights for {name}", name)
    return model


def feature_width(backbone: nn.Module) -> int:
    """The width of what a timm model returns with ``num_classes=0``: its pre-logits features,
    ``head_hidden_size`` where a head layer sits after the pooling (MobileNetV3: 1280, not its
    960 ``num_features``)."""
    return getattr(backbone, "head_hidden_size", None) or backbone.num_features


class MLPHeads(nn.Module):
    """One MLP per (category, attribute) head, Linear(F, hidden) -> LayerNorm -> ReLU -> Dropout ->
    Linear(hidden, width), as the winning entries used; computed for all heads at once (one matmul
    per layer, the second one block-diagonal), and exactly equal to 42 separate MLPs."""

    def __init__(self, in_features: int, widths: list[int], hidden: int = 512, dropout: float = 0.1):
        super().__init__()
        n, wmax = len(widths), max(widths)
        self.n, self.hidden = n, hidden
        self.fc1 = nn.Linear(in_features, n * hidden)
        self.norm_weight = nn.Parameter(torch.ones(n, hidden))
        self.norm_bias = nn.Parameter(torch.zeros(n, hidden))
        self.drop = nn.Dropout(dropout)
        bound = 1 / math.sqrt(hidden)  # nn.Linear's initialisation, per head
        self.fc2_weight = nn.Parameter(torch.empty(n, hidden, wmax).uniform_(-bound, bound))
        self.fc2_bias = nn.Parameter(torch.empty(n, wmax).uniform_(-bound, bound))
        mask = torch.zeros(n, wmax, dtype=torch.bool)
        for j, w in enumerate(widths):
            mask[j, :w] = True
        self.register_buffer("columns", mask.flatten().nonzero().squeeze(1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x).view(-1, self.n, self.hidden)
        h = F.layer_norm(h, (self.hidden,)) * self.norm_weight + self.norm_bias
        h = self.drop(torch.relu(h))
        out = torch.einsum("bhk,hkw->bhw", h, self.fc2_weight) + self.fc2_bias
        return out.flatten(1).index_select(1, self.columns)


def data_config(backbone: nn.Module) -> tuple[list[float], list[float]]:
    """Mean and std from the backbone's pretrained config, as timm resolves them."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=backbone)
    return [float(x) for x in cfg["mean"]], [float(x) for x in cfg["std"]]


class KNNHeads(nn.Module):
    """A k-nearest-neighbour vote over a bank of embeddings (the frozen route's ``head: knn``, the
    no-training baseline that scored 0.778 with frozen CLIP ViT-L/14 features). A head's logits are
    the log of its classes' votes among the k bank rows nearest by cosine similarity, each
    neighbour voting for its own label of that head (none when missing), plus a tenth of a vote
    spread by the train prior, which breaks ties and fills heads no neighbour labels (and 1e-4, so
    that a class the bank lacks has a finite logit). The bank
    is a buffer: the checkpoint and the ONNX export carry it."""

    def __init__(self, in_features: int, bank_size: int, n_logits: int, k: int = 10):
        super().__init__()
        self.k_asked, self.k = k, min(k, bank_size)
        self.register_buffer("bank", torch.zeros(bank_size, in_features))  # L2-normalised embeddings
        self.register_buffer("votes", torch.zeros(bank_size, n_logits))  # each row's labels, one-hot per head
        self.register_buffer("prior", torch.zeros(n_logits))  # per head, class shares in the bank

    def fill(self, embeddings: torch.Tensor, onehot: torch.Tensor, prior: torch.Tensor) -> None:
        """The bank's rows, however many (the buffers take their size)."""
        device = self.bank.device
        self.bank = F.normalize(embeddings.float(), dim=1).to(device)
        self.votes = onehot.float().to(device)
        self.prior.copy_(prior)
        self.k = min(self.k_asked, len(self.bank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nearest = (F.normalize(x.float(), dim=1) @ self.bank.T).topk(self.k, dim=1).indices
        return torch.log(self.votes[nearest].sum(1) + 0.1 * self.prior + 1e-4)  # finite: a class the bank lacks


class AttributeModel(nn.Module):
    """A timm backbone, dropout, and the attribute heads (``head``: one linear layer per head, or
    one MLP per head) laid out in one flat logits vector."""

    def __init__(self, backbone: str, head_widths: list[int], dropout: float = 0.2,
                 pretrained: bool = False, pretrained_file: str | None = None,
                 drop_path_rate: float = 0.0, loss: nn.Module | None = None, img_size: int | None = None,
                 keep_head: bool = False, head: str = "linear", head_hidden: int = 512, knn_bank: int = 0,
                 knn_k: int = 10, model_kwargs: dict | None = None, pretrained_resample: bool = False):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        self.backbone = create_backbone(backbone, pretrained, pretrained_file, drop_path_rate, img_size, keep_head,
                                        model_kwargs, pretrained_resample)
        features = self.backbone.num_classes if keep_head else feature_width(self.backbone)
        self.dropout = nn.Dropout(dropout)
        if head == "mlp":
            self.heads = MLPHeads(features, head_widths, head_hidden)
        elif head == "knn":
            self.heads = KNNHeads(features, knn_bank, sum(head_widths), knn_k)
        else:
            self.heads = nn.ModuleList(nn.Linear(features, w) for w in head_widths)
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
        return self.head_logits(features)

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The heads on backbone features (the frozen route trains them on cached features)."""
        features = self.dropout(features)
        if isinstance(self.heads, (MLPHeads, KNNHeads)):
            return self.heads(features)
        return torch.cat([head(features) for head in self.heads], dim=1)

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None, normaliser: int | None = None) -> dict:
        """{"logits"} and, with targets, {"loss"}: the loss summed over the given labels, divided by
        ``normaliser`` (default: their number in this batch)."""
        logits = self.logits(images)
        out = {"logits": logits}
        if targets is not None and self.loss is not None:
            out["loss"] = self.loss(logits.float(), targets, normaliser)
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
        weights, shifts, member = [], [], torch.zeros(schema.n_logits, len(schema.heads))
        for j, h in enumerate(schema.heads):
            counts = torch.tensor(schema.counts[h.name], dtype=torch.float32).clamp(min=1.0)
            weight = torch.as_tensor(schema.class_weights(h.name, power, weight_cap), dtype=torch.float32)
            weights.append(weight / (weight * counts).sum() * counts.sum())  # mean 1 over the train labels
            shifts.append(tau * torch.log(counts / counts.sum()))
            member[h.logits, j] = 1.0 / h.width
        self.register_buffer("weight", torch.cat(weights), persistent=False)  # per logit
        self.register_buffer("shift", torch.cat(shifts), persistent=False)
        self.register_buffer("offsets", torch.tensor([h.offset for h in schema.heads]), persistent=False)
        self.register_buffer("head_mean", member, persistent=False)  # [L, H]: the mean over each head's classes

    def normaliser(self, targets: torch.Tensor) -> int:
        """The number of given labels: what a batch's summed loss is divided by."""
        return int((targets != IGNORE_INDEX).sum())

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, normaliser: int | None = None) -> torch.Tensor:
        """Every head at once: one log-softmax per head's slice, one gather of the targets'
        log-probabilities; the same values as F.cross_entropy per head (tests/test_train.py)."""
        if self.kind == "logit_adjusted":
            logits = logits + self.shift
        log_p = torch.cat([F.log_softmax(logits[:, head], dim=1) for head in self.slices], dim=1)
        given = targets != IGNORE_INDEX
        index = self.offsets + targets.clamp(min=0)
        log_p_t = log_p.gather(1, index)
        weight = self.weight.gather(0, index.flatten()).view_as(index) if self.kind == "weighted_ce" else 1.0
        loss = -log_p_t * weight
        if self.label_smoothing:
            w_all = self.weight if self.kind == "weighted_ce" else torch.ones_like(self.weight)
            smooth = -(log_p * w_all) @ self.head_mean  # [B, H]: each head's mean over its classes
            loss = (1 - self.label_smoothing) * loss + self.label_smoothing * smooth
        if self.kind == "focal":
            loss = (1 - log_p_t.exp()) ** self.gamma * loss
        count = int(given.sum()) if normaliser is None else normaliser
        return (loss * given).sum() / max(count, 1)


def _no_decay(name: str, p: torch.Tensor) -> bool:
    """Norms, biases, scalars and the MLP heads' per-head LayerNorm parameters take no weight decay."""
    return p.ndim <= 1 or name.endswith("bias") or "norm" in name


def build_optimizer(model: AttributeModel, lr_backbone: float, lr_head: float, weight_decay: float,
                    layer_decay: float | None = None):
    """AdamW with separate learning rates for backbone and heads, no decay on norms and biases.
    With ``layer_decay``, timm's layer-wise groups: the backbone's last block learns at
    ``lr_backbone``, each block below at ``layer_decay`` times the one above (the usual recipe for
    fine-tuning large pretrained ViTs). Every group names its ``role`` (backbone or head)."""
    groups = []
    if layer_decay:
        from timm.optim import param_groups_layer_decay

        skip = model.backbone.no_weight_decay() if hasattr(model.backbone, "no_weight_decay") else ()
        for g in param_groups_layer_decay(model.backbone, weight_decay, no_weight_decay_list=skip,
                                          layer_decay=layer_decay):
            groups.append({"params": g["params"], "lr": lr_backbone * g.get("lr_scale", 1.0),
                           "weight_decay": g["weight_decay"], "role": "backbone"})
        parts = [(model.heads, lr_head, "head")]
    else:
        parts = [(model.backbone, lr_backbone, "backbone"), (model.heads, lr_head, "head")]
    for part, lr, role in parts:
        named = list(part.named_parameters())
        groups.append({"params": [p for n, p in named if not _no_decay(n, p)], "lr": lr,
                       "weight_decay": weight_decay, "role": role})
        groups.append({"params": [p for n, p in named if _no_decay(n, p)], "lr": lr, "weight_decay": 0.0,
                       "role": role})
    return torch.optim.AdamW([g for g in groups if g["params"]])


def group_lrs(optimizer) -> dict:
    """The current learning rate of the backbone (its highest, under layer decay) and of the heads."""
    lrs = {}
    for g in optimizer.param_groups:
        lrs[g["role"]] = max(lrs.get(g["role"], 0.0), g["lr"])
    return lrs


class WarmupCosine:
    """LambdaLR factor: linear warm-up, then cosine decay to ``min_factor`` at ``total`` steps.

    An object rather than a closure, so that LambdaLR's state_dict carries it into last.pt. A fold
    resumed with another number of epochs continues its schedule smoothly (``retarget``): from the
    step it stopped at, the factor decays from where it was to ``min_factor`` at the new end,
    instead of jumping to the new schedule's value at that step."""

    def __init__(self, total: int, warmup: int, min_factor: float = 0.01):
        self.total, self.warmup, self.min_factor = int(total), int(warmup), float(min_factor)
        self.start, self.start_factor = 0, 1.0  # the cosine runs from step ``start`` at ``start_factor``

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / max(1, self.warmup)
        begin = max(self.warmup, self.start)
        progress = (step - begin) / max(1, self.total - begin)
        return self.min_factor + (self.start_factor - self.min_factor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def retarget(self, step: int, total: int) -> None:
        """End at ``total`` steps instead, going on from ``step`` without a jump."""
        if step >= self.warmup:
            self.start, self.start_factor = int(step), self(step)
        self.total = int(total)


def retarget(scheduler, totals: list[int]) -> tuple[int, int] | None:
    """Each group's ``WarmupCosine`` of ``scheduler`` ends at its step in ``totals`` instead, going on
    from the scheduler's step without a jump (groups may share one schedule: retargeted once).
    Returns (old, new) total of the first schedule changed, or None."""
    changed = None
    for schedule, total in zip(scheduler.lr_lambdas, totals):
        if schedule.total != total:
            changed = changed or (schedule.total, int(total))
            schedule.retarget(scheduler.last_epoch, total)
    return changed


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


def trained_with_tta(ckpt: dict) -> bool:
    """Whether a checkpoint's run scored its OOF and test logits with the mirror averaged in."""
    return bool(ckpt.get("config", {}).get("tta_hflip", False))
