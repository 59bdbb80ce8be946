"""Stage 2's contact sheet: a few examples per method, drawn so that a subtle edit (a self-blend) shows.

One row per method, ``per_method`` groups of four tiles under a title row naming them: the whole fake with the
edit's mask outlined, then source, fake and ``|fake - source|`` x4 cropped to the mask's bounding box (the
zoom makes a blend that is invisible at thumbnail size visible). Rows without a mask (widened reals,
reconstructions) outline nothing and zoom on the whole image.
"""

from __future__ import annotations

from collections.abc import Mapping

import cv2
import numpy as np

TILE = 176            # tile side, px: twice the old thumbnails' area, a blend's edge shows
TITLE_H = 22          # title row above the tiles
LABEL_W = 110         # left column: the method
GAP = 2               # between tiles of a group; 3x between groups, 2x between rows
OUTLINE = (0, 255, 0)  # RGB of the mask outline: pure green, absent from the sources' skin tones and the grey diff
ZOOM_MARGIN = 0.15     # zoom crop: the mask's box grown by this share of its side on each side
DIFF_GAIN = 4          # |fake - source| is multiplied by this to be seen
COLUMNS = ("fake, edit outlined", "source (zoom)", "fake (zoom)", f"|fake - source| x{DIFF_GAIN}")
FONT = cv2.FONT_HERSHEY_SIMPLEX

Example = tuple[np.ndarray, np.ndarray, np.ndarray | None]  # source, generated image, mask (or None)


def fit(img: np.ndarray, tile: int, fill: int = 255) -> np.ndarray:
    """``img`` (H, W[, 3]) fitted into a ``tile`` x ``tile`` square of ``fill``, aspect kept, centred."""
    h, w = img.shape[:2]
    s = tile / max(h, w)
    nh, nw = max(1, min(tile, round(h * s))), max(1, min(tile, round(w * s)))
    small = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    out = np.full((tile, tile, *img.shape[2:]), fill, img.dtype)
    y0, x0 = (tile - nh) // 2, (tile - nw) // 2
    out[y0:y0 + nh, x0:x0 + nw] = small
    return out


def outlined(tile_img: np.ndarray, tile_mask: np.ndarray | None) -> np.ndarray:
    """``tile_img`` with the edge of ``tile_mask`` (same size, float in [0, 1]) painted :data:`OUTLINE`.

    The mask is cut at half its peak, not at 0.5: a soft self-blend mask may never reach 0.5. The edge is
    the morphological gradient (dilation minus erosion), about 2 px wide.
    """
    if tile_mask is None or float(tile_mask.max()) <= 0:
        return tile_img
    inside = (tile_mask >= 0.5 * float(tile_mask.max())).astype(np.uint8)
    edge = cv2.morphologyEx(inside, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)).astype(bool)
    out = tile_img.copy()
    out[edge] = OUTLINE
    return out


def zoom_box(mask: np.ndarray | None, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the bounding box of the mask's soft extent grown by :data:`ZOOM_MARGIN`, within an
    image of ``shape``; the whole image without a mask (or with an empty one)."""
    h, w = shape[:2]
    if mask is None or float(mask.max()) <= 0:
        return 0, h, 0, w
    ys, xs = np.nonzero(mask > 0.05 * float(mask.max()))
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    my, mx = max(2, round((y1 - y0) * ZOOM_MARGIN)), max(2, round((x1 - x0) * ZOOM_MARGIN))
    return max(0, y0 - my), min(h, y1 + my), max(0, x0 - mx), min(w, x1 + mx)


def example_tiles(src: np.ndarray, fake: np.ndarray, mask: np.ndarray | None, tile: int) -> list[np.ndarray]:
    """The four tiles of one example, in :data:`COLUMNS` order."""
    if src.shape != fake.shape:  # a reconstruction pair fitted or resized: compare at the fake's size
        src = cv2.resize(src, fake.shape[1::-1], interpolation=cv2.INTER_AREA)
    if mask is not None and mask.shape != fake.shape[:2]:
        mask = cv2.resize(mask, fake.shape[1::-1], interpolation=cv2.INTER_LINEAR)
    diff = np.clip(np.abs(fake.astype(np.int16) - src.astype(np.int16)) * DIFF_GAIN, 0, 255).astype(np.uint8)
    y0, y1, x0, x1 = zoom_box(mask, fake.shape)
    crop_mask = None if mask is None else mask[y0:y1, x0:x1]
    return [outlined(fit(fake, tile), None if mask is None else fit(mask, tile, fill=0)),
            fit(src[y0:y1, x0:x1], tile),
            outlined(fit(fake[y0:y1, x0:x1], tile), None if crop_mask is None else fit(crop_mask, tile, fill=0)),
            fit(diff[y0:y1, x0:x1], tile)]


def _text(img: np.ndarray, text: str, x: int, y: int) -> None:
    cv2.putText(img, text, (x, y), FONT, 0.4, (0, 0, 0), 1, cv2.LINE_AA)


def sheet_width(per_method: int, tile: int = TILE) -> int:
    group = len(COLUMNS) * tile + (len(COLUMNS) - 1) * GAP
    return LABEL_W + per_method * group + (per_method - 1) * 3 * GAP


def title_row(per_method: int, tile: int = TILE) -> np.ndarray:
    """The white band above the tiles: "method" over the labels, each column's title over its tiles."""
    row = np.full((TITLE_H, sheet_width(per_method, tile), 3), 255, np.uint8)
    _text(row, "method", 4, TITLE_H - 7)
    x = LABEL_W
    for _ in range(per_method):
        for title in COLUMNS:
            _text(row, title, x + 2, TITLE_H - 7)
            x += tile + GAP
        x += 2 * GAP
    return row


def contact_sheet(examples: Mapping[str, list[Example]], per_method: int, tile: int = TILE) -> np.ndarray:
    """RGB grid under :func:`title_row`: one row per method, up to ``per_method`` groups of
    :func:`example_tiles` each."""
    width = sheet_width(per_method, tile)
    parts = [title_row(per_method, tile)]
    for i, (method, items) in enumerate(examples.items()):
        if i:
            parts.append(np.full((GAP * 2, width, 3), 255, np.uint8))
        row = np.full((tile, width, 3), 255, np.uint8)
        _text(row, method, 4, tile // 2)
        x = LABEL_W
        for src, fake, mask in items[:per_method]:
            for t in example_tiles(src, fake, mask, tile):
                row[:, x:x + tile] = t
                x += tile + GAP
            x += 2 * GAP
        parts.append(row)
    return np.concatenate(parts, axis=0)
