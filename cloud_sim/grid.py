"""Reconstruction grids: originals on top, one row per reconstruction below, written as a PNG.

    save_grid(x, rec, "cloud/inverse.png")                          # two rows
    save_grid(x, {"float": rec_f, "int8": rec_q}, "cloud/inverse.png")  # one row per entry

Images are (N, C, H, W) in [0, 1] with C = 1 (grayscale) or 3 (RGB). matplotlib is imported
inside save_grid and draws with the Agg canvas, so no display or pyplot state is involved.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeveil.device.files import atomic_path

__all__ = ["save_grid"]


def save_grid(originals, reconstructions, path, n: int = 16, title: str | None = None,
              row_labels: tuple[str, str] = ("original", "reconstruction")) -> Path:
    """Write the first n images of each row to path (atomically: temp file, then rename).

    reconstructions: one (N, C, H, W) array, labelled row_labels[1], or {label: array} for one
    row each; the originals' row is labelled row_labels[0].
    """
    rows = _rows(originals, reconstructions, row_labels, n)
    fig = _figure(rows, title)
    path = Path(path)
    with atomic_path(path) as tmp:  # umask applies
        fig.savefig(tmp, format="png")
    return path


def _rows(originals, reconstructions, row_labels, n: int) -> list[tuple[str, np.ndarray]]:
    """[(label, (k, H, W, C) array)] with k = min(n, N), every row checked against the originals."""
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if isinstance(reconstructions, dict):
        if not reconstructions:
            raise ValueError("reconstructions is an empty dict: give at least one row")
        named = [(row_labels[0], originals)] + list(reconstructions.items())
    else:
        named = [(row_labels[0], originals), (row_labels[1], reconstructions)]
    x = _images(row_labels[0], originals)
    k = min(n, len(x))
    rows = []
    for label, images in named:
        images = _images(str(label), images)
        if images.shape[1:] != x.shape[1:] or len(images) < k:
            raise ValueError(f"row {label!r} has shape {images.shape}, needs at least {k} images "
                             f"shaped like the originals {x.shape[1:]}")
        rows.append((str(label), np.clip(images[:k], 0.0, 1.0).transpose(0, 2, 3, 1)))
    return rows


def _images(label: str, images) -> np.ndarray:
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1] not in (1, 3) or len(images) == 0:
        raise ValueError(f"{label} must be (N, C, H, W) with C = 1 or 3 and N >= 1, got shape {images.shape}")
    return images


def _figure(rows: list[tuple[str, np.ndarray]], title: str | None):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k, cell = len(rows[0][1]), 0.9
    margin = max(1.3, 0.2 + 0.075 * max(len(label) for label, _ in rows))  # room for the row labels (9 pt)
    fig = Figure(figsize=(margin + 0.1 + k * cell, 0.2 + len(rows) * cell + (0.4 if title else 0)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), k, squeeze=False, gridspec_kw={"wspace": 0.05, "hspace": 0.05})
    for r, (label, images) in enumerate(rows):
        for c in range(k):
            ax, img = axes[r, c], images[c]
            if img.shape[2] == 1:
                ax.imshow(img[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            else:
                ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=margin / fig.get_figwidth(), right=0.99, bottom=0.02,
                        top=1 - (0.5 if title else 0.1) / fig.get_figheight())
    return fig
