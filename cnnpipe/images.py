"""Images for TensorBoard, in numpy: colour maps, tiled grids, the confusion matrix.

Signed maps (δ, filters, signed activations) use blue-white-red with white at exactly zero and one scale ±max|v|
per image, so the sign and the relative size across channels show (δ-maps with intensity ∝ sqrt(|δ|/max|δ|): a
few large δ's would otherwise wash the rest out). Non-negative maps (post-ReLU activations) are black-white.
"""
from __future__ import annotations

import math

import numpy as np

BLUE, RED, WHITE = np.array([33, 102, 172.]), np.array([178, 24, 43.]), np.array([255, 255, 255.])
GAP = np.array([96, 96, 96], np.uint8)           # separator between tiles
DELTA_GAMMA = 0.5                                # δ-maps: intensity ∝ sqrt(|δ|/max|δ|), so small δ's stay visible
TILE_PX = 84                                     # small maps are magnified (nearest neighbour) to about this size


def diverging(v, scale, gamma=1.0):
    """Blue (−scale) – white (0) – red (+scale): ... float array → ...,3 uint8. gamma < 1 lifts small values
    (colour intensity ∝ (|v|/scale)^gamma; the sign and exact zeros stay as they are)."""
    t = np.clip(np.asarray(v, np.float64) / (scale if scale > 0 else 1.0), -1.0, 1.0)[..., None]
    t = np.sign(t) * np.abs(t) ** gamma if gamma != 1.0 else t
    rgb = WHITE + np.abs(t) * (np.where(t < 0, BLUE, RED) - WHITE)
    return (rgb + 0.5).astype(np.uint8)


def sequential(v, scale):
    """Black (0) – white (scale) for non-negative maps (post-ReLU activations): ... → ...,3 uint8."""
    g = np.clip(np.asarray(v, np.float64) / (scale if scale > 0 else 1.0), 0.0, 1.0)
    return np.repeat((g * 255 + 0.5).astype(np.uint8)[..., None], 3, axis=-1)


def colorize(v, gamma=1.0):
    """Diverging around zero if the maps have a sign, else sequential; one scale for the whole image."""
    v = np.asarray(v)
    scale = float(np.abs(v).max()) if v.size else 0.0
    return diverging(v, scale, gamma) if v.size and v.min() < 0 else sequential(v, scale)


def grid(tiles, cols=None, gap=2, px=TILE_PX):
    """Tiles R,Cc,h,w,3 (or M,h,w,3, laid out ~square) uint8 → one image with grey separators, magnified."""
    if tiles.ndim == 4:
        M = tiles.shape[0]
        cols = cols or math.ceil(math.sqrt(M))
        rows = math.ceil(M / cols)
        pad = np.zeros((rows * cols - M,) + tiles.shape[1:], np.uint8) + GAP
        tiles = np.concatenate([tiles, pad]).reshape((rows, cols) + tiles.shape[1:])
    R, Cc, h, w, _ = tiles.shape
    z = max(1, px // max(h, w))                                         # magnification
    tiles = tiles.repeat(z, axis=2).repeat(z, axis=3)                        # R,Cc,h·z,w·z,3
    h, w = h * z, w * z
    out = np.empty((R * (h + gap) + gap, Cc * (w + gap) + gap, 3), np.uint8)
    out[...] = GAP
    for r in range(R):
        for c in range(Cc):
            y0, x0 = gap + r * (h + gap), gap + c * (w + gap)
            out[y0:y0 + h, x0:x0 + w] = tiles[r, c]
    return out


def confusion_image(cm, classes, cell=30):
    """The confusion matrix as an RGB image: rows true, columns predicted, shade = row fraction, counts written."""
    from PIL import Image, ImageDraw, ImageFont
    n = cm.shape[0]
    frac = cm / np.maximum(cm.sum(1, keepdims=True), 1)                    # n,n row-normalised
    font = ImageFont.load_default()
    names = [f"{i} {str(c)[:12]}" for i, c in enumerate(classes)]
    left = 8 + max(int(font.getlength(s)) for s in names)
    top, bottom = 20, 18
    img = Image.new("RGB", (left + n * cell + 4, top + n * cell + bottom), "white")
    d = ImageDraw.Draw(img)
    shade = (WHITE + frac[..., None] * (BLUE - WHITE) + 0.5).astype(np.uint8)  # n,n,3
    for i in range(n):
        d.text((2, top + i * cell + cell // 2 - 6), names[i], fill="black", font=font)
        d.text((left + i * cell + cell // 2 - 3, 4), str(i), fill="black", font=font)
        for j in range(n):
            x0, y0 = left + j * cell, top + i * cell
            d.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=tuple(int(c) for c in shade[i, j]),
                        outline=(200, 200, 200))
            if cm[i, j]:
                s = str(int(cm[i, j]))
                d.text((x0 + (cell - font.getlength(s)) / 2, y0 + cell // 2 - 6), s,
                       fill="white" if frac[i, j] > 0.5 else "black", font=font)
    d.text((left, top + n * cell + 3), "rows: true class, columns: predicted", fill="black", font=font)
    return np.asarray(img)                                                   # H,W,3 uint8
