"""The batched path of training's input: a batch gathered from the decode cache in one copy, then
augmented per batch on the step's device (a GPU, or CPU tensors) rather than image by image in the
loader workers.

The per-image path (``utils/data/transforms.py``) spends a loader worker's Python and OpenCV on
every image: a few hundred images per second per core at 224 px, less than a small backbone trains
at on a GPU (BENCHMARKS.md, "Training throughput on a GPU"). Here a worker's whole work for a batch
is one gather from the memory-mapped cache (``DecodedImages.gather``), and ``BatchAugment`` applies,
per batch, on the device:

  geometry  neckline_crop, random_resized_crop, hflip, rotate, shear and perspective composed into
            one projective map per image, after distort's piecewise-linear grid, and applied by one
            batched bilinear resampling (``grid_sample``; borders reflected, as the per-image
            rotate and shear reflect them)
  colour    color_jitter: brightness, contrast, saturation and hue, in a random order per image
  filter    sharpen_blur: a sharpening 3 x 3 kernel or a Gaussian blur, one grouped convolution
  noise     gauss_noise
  erasing   coarse_dropout

each with the per-image path's parameters and drawn from its distributions (albumentations' own
sampling, rewritten for tensors; tests/test_batched.py compares the two over many draws). The
category-aware rules batch as they are: each image draws from its own category's settings.
``augmix`` exists per image only: a run that switches it on (in ``aug`` or in a category's rules)
trains on the per-image path, and says so (``per_image_only``).
"""
from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F

from utils.data.augmentations import DEFAULT_AUG, merge_aug

PER_IMAGE_ONLY = ("augmix",)
DISTORT_STEPS = 5  # albumentations GridDistortion's num_steps, as the per-image path builds it
BLUR_TAPS = 9  # the widest Gaussian kernel of sigma <= 1.2 (int(3.5 sigma) * 2 + 1)
GRAY = (0.299, 0.587, 0.114)  # OpenCV's RGB -> grey weights, as albumentations' contrast and saturation use


def per_image_only(aug: dict | None, category_aug: dict | None, resize: str = "squash") -> list[str]:
    """The switched-on augmentations that the batched path cannot apply (empty: it can run)."""
    settings = _settings(aug, category_aug, list(category_aug or {}))
    found = [name for name in PER_IMAGE_ONLY if any(s[name]["p"] > 0 for s in settings)]
    if resize == "pad" and any(s["neckline_crop"]["p"] > 0 for s in settings):
        found.append("neckline_crop with resize: pad (letterboxed per image)")
    return found


def _settings(aug: dict | None, category_aug: dict | None, categories: list[str]) -> list[dict]:
    """Every category's merged settings, then the default's (for a category without rules)."""
    base = merge_aug(DEFAULT_AUG, aug or {})
    return [merge_aug(base, (category_aug or {}).get(c, {})) for c in categories] + [base]


def batch_seed(augment_seed: int, epoch: int, rows) -> int:
    """The seed of one batch's augmentation, from the run's seed, the epoch and the batch's rows:
    the same batch is augmented alike in a resumed run and whatever the loader workers."""
    return int(np.random.SeedSequence([augment_seed, epoch, *map(int, rows)]).generate_state(1, np.uint64)[0])


class BatchAugment:
    """``(pixels uint8 [B, 3, S, S] on a device, categories, seed) -> uint8 [B, 3, S, S]``: the
    training augmentations of ``aug`` and ``category_aug`` applied per batch (see above)."""

    def __init__(self, img_size: int, aug: dict | None = None, category_aug: dict | None = None,
                 categories: list[str] | None = None):
        unbatchable = per_image_only(aug, category_aug)
        if unbatchable:
            raise ValueError(f"the batched path cannot apply {', '.join(unbatchable)}; use the per-image path")
        self.size = img_size
        self.categories = list(categories or [])
        self.code = {c: k for k, c in enumerate(self.categories)}  # an unknown category takes the default row
        settings = _settings(aug, category_aug, self.categories)
        self.max_holes = max(int(s["coarse_dropout"]["holes"][1]) for s in settings)
        self.table = {name: self._columns([s[name] for s in settings])
                      for name in DEFAULT_AUG if name not in PER_IMAGE_ONLY}
        self._on_device: dict = {}

    @staticmethod
    def _columns(rows: list[dict]) -> dict:
        """One augmentation's settings per category as float64 tensors: [C] for a number, [C, 2] for a range."""
        return {key: torch.tensor([r[key] for r in rows], dtype=torch.float64) for key in rows[0]}

    def _params(self, device: torch.device) -> dict:
        if device not in self._on_device:
            self._on_device[device] = {n: {k: v.to(device) for k, v in cols.items()} for n, cols in self.table.items()}
        return self._on_device[device]

    def __call__(self, pixels: torch.Tensor, categories, seed: int) -> torch.Tensor:
        if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[1] != 3:
            raise TypeError(f"BatchAugment takes uint8 pixels [B, 3, S, S], got {pixels.dtype} {tuple(pixels.shape)}")
        device, n = pixels.device, len(pixels)
        g = torch.Generator(device=device).manual_seed(seed)
        codes = torch.tensor([self.code.get(c, len(self.categories)) for c in categories], device=device)
        p = {name: {k: v[codes] for k, v in cols.items()} for name, cols in self._params(device).items()}
        draw = Draw(g, n, device)
        x = pixels.float()
        x = resample(x, geometry(p, draw, self.size), *distortion(p["distort"], draw, self.size))
        x = color_jitter(x, p["color_jitter"], draw)
        x = sharpen_blur(x, p["sharpen_blur"], draw)
        x = gauss_noise(x, p["gauss_noise"], draw)
        x = coarse_dropout(x, p["coarse_dropout"], draw, self.max_holes)
        return x.round_().clamp_(0, 255).to(torch.uint8)


class Draw:
    """Random numbers for a batch of ``n`` images from one generator, on the batch's device: each
    call draws a fresh [n, *shape] tensor (float64, so that the ranges are exact)."""

    def __init__(self, g: torch.Generator, n: int, device: torch.device):
        self.g, self.n, self.device = g, n, device

    def uniform(self, lo, hi, *shape) -> torch.Tensor:
        """Uniform in [lo, hi) (numbers, or one per image), [n, *shape]."""
        u = torch.rand(self.n, *shape, generator=self.g, device=self.device, dtype=torch.float64)
        per_image = lambda v: torch.as_tensor(v, dtype=torch.float64, device=self.device).expand(self.n)
        lo, hi = (per_image(v).reshape(-1, *[1] * len(shape)) for v in (lo, hi))
        return lo + u * (hi - lo)

    def chance(self, p) -> torch.Tensor:
        """True with probability ``p`` (per image)."""
        return torch.rand(self.n, generator=self.g, device=self.device, dtype=torch.float64) < p

    def normal(self, *shape, dtype=torch.float64) -> torch.Tensor:
        return torch.randn(self.n, *shape, generator=self.g, device=self.device, dtype=dtype)

    def integers(self, lo, hi) -> torch.Tensor:
        """Integers uniform in [lo, hi] (inclusive, per image)."""
        return torch.floor(self.uniform(lo, hi + 1)).clamp_(max=hi).long()


# ----------------------------------------------------------------------------- geometry

def _eye(n: int, device) -> torch.Tensor:
    return torch.eye(3, dtype=torch.float64, device=device).expand(n, 3, 3).clone()


def _where(on: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``m`` where ``on``, else the identity."""
    return torch.where(on.view(-1, 1, 1), m, _eye(len(m), m.device))


def geometry(p: dict, draw: Draw, size: int) -> torch.Tensor:
    """Each image's map from its output pixel coordinates to the source's (float64 [B, 3, 3]): the
    geometric transforms in the per-image path's order, composed. Coordinates are pixel edges
    (0 to S), as OpenCV's resize and ``grid_sample(align_corners=False)`` take them."""
    n, dev, S = draw.n, draw.device, float(size)
    maps = []
    # neckline_crop: rows y0..y1 of the full width, sized back to S x S
    c = p["neckline_crop"]
    on = draw.chance(c["p"])
    y0 = torch.floor(S * draw.uniform(c["top"][:, 0], c["top"][:, 1]))
    rows = torch.floor(S * draw.uniform(c["height"][:, 0], c["height"][:, 1])).clamp(min=1)
    y1 = torch.minimum(torch.full_like(y0, S), y0 + rows)
    m = _eye(n, dev)
    m[:, 1, 1], m[:, 1, 2] = (y1 - y0) / S, y0
    maps.append(_where(on, m))
    # random_resized_crop: albumentations' ten tries of (area, log aspect ratio), then its centre crop
    c = p["random_resized_crop"]
    on = draw.chance(c["p"])
    area = draw.uniform(S * S * c["scale"][:, 0], S * S * c["scale"][:, 1], 10)
    ratio = torch.exp(draw.uniform(torch.log(c["ratio"][:, 0]), torch.log(c["ratio"][:, 1]), 10))
    w, h = torch.round(torch.sqrt(area * ratio)), torch.round(torch.sqrt(area / ratio))
    fits = (w > 0) & (w <= S) & (h > 0) & (h <= S)
    first = fits.float().argmax(1, keepdim=True)
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(1)
    hs, ws = draw.uniform(0.0, 1.0), draw.uniform(0.0, 1.0)
    y, x = torch.floor((S - h + 1) * hs), torch.floor((S - w + 1) * ws)
    lo, hi = c["ratio"][:, 0], c["ratio"][:, 1]  # the fallback for a square input
    fw = torch.where(1 > hi, torch.round(S * hi), torch.full_like(hi, S))
    fh = torch.where(1 < lo, torch.round(S / lo), torch.full_like(lo, S))
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    x, y = torch.where(found, x, torch.floor((S - w) / 2)), torch.where(found, y, torch.floor((S - h) / 2))
    m = _eye(n, dev)
    m[:, 0, 0], m[:, 0, 2], m[:, 1, 1], m[:, 1, 2] = w / S, x, h / S, y
    maps.append(_where(on, m))
    # hflip
    m = _eye(n, dev)
    m[:, 0, 0], m[:, 0, 2] = -1.0, S
    maps.append(_where(draw.chance(p["hflip"]["p"]), m))
    # rotate and shear (albumentations' Affine about the centre; shear draws x and y alike)
    centre, back = _eye(n, dev), _eye(n, dev)
    centre[:, :2, 2], back[:, :2, 2] = -S / 2, S / 2
    c = p["rotate"]
    on = draw.chance(c["p"])
    a = torch.deg2rad(draw.uniform(-c["degrees"], c["degrees"]))
    m = _eye(n, dev)
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = torch.cos(a), -torch.sin(a), torch.sin(a), torch.cos(a)
    maps.append(_where(on, torch.linalg.inv(back @ m @ centre)))
    c = p["shear"]
    on = draw.chance(c["p"])
    sx, sy = (torch.tan(torch.deg2rad(draw.uniform(-c["degrees"], c["degrees"]))) for _ in range(2))
    m = _eye(n, dev)
    m[:, 0, 1], m[:, 1, 0] = sx, sy
    maps.append(_where(on, torch.linalg.inv(back @ m @ centre)))
    # perspective: a quadrilateral whose corners are the input's, each moved inwards by |N(0, scale)|
    # (mod 0.32) of the side, mapped onto the whole output; as albumentations 2.0 keeps the size, the
    # output is then enlarged by S / (the quadrilateral's longest width and height, whole pixels),
    # so it shows the quadrilateral's top-left part
    c = p["perspective"]
    on = draw.chance(c["p"])
    scale = draw.uniform(c["scale"][:, 0], c["scale"][:, 1])
    jitter = torch.remainder((draw.normal(4, 2) * scale.view(-1, 1, 1)).abs(), 0.32)
    corners = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], dtype=torch.float64, device=dev)
    quad = (corners + (1 - 2 * corners) * jitter) * S  # tl, tr, br, bl
    side = lambda a, b: (quad[:, a] - quad[:, b]).norm(dim=1)
    m = _eye(n, dev)
    m[:, 0, 0] = torch.floor(torch.maximum(side(1, 0), side(2, 3))) / S
    m[:, 1, 1] = torch.floor(torch.maximum(side(2, 1), side(3, 0))) / S
    maps.append(_where(on, homography(corners * S, quad) @ m))
    total = maps[0]
    for m in maps[1:]:
        total = total @ m
    return total


def homography(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """The projective maps taking the 4 points ``src`` ([4, 2], shared) to ``dst`` ([B, 4, 2])."""
    n = len(dst)
    x, y = src[:, 0].expand(n, 4), src[:, 1].expand(n, 4)
    u, v = dst[..., 0], dst[..., 1]
    zero, one = torch.zeros_like(u), torch.ones_like(u)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -x * u, -y * u], -1)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -x * v, -y * v], -1)
    a = torch.cat([rows_u, rows_v], 1)
    h = torch.linalg.solve(a, torch.cat([u, v], 1))
    return torch.cat([h, torch.ones_like(h[:, :1])], 1).view(n, 3, 3)


def distortion(c: dict, draw: Draw, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """distort (albumentations' GridDistortion, normalised): where each output column and row is
    taken from, as pixel-centre coordinates ([B, S] each; the centres themselves where it is off).
    Each axis is cut into DISTORT_STEPS cells (and a remainder), each cell stretched by
    1 + U(-limit, limit), the stretches scaled to span the image, and a cell's pixels spread
    evenly over its stretched span."""
    on = draw.chance(c["p"])
    step = size // DISTORT_STEPS
    k = torch.arange(size, device=draw.device) // step
    k = k.clamp(max=DISTORT_STEPS)
    start = k * step
    length = (torch.minimum(start + step, torch.tensor(size, device=draw.device)) - start).double()
    offset = (torch.arange(size, device=draw.device) - start).double() / (length - 1).clamp(min=1)
    last = (min(size, (DISTORT_STEPS + 1) * step) - DISTORT_STEPS * step) / step
    centres = torch.arange(size, dtype=torch.float64, device=draw.device)
    axes = []
    for _ in range(2):
        stretch = 1 + draw.uniform(-c["limit"], c["limit"], DISTORT_STEPS + 1)
        stretch[:, -1] *= last
        stretch = stretch * (size / step) / stretch.sum(1, keepdim=True)
        ends = torch.cumsum(step * stretch, 1)
        begins = ends - step * stretch
        taken = begins[:, k] + (ends[:, k] - begins[:, k]) * offset
        axes.append(torch.where(on.view(-1, 1), taken, centres) + 0.5)
    return axes[0], axes[1]


def resample(x: torch.Tensor, maps: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """``x`` [B, 3, S, S] float, each image sampled (bilinear, reflected borders) at the points
    (``xs`` [B, S] of its columns, ``ys`` [B, S] of its rows) mapped by ``maps`` to source coordinates."""
    s = x.shape[-1]
    m, xs, ys = maps.to(x.dtype), xs.to(x.dtype)[:, None, :], ys.to(x.dtype)[:, :, None]
    mapped = lambda k: m[:, k, 0, None, None] * xs + m[:, k, 1, None, None] * ys + m[:, k, 2, None, None]  # [B, S, S]
    w = mapped(2)
    grid = torch.stack([mapped(0) / w, mapped(1) / w], -1) * (2 / s) - 1
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


# ----------------------------------------------------------------------------- colour, noise, erasing

def _gray(x: torch.Tensor) -> torch.Tensor:
    return x[:, 0] * GRAY[0] + x[:, 1] * GRAY[1] + x[:, 2] * GRAY[2]


def _per_image(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x.dtype).view(-1, 1, 1, 1)


def brightness(x, f):
    return x * _per_image(f, x)


def contrast(x, f):
    f = _per_image(f, x)
    return x * f + _gray(x).mean((1, 2)).view(-1, 1, 1, 1) * (1 - f)


def saturation(x, f):
    f = _per_image(f, x)
    return x * f + _gray(x).unsqueeze(1) * (1 - f)


def hue(x, f):
    """Hue turned by ``f`` of a full turn (albumentations: ``180 f`` of OpenCV's 180 hue steps):
    to HSV, then back by the closed form of HSV -> RGB."""
    r, g, b = x.unbind(1)
    v, _ = x.max(1)
    chroma = v - x.min(1)[0]
    safe = torch.where(chroma == 0, torch.ones_like(chroma), chroma)
    h = torch.where(v == r, (g - b) / safe, torch.where(v == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h = torch.remainder(h + 6 * f.to(x.dtype).view(-1, 1, 1), 6.0).unsqueeze(1)  # sextants, [B, 1, H, W]
    k = torch.remainder(torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1) + h, 6.0)
    return v.unsqueeze(1) - chroma.unsqueeze(1) * torch.minimum(k, 4 - k).clamp_(0, 1)


COLOR_OPS = (brightness, contrast, saturation, hue)


def color_jitter(x: torch.Tensor, c: dict, draw: Draw) -> torch.Tensor:
    """albumentations' ColorJitter: factors from [1 - v, 1 + v] (hue: [-v, v]), applied in a random
    order per image, each result clipped to [0, 255]."""
    on = draw.chance(c["p"])
    factors = [draw.uniform((1 - c[k]).clamp(min=0), 1 + c[k]) for k in ("brightness", "contrast", "saturation")]
    factors.append(draw.uniform(-c["hue"], c["hue"]))
    order = torch.argsort(torch.rand(draw.n, 4, generator=draw.g, device=draw.device), 1)
    for position in range(4):
        for k, op in enumerate(COLOR_OPS):
            rows = (on & (order[:, position] == k)).nonzero()[:, 0]
            if len(rows):
                x[rows] = op(x[rows], factors[k][rows]).clamp_(0, 255)
    return x


def sharpen_blur(x: torch.Tensor, c: dict, draw: Draw) -> torch.Tensor:
    """albumentations' OneOf(Sharpen, GaussianBlur(sigma 0.3-1.2)), as the per-image path builds it:
    with probability p, one of the two, each as likely. Sharpen: the 3 x 3 kernel
    (1 - a) identity + a [[-1, -1, -1], [-1, 8 + l, -1], [-1, -1, -1]], a from U(0.2, 0.5), l from
    U(0.5, 1); blur: a Gaussian of sigma U(0.3, 1.2) over int(3.5 sigma) * 2 + 1 taps. One grouped
    convolution of every image with its own kernel, borders reflected, as OpenCV's filters."""
    on = draw.chance(c["p"])
    sharpen = draw.chance(0.5)
    a, lightness, sigma = draw.uniform(0.2, 0.5), draw.uniform(0.5, 1.0), draw.uniform(0.3, 1.2)
    rows = on.nonzero()[:, 0]
    if not len(rows):
        return x
    r = BLUR_TAPS // 2
    taps = torch.arange(-r, r + 1, dtype=torch.float64, device=x.device)
    radius = torch.floor(sigma * 3.5).view(-1, 1)  # taps beyond it are not in the kernel
    gauss = torch.exp(-(taps ** 2) / (2 * sigma.view(-1, 1) ** 2)) * (taps.abs() <= radius)
    gauss = gauss / gauss.sum(1, keepdim=True)
    blur = gauss.unsqueeze(2) * gauss.unsqueeze(1)  # [B, 9, 9]
    effect = torch.full((draw.n, 3, 3), -1.0, dtype=torch.float64, device=x.device)
    effect[:, 1, 1] = 8 + lightness
    identity = torch.zeros_like(effect)
    identity[:, 1, 1] = 1
    sharp = torch.zeros_like(blur)
    sharp[:, r - 1:r + 2, r - 1:r + 2] = (1 - a).view(-1, 1, 1) * identity + a.view(-1, 1, 1) * effect
    kernels = torch.where(sharpen.view(-1, 1, 1), sharp, blur)[rows]
    picked = F.pad(x[rows].reshape(1, -1, *x.shape[2:]), (r, r, r, r), mode="reflect")
    weight = kernels.to(x.dtype).repeat_interleave(3, 0).unsqueeze(1)  # [b * 3, 1, 9, 9]
    x[rows] = F.conv2d(picked, weight, groups=len(weight)).view(len(rows), *x.shape[1:]).clamp_(0, 255)
    return x


def gauss_noise(x: torch.Tensor, c: dict, draw: Draw) -> torch.Tensor:
    """albumentations' GaussNoise: per-pixel, per-channel N(0, sigma), sigma from ``std`` (a share of 255)."""
    on = draw.chance(c["p"])
    sigma = draw.uniform(c["std"][:, 0], c["std"][:, 1]) * 255
    rows = on.nonzero()[:, 0]
    if len(rows):
        noise = torch.randn(len(rows), *x.shape[1:], generator=draw.g, device=x.device, dtype=x.dtype)
        x[rows] = (x[rows] + noise * _per_image(sigma[rows], x)).clamp_(0, 255)
    return x


def coarse_dropout(x: torch.Tensor, c: dict, draw: Draw, max_holes: int) -> torch.Tensor:
    """albumentations' CoarseDropout with fractional sizes: 'holes' rectangles of 'size' of each
    side, at uniform positions, filled with 0."""
    on = draw.chance(c["p"])
    holes = draw.integers(c["holes"][:, 0], c["holes"][:, 1])
    s = x.shape[-1]
    ar = torch.arange(s, device=x.device)
    erased = torch.zeros(draw.n, s, s, dtype=torch.bool, device=x.device)
    for k in range(max_holes):
        active = (on & (k < holes)).view(-1, 1, 1)
        hh = torch.floor(s * draw.uniform(c["size"][:, 0], c["size"][:, 1]))
        hw = torch.floor(s * draw.uniform(c["size"][:, 0], c["size"][:, 1]))
        y0 = torch.floor(draw.uniform(0.0, 1.0) * (s - hh + 1))
        x0 = torch.floor(draw.uniform(0.0, 1.0) * (s - hw + 1))
        rows = (ar >= y0.view(-1, 1)) & (ar < (y0 + hh).view(-1, 1))
        cols = (ar >= x0.view(-1, 1)) & (ar < (x0 + hw).view(-1, 1))
        erased |= active & rows.unsqueeze(2) & cols.unsqueeze(1)
    return x.masked_fill(erased.unsqueeze(1), 0.0)
