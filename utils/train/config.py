"""The fold trainer's options, and the values they may take: a module without torch, so that a
command parses its config and checks it against the data before importing anything heavy (a
profile meant for another dataset is refused in well under a second).

``TrainConfig`` is train.py's (and tune.py's) config. Its augmentations are the data stage's
(``DEFAULT_AUG`` in utils/data/augmentations.py), checked by ``check_aug`` when the config is parsed
and, for the category rules, by ``TrainConfig.check_data`` once the tables are read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from utils.config import CommonConfig, option
from utils.data.augmentations import DEFAULT_AUG, INTERPOLATIONS, RESIZES, check_aug, check_category_aug
from utils.data.schema import CATEGORY
from utils.errors import ConfigError

AMP = ("auto", "bf16", "fp16", "off")
LOSSES = ("ce", "weighted_ce", "focal", "logit_adjusted")
HEADS = ("linear", "mlp", "knn")
BATCH_AUG = ("auto", "on", "off")


@dataclass
class TrainConfig(CommonConfig):
    model: str = option("efficientnet_b0", "any timm model name; configs/<model>.yaml is applied when it exists")
    name: Optional[str] = option(None, "run name under out_dir (default: the model name)")
    fold: str = option("0", "a fold number, or 'all' for every fold in turn")
    n_folds: int = option(5, "K of the multilabel-stratified K-fold (fixed by the first run in out_dir)")
    train_csv: Optional[str] = option(None, "replaces <data_dir>/train.csv, e.g. augment.py's augmented_train.csv")
    # model
    pretrained: bool = option(False, "timm weights from the Hugging Face hub (needs network)")
    pretrained_file: Optional[str] = option(None, "or a local weights file (a timm .pth / .safetensors state dict, an "
                                                  "OpenCLIP file, a lukemelas EfficientNet; utils/train/weights.py)")
    pretrained_resample: bool = option(False, "accept weights that timm resamples to fit (another patch size or "
                                              "position grid); refused by default, naming the tensors")
    dropout: float = option(0.2, "dropout before the heads")
    drop_path_rate: float = option(0.0, "stochastic depth rate of the backbone (where timm supports it)")
    model_kwargs: dict = option(help="more arguments for timm.create_model (e.g. {embed_dim: 64, depth: 2}); "
                                     "stored in the checkpoint", factory=dict)
    keep_head: bool = option(False, "feed the heads the backbone's own pretrained head output (a CLIP tower's "
                                    "image embedding) instead of its pooled features")
    head: str = option("linear", "one linear layer per (category, attribute), one MLP per head "
                                 "(Linear, LayerNorm, ReLU, Dropout 0.1, Linear), or a kNN vote (frozen_backbone only)",
                       choices=HEADS)
    head_hidden: int = option(512, "mlp: hidden width of each head")
    frozen_backbone: bool = option(False, "embed every image once with the backbone, cache the embeddings, and "
                                          "train only the heads on them (see utils/train/frozen.py)")
    frozen_views: int = option(0, "frozen_backbone: augmented views embedded per train image, besides the plain one")
    knn_k: int = option(10, "head knn: neighbours that vote")
    # preprocessing: stored in every checkpoint, and served from there
    img_size: int = option(224, "square input size in pixels")
    resize: str = option("squash", "squash to a square (as the seed), or pad keeping the aspect ratio",
                         choices=RESIZES)
    draft: bool = option(True, "decode JPEGs at a reduced DCT scale when the target size allows (faster)")
    decode_cache: bool = option(True, "decode every image once into <out_dir>/decoded/ before the first fold, and read "
                                      "it from there at every epoch (see utils/data/decoded.py); false: decode on the fly")
    interpolation: str = option("area", "resize interpolation", choices=INTERPOLATIONS)
    batch_aug: str = option("auto", "augment each training batch on the device, gathered from the decode cache "
                                    "(utils/data/batched.py), instead of image by image in the loader workers: on, "
                                    "off, or auto (on CUDA where it measures faster; off on CPU)", choices=BATCH_AUG)
    aug: dict = option(help="online augmentations: {name: {p, params}}; p: 0 switches one off "
                            "(every one and its parameters: DEFAULT_AUG in utils/data/augmentations.py)",
                      factory=lambda: dict(DEFAULT_AUG))
    category_aug: dict = option(help="per-category overrides of aug, {category: {name: {p, params}}} (the seed's "
                                     "category-aware augmentations: configs/visual_taxonomy.yaml)", factory=dict)
    # optimisation
    epochs: int = option(10, "epochs per fold")
    batch_size: int = option(32, "images per optimiser step, over all processes")
    lr_backbone: float = option(3e-4, "AdamW learning rate of the backbone")
    lr_head: float = option(1e-3, "AdamW learning rate of the heads")
    weight_decay: float = option(0.01, "AdamW weight decay (not on norms and biases)")
    warmup_epochs: float = option(1.0, "linear warm-up, then cosine decay")
    layer_decay: Optional[float] = option(None, "layer-wise learning-rate decay of the backbone (e.g. 0.75): each "
                                                "block learns at this times the rate of the block above; off when unset")
    ema_decay: float = option(0.0, "keep an exponential moving average of the weights (e.g. 0.999) and validate, "
                                   "predict and save with it; 0 = off")
    grad_accum: int = option(1, "split each batch into this many chunks whose gradients add up (the same update, "
                                "less memory)")
    freeze_epochs: int = option(0, "gradual unfreezing: train the heads alone for this many epochs")
    clip_grad: float = option(1.0, "gradient norm clipping; 0 = off")
    amp: str = option("auto", "mixed precision; auto = bf16 where a few timed steps of the model ran faster in "
                              "bf16 than in fp32 on this machine (cached per machine; utils/train/precision.py)",
                      choices=AMP)
    # class imbalance
    loss: str = option("ce", "training loss (compared in BENCHMARKS.md)", choices=LOSSES)
    loss_tau: float = option(1.0, "logit_adjusted: strength of the prior shift")
    weight_cap: float = option(10.0, "weighted_ce and the balanced sampler: largest class weight")
    focal_gamma: float = option(2.0, "focal: the focusing exponent")
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy")
    balanced_sampler: bool = option(False, "draw rows in proportion to their rarest label's weight")
    # distillation (utils/train/distill.py)
    teacher: Optional[str] = option(None, "an ensemble.json or a run folder in out_dir: the run becomes its student")
    distill_alpha: float = option(0.5, "the student's loss: alpha * CE(labels) + (1 - alpha) * T^2 * KL(teacher || student)")
    distill_t: float = option(2.0, "the distillation temperature T")
    distill_test: bool = option(True, "the test images join training as unlabelled rows with the teacher's predictions")
    distill_mode: str = option("honest", "honest: student fold k learns only from teacher models, weights and biases "
                                         "that never saw fold k's labels; optimistic: from the teacher's OOF blend, "
                                         "whose scores are then flagged optimistic (utils/train/distill.py)",
                               choices=("honest", "optimistic"))
    # control
    patience: int = option(3, "early stopping after this many epochs without a better val score; 0 = off")
    select: str = option("best", "the epoch whose weights predict (OOF and test logits): best, by the fold's val "
                                 "score (its OOF score is then optimistic by the choice), or last (an honest OOF; "
                                 "no early stopping)",
                         choices=("best", "last"))
    tta_hflip: bool = option(False, "OOF and test logits average the image and its mirror")
    predict_test: bool = option(True, "write test_logits.npz (tune.py turns it off)")
    max_bad_images: float = option(0.01, "stop when a larger share of the train images is unreadable")
    workers: Union[int, str] = option("auto", "data loader worker processes, or auto (see utils/train/throughput.py)")
    channels_last: str = option("auto", "NHWC memory format for model and batches; auto decides per backbone "
                                        "(see utils/train/throughput.py)", choices=("auto", "on", "off"))
    compile: bool = option(False, "torch.compile the training model (see BENCHMARKS.md for where it pays)")
    device: str = option("auto", "auto (CUDA when available), cpu, cuda or cuda:N")
    cudnn_benchmark: bool = option(False, "CUDA: let cuDNN time its kernels for each input shape (can take a minute "
                                          "per fold for depthwise convolutions; see utils/train/throughput.py)")
    resume: bool = option(False, "skip complete folds; continue a fold from its last.pt")
    stop_after: int = option(0, "stop cleanly after this many epochs in this run (then --resume); 0 = never")
    progress: bool = option(True, "progress bars")
    log: str = option("none", "also log the per-epoch history and the config to local files: tensorboard "
                              "(<fold>/tensorboard/) or mlflow (<out_dir>/mlflow.db)", choices=("none", "tensorboard", "mlflow"))

    def __post_init__(self):
        if self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise ConfigError(f"key 'grad_accum' must divide batch_size ({self.batch_size}), got {self.grad_accum}")
        if self.head == "knn" and not self.frozen_backbone:
            raise ConfigError("key 'head': knn votes over cached embeddings; it needs frozen_backbone: true")
        if self.head == "knn" and self.ema_decay:
            raise ConfigError("key 'ema_decay': a kNN head trains nothing to average (its EMA copy would keep an "
                              "empty bank); set ema_decay: 0")
        if self.teacher and self.head == "knn":
            raise ConfigError("key 'teacher': a kNN head has nothing to train; use head linear or mlp for a student")
        check_aug(self.aug)
        for category, rules in self.category_aug.items():
            check_aug(rules, f"category_aug[{category}]")

    def check_data(self, data) -> None:
        """Every value that names something in the data names what ``data`` has: checked right after
        the tables are read, before decoding, model building or weights (a ConfigError)."""
        check_category_aug(self.category_aug, sorted(data.train[CATEGORY].unique()),
                           f"{data.root} (its train.csv)")

    @property
    def run_name(self) -> str:
        return self.name or self.model
