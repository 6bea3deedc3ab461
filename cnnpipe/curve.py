"""A line plot on a log-x axis, drawn with PIL (no plotting library needed): the LR range test's loss-vs-lr curve,
for its PNG and TensorBoard's images dashboard."""
from __future__ import annotations

import math

import numpy as np

WIDTH, HEIGHT = 720, 420
LEFT, RIGHT, TOP, BOTTOM = 64, 24, 34, 50        # margins around the plot box, px
GRID, AXIS, SPAN = (225, 225, 225), (60, 60, 60), (222, 240, 222)


def log_x_curve(x, series, *, ylim=None, mark=None, span=None, title="", xlabel="", ylabel="") -> np.ndarray:
    """series: [(label, y, rgb)] over the common x (> 0); ylim (lo, hi) defaults to the range of the last series (the
    others are clipped to the box); mark: (x, label) drawn as a red vertical line; span: (x0, x1) shaded. Returns
    an H,W,3 uint8 image."""
    from PIL import Image, ImageDraw, ImageFont
    x = np.asarray(x, np.float64)
    lx0, lx1 = math.log10(x.min()), math.log10(x.max())
    if lx1 - lx0 < 1e-12:
        lx0, lx1 = lx0 - 0.5, lx1 + 0.5
    if ylim is None:
        y = np.asarray(series[-1][1], np.float64)
        y = y[np.isfinite(y)]
        lo, hi = (float(y.min()), float(y.max())) if len(y) else (0.0, 1.0)
        pad = 0.05 * (hi - lo) or 0.5
        ylim = (lo - pad, hi + pad)
    w, h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(xv, yv):
        u = (math.log10(xv) - lx0) / (lx1 - lx0)
        v = (yv - ylim[0]) / (ylim[1] - ylim[0])
        return LEFT + u * w, TOP + (1 - min(max(v, -0.02), 1.02)) * h        # clipped just outside the box

    img = Image.new("RGB", (WIDTH, HEIGHT), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    if span is not None:
        (a, _), (b, _) = px(max(span[0], x.min()), ylim[0]), px(min(span[1], x.max()), ylim[0])
        d.rectangle([a, TOP, b, TOP + h], fill=SPAN)
    for e in range(math.ceil(lx0 - 1e-9), math.floor(lx1 + 1e-9) + 1):       # a grid line and label per decade
        gx, _ = px(10.0 ** e, ylim[0])
        d.line([gx, TOP, gx, TOP + h], fill=GRID)
        label = f"1e{e}"
        d.text((gx - font.getlength(label) / 2, TOP + h + 6), label, fill=AXIS, font=font)
    for i in range(5):
        yv = ylim[0] + i * (ylim[1] - ylim[0]) / 4
        _, gy = px(10.0 ** lx0, yv)
        d.line([LEFT, gy, LEFT + w, gy], fill=GRID)
        label = f"{yv:.3g}"
        d.text((LEFT - 6 - font.getlength(label), gy - 6), label, fill=AXIS, font=font)
    d.rectangle([LEFT, TOP, LEFT + w, TOP + h], outline=AXIS)
    for i, (label, yv, rgb) in enumerate(series):
        pts = [px(a, b) for a, b in zip(x, yv) if b is not None and math.isfinite(b)]
        if len(pts) > 1:
            d.line(pts, fill=rgb, width=2 if i == len(series) - 1 else 1)
        lx = LEFT + 8 + 150 * i                                                  # the legend: a stroke, the name
        d.line([lx, TOP + 12, lx + 16, TOP + 12], fill=rgb, width=2)
        d.text((lx + 20, TOP + 6), label, fill=rgb, font=font)
    if mark is not None:
        mx, _ = px(mark[0], ylim[0])
        d.line([mx, TOP, mx, TOP + h], fill=(200, 30, 30), width=2)
        d.text((min(mx + 4, LEFT + w - font.getlength(mark[1]) - 2), TOP + 20), mark[1], fill=(200, 30, 30), font=font)
    d.text((LEFT, 10), title, fill="black", font=font)
    d.text((LEFT + w / 2 - font.getlength(xlabel) / 2, HEIGHT - 20), xlabel, fill="black", font=font)
    d.text((6, 10), ylabel, fill="black", font=font)
    return np.asarray(img)                                                   # H,W,3 uint8
