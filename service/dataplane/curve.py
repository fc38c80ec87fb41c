"""Charts as PNGs (Pillow only: no plotting library in the image): the training curve of a
job (train and validation loss, validation top-1, over epochs) and a model's live accuracy
from feedback (over hours)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw

_W, _H, _PAD = 640, 420, 44
_COLORS = {
    "train_loss": (31, 119, 180),
    "val_loss": (255, 127, 14),
    "val_top1": (44, 160, 44),
    "accuracy": (44, 160, 44),
    "labels": (31, 119, 180),
}


def _panel(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    epochs: list[int],
    series: dict[str, list[float]],
    title: str,
    x_names: Sequence[str] | None = None,
) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(160, 160, 160))
    values = [v for vs in series.values() for v in vs]
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    first, last = epochs[0], max(epochs[-1], epochs[0] + 1)

    def point(e: int, v: float) -> tuple[float, float]:
        return (
            x0 + (e - first) / (last - first) * (x1 - x0),
            y1 - (v - lo) / (hi - lo) * (y1 - y0),
        )

    legend_x = x0 + 6
    for name, vs in series.items():
        pts = [point(e, v) for e, v in zip(epochs, vs, strict=True)]
        color = _COLORS[name]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        for px, py in pts:
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=color)
        draw.text((legend_x, y0 + 4), name, fill=color)
        legend_x += 8 * len(name) + 14
    draw.text((x0, y0 - 16), f"{title}  [{lo:.3g} .. {hi:.3g}]", fill=(0, 0, 0))
    names = x_names or [f"epoch {e}" for e in epochs]
    draw.text((x0, y1 + 4), names[0], fill=(80, 80, 80))
    draw.text((x1 - 8 * len(names[-1]), y1 + 4), names[-1], fill=(80, 80, 80))


def render_curve(history: Sequence[dict[str, Any]]) -> bytes:
    """PNG bytes of the loss and top-1 curves; ``history`` holds one dict per epoch with
    ``epoch``, ``train_loss``, ``val_loss`` and ``val_top1``. An empty history gives a
    picture that says so."""
    img = Image.new("RGB", (_W, _H), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    rows = sorted(history, key=lambda h: int(h["epoch"]))
    if not rows:
        draw.text((_PAD, _H // 2), "no epoch finished yet", fill=(0, 0, 0))
    else:
        epochs = [int(h["epoch"]) for h in rows]
        mid = _H // 2
        losses = {k: [float(h[k]) for h in rows] for k in ("train_loss", "val_loss")}
        top1 = {"val_top1": [float(h["val_top1"]) for h in rows]}
        _panel(draw, (_PAD, _PAD, _W - _PAD, mid - _PAD // 2), epochs, losses, "loss")
        _panel(draw, (_PAD, mid + _PAD // 2 + 8, _W - _PAD, _H - _PAD), epochs, top1, "val top-1")
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def render_quality(hours: Sequence[dict[str, Any]]) -> bytes:
    """PNG bytes of live accuracy (top panel) and labels received (bottom) per hour;
    ``hours`` holds ``{"hour", "labels", "accuracy"}`` oldest first."""
    img = Image.new("RGB", (_W, _H), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    if not hours:
        draw.text((_PAD, _H // 2), "no labelled predictions yet", fill=(0, 0, 0))
    else:
        x = list(range(len(hours)))
        names = [str(h["hour"]) for h in hours]
        mid = _H // 2
        acc = {"accuracy": [float(h["accuracy"]) for h in hours]}
        labels = {"labels": [float(h["labels"]) for h in hours]}
        _panel(draw, (_PAD, _PAD, _W - _PAD, mid - _PAD // 2), x, acc, "live accuracy", names)
        box = (_PAD, mid + _PAD // 2 + 8, _W - _PAD, _H - _PAD)
        _panel(draw, box, x, labels, "labels per hour", names)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


__all__ = ["render_curve", "render_quality"]
