"""A generated demo dataset in the competition layout, with learnable visual cues.

    python -m utils.tools.demo_data --out data/demo [--n-train 2000 --n-test 400 --seed 0]

Writes train.csv, test.csv, category_attributes.parquet, sample_submission.csv,
train_images/, test_images/ and test_solution.csv (the true test labels). The five real
categories, attribute names and value vocabularies are used; class frequencies and missing-label
rates follow the real train counts, scaled down. Every value leaves a cue in the image: the
silhouette by category, fill colour by colour (bands for multicolor), textures by pattern and
print type, sleeve / length / neck / fit geometry, border bands for sarees, small glyphs for
ornamentation-like heads. Background, scale and position jitter, blur, sensor noise and a small
label-noise rate keep the task learnable but not trivial. Output is deterministic for a seed.
"""
from __future__ import annotations

import contextlib
import json
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from utils.config import option, run_command
from utils.data.schema import ATTR_COLS, CATEGORY, DUMMY, ID, LEN
from utils.io import atomic_path, atomic_write, atomic_write_csv, atomic_write_json

# Real train counts per (category, attribute, value); rows per category. NaN = rows - sum.
ROWS = {"Men Tshirts": 7267, "Sarees": 18346, "Kurtis": 6822, "Women Tshirts": 18774,
        "Women Tops & Tunics": 19004}
COUNTS = {
    "Men Tshirts": {
        "color": {"default": 2132, "multicolor": 1821, "white": 1253, "black": 804},
        "neck": {"polo": 3085, "round": 3059},
        "pattern": {"solid": 3185, "printed": 2606},
        "print_or_pattern_type": {"solid": 3197, "default": 1971, "typography": 781},
        "sleeve_length": {"short sleeves": 5647, "long sleeves": 330},
    },
    "Sarees": {
        "blouse_pattern": {"same as saree": 5230, "same as border": 1611, "default": 856, "solid": 188},
        "border": {"zari": 8542, "woven design": 6262, "temple border": 1296, "default": 855,
                   "solid": 411, "no border": 313},
        "border_width": {"small border": 9520, "big border": 5781, "no border": 560},
        "color": {"multicolor": 5142, "cream": 4807, "default": 4078, "white": 2672,
                  "navy blue": 339, "pink": 339, "yellow": 273, "green": 246},
        "occasion": {"party": 10407, "traditional": 4973, "daily": 1322, "wedding": 947},
        "ornamentation": {"jacquard": 4195, "default": 540, "tassels and latkans": 275},
        "pallu_details": {"woven design": 3724, "zari woven": 2678, "same as saree": 2108, "default": 386},
        "pattern": {"zari woven": 13533, "solid": 1106, "woven design": 806, "default": 789, "printed": 231},
        "print_or_pattern_type": {"default": 3282, "ethnic motif": 2921, "peacock": 2585, "floral": 2516,
                                  "solid": 1124, "elephant": 716, "applique": 628, "checked": 286,
                                  "botanical": 245},
        "transparency": {"no": 14835, "yes": 2983},
    },
    "Kurtis": {
        "color": {"black": 1395, "red": 1376, "maroon": 1071, "navy blue": 717, "blue": 426,
                  "multicolor": 407, "yellow": 353, "green": 258, "pink": 220, "purple": 170,
                  "grey": 137, "white": 66, "orange": 33},
        "fit_shape": {"a-line": 2066, "straight": 1165},
        "length": {"knee length": 2048, "calf length": 1352},
        "occasion": {"daily": 5961, "party": 470},
        "ornamentation": {"net": 2287, "default": 979},
        "pattern": {"default": 2064, "solid": 1784},
        "print_or_pattern_type": {"default": 2054, "solid": 1789},
        "sleeve_length": {"three-quarter sleeves": 5666, "short sleeves": 831, "sleeveless": 205},
        "sleeve_styling": {"regular": 6461, "sleeveless": 230},
    },
    "Women Tshirts": {
        "color": {"white": 4650, "default": 4297, "black": 2999, "yellow": 1838, "multicolor": 1392,
                  "pink": 1380, "maroon": 729},
        "fit_shape": {"regular": 12376, "loose": 1483, "boxy": 942},
        "length": {"regular": 8187, "crop": 6711, "long": 1682},
        "pattern": {"printed": 14285, "default": 1040, "solid": 836},
        "print_or_pattern_type": {"typography": 5483, "funky print": 4172, "default": 2254,
                                  "quirky": 2179, "graphic": 2038, "solid": 908},
        "sleeve_length": {"short sleeves": 13703, "long sleeves": 1460, "default": 878},
        "sleeve_styling": {"regular sleeves": 14661, "cuffed sleeves": 799},
        "surface_styling": {"default": 483, "applique": 27},
    },
    "Women Tops & Tunics": {
        "color": {"black": 2703, "white": 2433, "default": 1983, "pink": 1532, "blue": 945,
                  "yellow": 921, "red": 802, "maroon": 797, "green": 666, "multicolor": 456,
                  "navy blue": 423, "peach": 397},
        "fit_shape": {"fitted": 5523, "regular": 4846, "boxy": 2033, "default": 935},
        "length": {"regular": 7359, "crop": 5707},
        "neck_collar": {"round neck": 6939, "high": 1845, "square neck": 1213, "v-neck": 1091,
                        "default": 1082, "sweetheart neck": 800, "stylised": 481},
        "ocassion": {"casual": 12358, "party": 209},
        "pattern": {"solid": 7755, "printed": 4521, "default": 941},
        "print_or_pattern_type": {"solid": 8011, "default": 1731, "typography": 1562, "quirky": 830,
                                  "graphic": 586, "floral": 496},
        "sleeve_length": {"short sleeves": 7432, "long sleeves": 3515, "three-quarter sleeves": 1826,
                          "sleeveless": 1024},
        "sleeve_styling": {"regular sleeves": 7480, "puff sleeves": 2732, "default": 1640,
                           "sleeveless": 719},
        "surface_styling": {"knitted": 3628, "default": 1108, "ruffles": 819, "tie-ups": 620,
                            "waist tie-ups": 582, "applique": 424},
    },
}
COLORS = {"black": (25, 25, 25), "white": (245, 245, 240), "red": (200, 30, 30),
          "maroon": (120, 20, 40), "navy blue": (20, 30, 100), "blue": (40, 110, 220),
          "yellow": (240, 210, 40), "green": (40, 150, 60), "pink": (240, 130, 180),
          "purple": (120, 50, 160), "grey": (130, 130, 130), "orange": (245, 130, 20),
          "cream": (240, 225, 190), "peach": (250, 185, 150), "default": (150, 110, 70)}
LABEL_NOISE = 0.03  # share of given labels replaced by another value of the head


def sample_labels(n: int, rng: np.random.Generator) -> pd.DataFrame:
    """Rows with categories and labels drawn from the real (scaled) frequencies."""
    cats = list(ROWS)
    p_cat = np.array([ROWS[c] for c in cats], dtype=float)
    category = rng.choice(len(cats), size=n, p=p_cat / p_cat.sum())
    df = pd.DataFrame({CATEGORY: [cats[i] for i in category]})
    df[LEN] = df[CATEGORY].map(lambda c: len(COUNTS[c]))
    for col in ATTR_COLS:
        df[col] = None
    for cat in cats:
        rows = np.flatnonzero(df[CATEGORY].to_numpy() == cat)
        for slot, (attr, counts) in enumerate(COUNTS[cat].items(), start=1):
            values = list(counts) + [None]
            p = np.array(list(counts.values()) + [ROWS[cat] - sum(counts.values())], dtype=float)
            draw = rng.choice(len(values), size=len(rows), p=p / p.sum())
            df.loc[rows, f"attr_{slot}"] = [values[i] for i in draw]
    return df


def add_label_noise(df: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    noisy = df.copy()
    for cat, attrs in COUNTS.items():
        rows = np.flatnonzero(noisy[CATEGORY].to_numpy() == cat)
        for slot, (attr, counts) in enumerate(attrs.items(), start=1):
            col = f"attr_{slot}"
            for r in rows:
                if noisy.at[r, col] is not None and rng.random() < LABEL_NOISE:
                    noisy.at[r, col] = list(counts)[rng.integers(len(counts))]
    return noisy


# ----------------------------------------------------------------------------- drawing

def _value_index(cat: str, attr: str, value) -> int:
    return -1 if value is None else list(COUNTS[cat][attr]).index(value)


def _texture(draw: ImageDraw.ImageDraw, box, kind: int, color, rng, scale: float) -> None:
    """Texture family ``kind`` (>= 0) over box: stripes, checks, dots, text bars, motifs..."""
    x0, y0, x1, y1 = box
    step = max(6, int((10 + 3 * (kind % 3)) * scale))
    if kind == 0:  # horizontal stripes
        for y in range(int(y0), int(y1), 2 * step):
            draw.rectangle([x0, y, x1, y + step // 2], fill=color)
    elif kind == 1:  # checks
        for y in range(int(y0), int(y1), 2 * step):
            draw.line([x0, y, x1, y], fill=color, width=3)
        for x in range(int(x0), int(x1), 2 * step):
            draw.line([x, y0, x, y1], fill=color, width=3)
    elif kind == 2:  # polka dots
        for y in range(int(y0), int(y1), 2 * step):
            for x in range(int(x0), int(x1), 2 * step):
                draw.ellipse([x, y, x + step, y + step], fill=color)
    elif kind == 3:  # typography: rows of short bars
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        for k in range(3):
            w = (x1 - x0) * (0.5 - 0.1 * k)
            draw.rectangle([cx - w / 2, cy - 2 * step + k * 1.4 * step,
                            cx + w / 2, cy - 1.4 * step + k * 1.4 * step], fill=color)
    elif kind == 4:  # diagonal stripes
        for x in range(int(x0) - int(y1 - y0), int(x1), 2 * step):
            draw.line([x, y1, x + (y1 - y0), y0], fill=color, width=max(2, step // 2))
    elif kind == 5:  # one big graphic disc
        r = min(x1 - x0, y1 - y0) * 0.3
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=color, width=max(3, int(r / 4)))
    elif kind == 6:  # flowers: small rings with centres
        for y in range(int(y0 + step), int(y1), 3 * step):
            for x in range(int(x0 + step), int(x1), 3 * step):
                draw.ellipse([x - step, y - step, x + step, y + step], outline=color, width=2)
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
    elif kind == 7:  # triangles (ethnic motif)
        for y in range(int(y0), int(y1), 3 * step):
            for x in range(int(x0), int(x1), 3 * step):
                draw.polygon([(x, y + 2 * step), (x + step, y), (x + 2 * step, y + 2 * step)], fill=color)
    elif kind == 8:  # zigzag
        for y in range(int(y0), int(y1), 3 * step):
            pts = [(x, y + (step if (i % 2) else 0)) for i, x in enumerate(range(int(x0), int(x1), step))]
            if len(pts) > 1:
                draw.line(pts, fill=color, width=3)
    else:  # crosses
        for y in range(int(y0), int(y1), 3 * step):
            for x in range(int(x0), int(x1), 3 * step):
                draw.line([x, y, x + step, y + step], fill=color, width=3)
                draw.line([x + step, y, x, y + step], fill=color, width=3)


def _glyph(draw: ImageDraw.ImageDraw, center, size: float, kind: int, color) -> None:
    """A small marker whose shape encodes a value: disc, square, triangle, ring, bar, diamond..."""
    cx, cy = center
    s = size
    shapes = [
        lambda: draw.ellipse([cx - s, cy - s, cx + s, cy + s], fill=color),
        lambda: draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=color),
        lambda: draw.polygon([(cx, cy - s), (cx + s, cy + s), (cx - s, cy + s)], fill=color),
        lambda: draw.ellipse([cx - s, cy - s, cx + s, cy + s], outline=color, width=max(2, int(s / 3))),
        lambda: draw.rectangle([cx - 1.6 * s, cy - s / 3, cx + 1.6 * s, cy + s / 3], fill=color),
        lambda: draw.polygon([(cx, cy - s), (cx + s, cy), (cx, cy + s), (cx - s, cy)], fill=color),
        lambda: draw.rectangle([cx - s / 3, cy - 1.6 * s, cx + s / 3, cy + 1.6 * s], fill=color),
        lambda: (draw.line([cx - s, cy - s, cx + s, cy + s], fill=color, width=4),
                 draw.line([cx + s, cy - s, cx - s, cy + s], fill=color, width=4)),
    ]
    shapes[kind % len(shapes)]()


def _fill(cat: str, labels: dict, rng):
    color = labels.get("color")
    if color == "multicolor":
        idx = rng.choice(len(COLORS) - 1, size=3, replace=False)
        return [list(COLORS.values())[i] for i in idx]
    if color is None:
        return [tuple(int(v) for v in rng.integers(40, 220, size=3))]
    return [COLORS[color]]


def _contrast(rgb) -> tuple:
    return (20, 20, 20) if sum(rgb) > 380 else (235, 235, 235)


@dataclass
class _Canvas:
    """One product image being drawn, and what every part of the drawing reads."""
    img: Image.Image
    draw: ImageDraw.ImageDraw
    rng: np.random.Generator
    bg: tuple
    cat: str
    labels: dict
    scale: float  # the garment's size
    cx: float  # its horizontal centre
    top: float  # its top edge
    fills: list  # body colours (several for multicolor)

    @property
    def ink(self) -> tuple:
        """The contrasting colour of textures and glyphs."""
        return _contrast(self.fills[0])

    def v(self, attr: str) -> int:
        """The index of the row's value of ``attr`` in its vocabulary; -1 when not given."""
        return _value_index(self.cat, attr, self.labels.get(attr))


WIDTH = 512  # every image is drawn this wide (its geometry is in these pixels), then shrunk if asked


def render(cat: str, labels: dict, height: int, seed: int) -> Image.Image:
    """One product image WIDTH wide; ``labels`` maps attribute -> value (None = not given)."""
    rng = np.random.default_rng(seed)
    W, H = WIDTH, height
    bg = tuple(int(v) for v in rng.integers(170, 256, size=3))
    img = Image.new("RGB", (W, H), bg)
    draw = ImageDraw.Draw(img)
    # background clutter: a few faint shapes
    for _ in range(3):
        x, y = rng.integers(0, W), rng.integers(0, H)
        r = rng.integers(20, 80)
        shade = tuple(int(c) - int(rng.integers(10, 40)) for c in bg)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=shade)
    scale = min(W, H) / 512 * rng.uniform(0.75, 1.0)
    cx = W / 2 + rng.uniform(-0.08, 0.08) * W
    top = H * rng.uniform(0.08, 0.16)
    c = _Canvas(img, draw, rng, bg, cat, labels, scale, cx, top, _fill(cat, labels, rng))
    if cat == "Sarees":
        box = _saree_body(c)
        _saree_details(c, box)
    else:
        _garment(c)
    return _camera(c.img, rng)


def _saree_body(c: _Canvas) -> tuple:
    """The drape, its colour bands, transparency, body pattern and pallu; returns its box."""
    body_w, H = 200 * c.scale, c.img.size[1]
    body_h = (H - c.top - 10) * 0.92
    x0, x1, y0, y1 = c.cx - body_w * 0.75, c.cx + body_w * 0.75, c.top, c.top + body_h
    fills, draw = c.fills, c.draw
    draw.rectangle([x0, y0, x1, y1], fill=fills[0])
    for i, f in enumerate(fills[1:]):  # multicolor bands
        bx = x0 + (x1 - x0) * (i + 1) / len(fills)
        draw.rectangle([bx, y0, bx + (x1 - x0) / len(fills) / 2, y1], fill=f)
    if c.labels.get("transparency") == "yes":  # see-through: a faded overlay
        overlay = Image.new("RGB", c.img.size, c.bg)
        mask = Image.new("L", c.img.size, 0)
        ImageDraw.Draw(mask).rectangle([x0, y0, x1, y1], fill=110)
        c.img.paste(overlay, (0, 0), mask)
        c.draw = draw = ImageDraw.Draw(c.img)
    k = c.v("pattern")  # pattern over the body
    if k >= 0:
        _texture(draw, (x0, y0 + 30, x1, y1 - 30), [9, 0, 4, 8, 2][k], c.ink, c.rng, c.scale)
    k = c.v("pallu_details")  # pallu: a diagonal region with its own glyph
    pallu = [(x0, y0), (x0 + (x1 - x0) * 0.45, y0), (x0, y0 + (y1 - y0) * 0.35)]
    draw.polygon(pallu, fill=tuple(max(0, v - 50) for v in fills[0]))
    if k >= 0:
        _glyph(draw, (x0 + 30 * c.scale, y0 + 35 * c.scale), 14 * c.scale, k, c.ink)
    return x0, x1, y0, y1


def _saree_details(c: _Canvas, box: tuple) -> None:
    """Border bands (type = texture, width = thickness), print motif, blouse piece,
    ornamentation and occasion glyphs."""
    (x0, x1, y0, y1), draw, scale, ink, labels = box, c.draw, c.scale, c.ink, c.labels
    width = {0: 10, 1: 34, 2: 0, -1: 18}[c.v("border_width")] * scale
    k = c.v("border")
    if width > 0 and labels.get("border") != "no border":
        band_col = (200, 160, 40) if labels.get("border") == "zari" else ink
        for yb in (y0, y1 - width):
            draw.rectangle([x0, yb, x1, yb + width], fill=band_col)
            if k >= 0:
                _texture(draw, (x0, yb, x1, yb + width), [1, 6, 7, 3, 0, 0][k], c.fills[0], c.rng, scale * 0.6)
    k = c.v("print_or_pattern_type")  # print type: a motif in the lower half
    if k >= 0:
        _glyph(draw, (c.cx, y0 + (y1 - y0) * 0.65), 22 * scale, k, ink)
    k = c.v("blouse_pattern")  # blouse piece in the corner
    if k >= 0:
        bx, by = x1 - 50 * scale, y0 + 50 * scale
        draw.rectangle([bx - 25 * scale, by - 25 * scale, bx + 25 * scale, by + 25 * scale], outline=ink, width=3)
        _glyph(draw, (bx, by), 12 * scale, k, ink)
    k = c.v("ornamentation")
    if k == 2:  # tassels hanging from the hem
        for xt in np.linspace(x0 + 10, x1 - 10, 8):
            draw.line([xt, y1, xt, min(c.img.size[1] - 1, y1 + 25 * scale)], fill=ink, width=3)
    elif k >= 0:
        _glyph(draw, (x0 + 30 * scale, y1 - 60 * scale), 10 * scale, k + 3, ink)
    k = c.v("occasion")
    if k >= 0:
        _glyph(draw, (x1 - 30 * scale, y1 - 60 * scale), 12 * scale, k + 1, ink)


@dataclass
class _Torso:
    """A top's geometry: shoulder width, hem flare, and its vertical extent."""
    top_w: float
    flare: float
    y0: float
    y1: float

    @property
    def body_h(self) -> float:
        return self.y1 - self.y0


def _garment(c: _Canvas) -> None:
    """A top (t-shirt, kurti, tunic): torso by length and fit, sleeves, neck, prints, trims."""
    labels, scale = c.labels, c.scale
    length_f = {"crop": 0.45, "regular": 0.62, "long": 0.8, "knee length": 0.8,
                "calf length": 0.95}.get(labels.get("length"), 0.62 if "Tshirts" in c.cat else 0.75)
    if c.cat == "Kurtis" and labels.get("length") is None:
        length_f = 0.88
    body_h = min(c.img.size[1] - c.top - 10, 520 * scale) * length_f
    fit = labels.get("fit_shape")
    top_w = 200 * scale * {"boxy": 1.2, "loose": 1.15, "fitted": 0.85}.get(fit, 1.0)
    flare = {"a-line": 1.6, "loose": 1.15, "boxy": 1.0, "fitted": 0.9, "straight": 1.0, "default": 1.3}.get(fit, 1.05)
    y0 = c.top + 40 * scale
    t = _Torso(top_w, flare, y0, c.top + 40 * scale + body_h)
    _sleeves(c, t)
    cx, fills = c.cx, c.fills
    c.draw.polygon([(cx - top_w / 2, t.y0), (cx + top_w / 2, t.y0), (cx + top_w / 2 * flare, t.y1),
                    (cx - top_w / 2 * flare, t.y1)], fill=fills[0])
    for i, f in enumerate(fills[1:]):  # multicolor: horizontal colour blocks
        by = t.y0 + body_h * (i + 1) / len(fills)
        c.draw.rectangle([cx - top_w / 2, by, cx + top_w / 2, by + body_h / len(fills) / 2], fill=f)
    _neck(c, t)
    _prints(c, t)
    _trims(c, t)


def _sleeves(c: _Canvas, t: _Torso) -> None:
    """Sleeve length from sleeve_length, styling at the shoulder or cuff."""
    labels, scale, draw, ink, fill = c.labels, c.scale, c.draw, c.ink, c.fills[-1]
    sl = labels.get("sleeve_length") or ("" if c.cat != "Men Tshirts" else "short sleeves")
    sleeve_f = {"sleeveless": 0.0, "short sleeves": 0.28, "three-quarter sleeves": 0.6,
                "long sleeves": 0.9, "default": 0.42}.get(sl, 0.35)
    styling = labels.get("sleeve_styling")
    if styling == "sleeveless" or sleeve_f == 0:
        return
    sw, y0, body_h = 55 * scale, t.y0, t.body_h
    for side in (-1, 1):
        sx = c.cx + side * t.top_w / 2
        ex = sx + side * body_h * sleeve_f * 0.7
        ey = y0 + body_h * sleeve_f * 0.9
        draw.polygon([(sx, y0), (sx, y0 + sw * 1.3), (ex, ey + sw * 0.4), (ex + side * 0.5 * sw, ey - sw * 0.5)],
                     fill=fill)
        if styling == "puff sleeves":
            draw.ellipse([sx + side * 5 - 30 * scale, y0 - 10 * scale, sx + side * 5 + 30 * scale,
                          y0 + 50 * scale], fill=fill, outline=ink, width=2)
        elif styling == "cuffed sleeves":
            draw.line([(ex, ey + sw * 0.4), (ex + side * 0.5 * sw, ey - sw * 0.5)], fill=ink, width=8)
        elif styling == "default":
            _glyph(draw, (ex, ey), 8 * scale, 2, ink)


def _neck(c: _Canvas, t: _Torso) -> None:
    """The neck (Men Tshirts) or neck_collar (tops) shape, cut out of the body."""
    neck = c.labels.get("neck") or c.labels.get("neck_collar")
    draw, cx, y0, bg, ink, scale = c.draw, c.cx, t.y0, c.bg, c.ink, c.scale
    nw = 32 * scale
    if neck in ("round", "round neck"):
        draw.ellipse([cx - nw, y0 - nw * 0.6, cx + nw, y0 + nw * 0.8], fill=bg)
    elif neck == "polo":
        draw.rectangle([cx - nw, y0 - 8, cx + nw, y0 + 14 * scale], fill=ink)
        draw.rectangle([cx - 5, y0, cx + 5, y0 + 45 * scale], fill=ink)
    elif neck == "v-neck":
        draw.polygon([(cx - nw, y0), (cx + nw, y0), (cx, y0 + 2.2 * nw)], fill=bg)
    elif neck == "square neck":
        draw.rectangle([cx - nw, y0 - 2, cx + nw, y0 + 1.2 * nw], fill=bg)
    elif neck == "high":
        draw.rectangle([cx - nw * 0.7, y0 - 28 * scale, cx + nw * 0.7, y0 + 4], fill=c.fills[0], outline=ink, width=3)
    elif neck == "sweetheart neck":
        draw.ellipse([cx - nw, y0 - nw * 0.5, cx, y0 + nw], fill=bg)
        draw.ellipse([cx, y0 - nw * 0.5, cx + nw, y0 + nw], fill=bg)
    elif neck == "stylised":
        draw.polygon([(cx - nw, y0), (cx - nw / 3, y0 + nw), (cx, y0 + nw / 3), (cx + nw / 3, y0 + nw),
                      (cx + nw, y0)], fill=bg)
    elif neck == "default":
        draw.arc([cx - nw, y0 - nw, cx + nw, y0 + nw], 0, 180, fill=ink, width=5)
    else:
        draw.ellipse([cx - nw * 0.8, y0 - nw * 0.5, cx + nw * 0.8, y0 + nw * 0.5], fill=bg)


def _prints(c: _Canvas, t: _Torso) -> None:
    """Pattern over the body, print type as a chest motif."""
    draw, cx, ink, rng, scale = c.draw, c.cx, c.ink, c.rng, c.scale
    pattern, ptype = c.labels.get("pattern"), c.labels.get("print_or_pattern_type")
    k = c.v("print_or_pattern_type")
    body = (cx - t.top_w / 2 + 8, t.y0 + 20, cx + t.top_w / 2 - 8, t.y1 - 10)
    if pattern == "printed" or (pattern is None and k >= 0 and ptype not in ("solid", "default")):
        _texture(draw, body, 2, ink, rng, scale)
    elif pattern == "default":
        _texture(draw, body, 8, ink, rng, scale)
    if k >= 0:
        texture = {"typography": 3, "funky print": 4, "quirky": 9, "graphic": 5, "floral": 6,
                   "default": 0}.get(ptype)
        if texture is not None:
            chest = (cx - t.top_w * 0.4, t.y0 + t.body_h * 0.25, cx + t.top_w * 0.4, t.y0 + t.body_h * 0.75)
            draw.rectangle(chest, fill=c.fills[0])
            _texture(draw, chest, texture, ink, rng, scale)


def _trims(c: _Canvas, t: _Torso) -> None:
    """Small glyphs for occasion / ornamentation / surface styling; tie-ups, ruffles, net."""
    draw, cx, ink, scale, labels, top_w = c.draw, c.cx, c.ink, c.scale, c.labels, t.top_w
    for j, attr in enumerate(("occasion", "ocassion", "ornamentation", "surface_styling")):
        k = c.v(attr) if attr in COUNTS[c.cat] else -1
        if k >= 0:
            gx = cx - top_w * 0.3 + (j % 2) * top_w * 0.6
            _glyph(draw, (gx, t.y1 - 30 * scale), 11 * scale, k + 2 * j, ink)
    if labels.get("surface_styling") in ("tie-ups", "waist tie-ups"):
        wy = t.y0 + t.body_h * (0.55 if labels["surface_styling"] == "waist tie-ups" else 0.15)
        draw.line([cx, wy, cx - 25 * scale, wy + 40 * scale], fill=ink, width=4)
        draw.line([cx, wy, cx + 25 * scale, wy + 40 * scale], fill=ink, width=4)
    elif labels.get("surface_styling") == "ruffles":
        for xr in np.linspace(cx - top_w / 2 * t.flare, cx + top_w / 2 * t.flare, 9):
            draw.ellipse([xr - 8, t.y1 - 8, xr + 8, t.y1 + 8], fill=c.fills[0], outline=ink)
    if labels.get("ornamentation") == "net":
        _texture(draw, (cx - top_w / 2, t.y1 - 40 * scale, cx + top_w / 2, t.y1), 1, ink, c.rng, scale * 0.5)


def _camera(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Camera effects: blur (half the time) and sensor noise."""
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.5))))
    arr = np.asarray(img, dtype=np.int16)
    sigma = rng.uniform(2, 8)
    arr = arr + (rng.standard_normal(arr.shape, dtype=np.float32) * sigma).astype(np.int16)  # float32: 2x faster
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _render_row(job) -> None:
    path, cat, labels, height, seed, width = job
    img = render(cat, labels, height, seed)
    if width != img.width:  # drawn WIDTH wide, then shrunk whole: the same picture in fewer pixels
        img = img.resize((width, max(1, round(img.height * width / img.width))), Image.Resampling.BOX)
    with atomic_path(path) as tmp:
        img.save(tmp, format="JPEG", quality=90)


def write_tables(out: Path, category_attrs: dict, train: pd.DataFrame, solution: pd.DataFrame) -> None:
    """The tables of a dataset folder in the competition layout, from its labelled train rows and
    test rows (``id, Category, len, attr_1 .. attr_10``, empty = missing): train.csv, test.csv,
    test_solution.csv (the test labels, for scoring), sample_submission.csv and
    category_attributes.parquet (``category_attrs``: {category: [attribute names]})."""
    atomic_write_csv(out / "train.csv", train)
    atomic_write_csv(out / "test.csv", solution[[ID, CATEGORY]])
    atomic_write_csv(out / "test_solution.csv", solution)
    sample = solution[[ID, CATEGORY, LEN]].copy()
    for slot, col in enumerate(ATTR_COLS, start=1):
        sample[col] = np.where(slot <= sample[LEN], "default", DUMMY)
    atomic_write_csv(out / "sample_submission.csv", sample)
    parquet = pd.DataFrame({"Category": list(category_attrs),
                            "Attribute_list": [list(a) for a in category_attrs.values()],
                            "No_of_attribute": [len(a) for a in category_attrs.values()]})
    atomic_write(out / "category_attributes.parquet", lambda f: parquet.to_parquet(f, index=False))


BUILD = "build.json"  # the recipe a dataset folder's images were made with
IMAGE_NAME = re.compile(r"\d{6}\.jpg")  # the names a builder gives its images (utils.data.schema.image_path)


@contextlib.contextmanager
def build_record(out: Path, recipe: dict):
    """Make a dataset folder with ``recipe`` (what decides its files: generator, counts, seed, ...)
    so that it holds exactly what a fresh build gives. Yields whether the image files already there
    were written by this same recipe (an interrupted build goes on: they may be kept). When they were
    not (another seed or size, or a folder of unknown origin), every image with a builder's name is
    removed first, so that no old photo stays beside a new label; ``build.json`` is written last."""
    marker = out / BUILD
    try:
        same = json.loads(marker.read_text()) == recipe
    except (OSError, ValueError):
        same = False
    if not same:
        marker.unlink(missing_ok=True)
        stale = [p for sub in ("train_images", "test_images") if (out / sub).is_dir()
                 for p in (out / sub).iterdir() if IMAGE_NAME.fullmatch(p.name)]
        if stale:
            print(f"{out}: {len(stale)} images from another build (not {recipe}) removed; writing them anew")
        for p in stale:
            p.unlink()
    yield same
    atomic_write_json(marker, recipe)


def generate(out: str | Path, n_train: int = 2000, n_test: int = 400, seed: int = 0,
             workers: int = 2, progress: bool = True, width: int = WIDTH) -> Path:
    """The demo dataset in ``out``. ``width``: the images' width in pixels (drawn WIDTH wide, then
    shrunk whole; heights follow): a smaller one decodes faster, for a quick test set."""
    if width < 8:
        raise ValueError(f"width must be at least 8 pixels, got {width}")
    out = Path(out)
    recipe = {"generator": "demo", "n_train": n_train, "n_test": n_test, "seed": seed}
    with build_record(out, recipe if width == WIDTH else {**recipe, "width": width}):
        _generate(out, n_train, n_test, seed, workers, progress, width)
    return out


def _generate(out: Path, n_train: int, n_test: int, seed: int, workers: int, progress: bool, width: int) -> None:
    rng = np.random.default_rng(seed)
    for sub in ("train_images", "test_images"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    truth = sample_labels(n_train + n_test, rng)
    heights = rng.integers(259, 1081, size=len(truth))
    seeds = rng.integers(0, 2**31 - 1, size=len(truth))
    noisy = add_label_noise(truth, rng)  # what the annotators wrote; images show the truth
    # Train and test ids overlap and both start at 0, as in the competition.
    ids = np.concatenate([np.arange(n_train), np.arange(n_test)])
    is_train = np.arange(len(truth)) < n_train
    jobs = []
    for i in range(len(truth)):
        cat = truth.at[i, CATEGORY]
        labels = {attr: truth.at[i, f"attr_{s}"] for s, attr in enumerate(COUNTS[cat], start=1)}
        folder = "train_images" if is_train[i] else "test_images"
        jobs.append((out / folder / f"{ids[i]:06d}.jpg", cat, labels, int(heights[i]), int(seeds[i]), width))
    todo = [j for j in jobs if not j[0].exists()]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(tqdm(pool.map(_render_row, todo, chunksize=16), total=len(todo),
                  desc="demo images", disable=not progress))

    def table(frame: pd.DataFrame, id_values) -> pd.DataFrame:
        frame = frame.reset_index(drop=True).copy()
        frame.insert(0, ID, id_values)
        return frame

    # the test labels carry the same noise
    write_tables(out, COUNTS, table(noisy[is_train], ids[is_train]), table(noisy[~is_train], ids[~is_train]))


@dataclass
class DemoDataConfig:
    out: str = option("data/demo", "the dataset folder to write")
    n_train: int = option(2000, "train images")
    n_test: int = option(400, "test images")
    seed: int = option(0, "the same seed gives byte-identical files")
    workers: int = option(2, "processes drawing images")
    width: int = option(WIDTH, f"image width in pixels (drawn {WIDTH} wide, then shrunk whole): smaller decodes faster")


def main(cfg: DemoDataConfig) -> None:
    out = generate(cfg.out, cfg.n_train, cfg.n_test, cfg.seed, cfg.workers, width=cfg.width)
    print(f"demo dataset written to {out} ({cfg.n_train} train, {cfg.n_test} test images)")


if __name__ == "__main__":
    run_command(main, DemoDataConfig, __doc__)
