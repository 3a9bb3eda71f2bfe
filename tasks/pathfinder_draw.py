"""Procedural Pathfinder images (Linsley et al. 2018), the data of LRA's Pathfinder and Path-X.

An image holds two long dashed curves (the *paths*) and a few shorter ones (*distractors*), all
made of short straight *paddles* with gaps between them; each paddle turns from the one before
by a random angle of at most ``max_turn_deg``. The two paths start ``start_distance`` apart.
Two circular markers sit at path ends: one at the start of path ``i`` (a coin flip), the other
at the end of the same path (label 1) or of the other one (label 0)::

    label 1:  o - - - - - - - o        label 0:  o - - - - - - -
                                                  - - - - - - - o

Because both markers start from the two nearby path origins, the distance between the markers
says little about the label: the model has to follow the dashes.

How it is drawn (our design after the original ``snakes2`` generator, not a port of it): a curve
is sampled many candidates at a time (turns as a per-curve bend plus noise, summed into angles;
paddle end points by cumulative sums of unit steps); the first candidate is kept whose points
all lie inside the border, come no closer than ``clearance`` to an earlier curve, and whose
non-neighbouring paddles keep that distance from each other. A main path's two ends (where
markers may go) keep ``clearance + marker_radius`` from every other curve. So curves never
touch, and a marker touches its own path only: the label is exactly "one path joins the
markers" (tests check it on the drawn pixels). Curves and markers are drawn white (255) with
Pillow at ``SUPERSAMPLE`` times the resolution and box-filtered down, which gives anti-aliased
grey edges like the released images. Distractors that find no room are left out (the count is
in :class:`Drawing`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 4  # drawing scale before box-filtering down (anti-aliasing)
N_CANDIDATES = 64  # curves sampled at once per try
MAX_TRIES = 6  # tries (of N_CANDIDATES each) per curve
MAX_RESTARTS = 200  # fresh images before giving up on a style that does not fit
BEND_SHARE = 0.6  # share of max_turn_deg that is a per-curve constant bend (so long curves fit)


@dataclass(frozen=True)
class PathStyle:
    """How an image is drawn; lengths in pixels of the final image.

    Attributes:
        resolution: image side (32 for Pathfinder, 128 for Path-X).
        contour_length: paddles per path (LRA levels: 6, 9, 14).
        n_distractors: distractor curves attempted per image.
        distractor_length: paddles per distractor.
        paddle_length: length of one paddle.
        paddle_gap: empty space between consecutive paddles of a curve.
        paddle_width: line width of a paddle.
        marker_radius: radius of the two circular markers.
        max_turn_deg: largest turn between consecutive paddles (uniform in +-max_turn_deg).
        clearance: least distance between points of two different curves, between
            non-adjacent paddles of one curve, and from a marker's edge to another curve;
            must exceed ``paddle_width``.
        start_distance: distance between the starts of the two paths.
    """

    resolution: int
    contour_length: int
    n_distractors: int
    distractor_length: int
    paddle_length: float
    paddle_gap: float
    paddle_width: float
    marker_radius: float
    max_turn_deg: float
    clearance: float
    start_distance: float

    def __post_init__(self) -> None:
        if self.clearance <= self.paddle_width:
            raise ValueError(f"task.clearance={self.clearance} must exceed task.paddle_width={self.paddle_width}, "
                             "or two curves could touch")
        if self.start_distance < self.clearance:
            raise ValueError(f"task.start_distance={self.start_distance} must be at least task.clearance={self.clearance}")
        if min(self.contour_length, self.distractor_length) < 1 or self.n_distractors < 0:
            raise ValueError("task.contour_length and task.distractor_length must be >= 1, task.n_distractors >= 0")


@dataclass
class Drawing:
    """One image and the ground truth behind its label.

    Attributes:
        image: (R, R) uint8 grey levels.
        label: 1 when both markers are on the same path.
        marker_paths: the path (0 or 1) each marker sits on; ``label == (a == b)``.
        marker_centres: (2, 2) marker centres as (x, y), in pixels.
        curves: one (P, 2, 2) array of paddle end points (x, y) per curve; the two paths first.
        n_distractors: distractors actually placed.
        curve_masks: (n_curves, R, R) bool, each curve drawn alone (with ``with_masks=True``).
        marker_masks: (2, R, R) bool, each marker drawn alone (with ``with_masks=True``).
    """

    image: np.ndarray
    label: int
    marker_paths: tuple[int, int]
    marker_centres: np.ndarray
    curves: list[np.ndarray]
    n_distractors: int
    curve_masks: np.ndarray | None = None
    marker_masks: np.ndarray | None = None


class _Canvas:
    """Where curves and markers may still go, as two boolean grids over pixel centres.

    ``near``: within ``clearance`` of a placed curve, or of a possible marker (a main path's
    start or end, radius ``marker_radius``). ``near_wide``: within ``clearance +
    marker_radius`` of a placed curve, which a new main path's ends (future markers) avoid.
    The zones are drawn with Pillow as thick paddles with round caps, a pixel wider than the
    distance asked, so distances hold to within a fraction of a pixel.
    """

    def __init__(self, style: PathStyle):
        R = style.resolution
        self.style = style
        self._images = {"near": Image.new("L", (R, R), 0), "near_wide": Image.new("L", (R, R), 0)}
        self.near = np.zeros((R, R), dtype=bool)
        self.near_wide = np.zeros((R, R), dtype=bool)

    def _stamp(self, grid: str, segments: np.ndarray, radius: float) -> None:
        """Mark pixel centres within ``radius`` (+ a pixel) of ``segments`` (N, 2, 2) as (x, y)."""
        r = radius + 0.5
        draw = ImageDraw.Draw(self._images[grid])
        for (x0, y0), (x1, y1) in segments:
            draw.line([(x0, y0), (x1, y1)], fill=255, width=round(2 * r))
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=255)
            draw.ellipse([x1 - r, y1 - r, x1 + r, y1 + r], fill=255)
        setattr(self, grid, np.asarray(self._images[grid]) > 0)

    def place(self, curve: np.ndarray, main: bool) -> None:
        """Record a curve's paddles (P, 2, 2); a main path's two ends may carry markers."""
        style = self.style
        self._stamp("near_wide", curve, style.clearance + style.marker_radius)
        self._stamp("near", curve, style.clearance)
        if main:
            ends = curve[[0, -1], [0, 1]]  # (2, 2): start of the first paddle, end of the last
            self._stamp("near", np.stack([ends, ends], axis=1), style.clearance + style.marker_radius)


def _paddle_points(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Points along each paddle, at most a pixel apart: (K, P, 2) x2 -> (K, P, S, 2)."""
    n = max(2, math.ceil(np.linalg.norm(ends[0, 0] - starts[0, 0])) + 1)
    t = np.linspace(0.0, 1.0, n)[:, None]  # (S, 1)
    return starts[:, :, None, :] + t * (ends - starts)[:, :, None, :]


def _sample_curves(rng: np.random.Generator, origins: np.ndarray, headings: np.ndarray,
                   n_paddles: int, style: PathStyle, canvas: _Canvas, *, main: bool) -> np.ndarray | None:
    """K candidate curves from ``origins`` (K, 2) and ``headings`` (K,); the first that fits.

    A main path's two ends (where markers may go) also keep ``clearance + marker_radius`` from
    every placed point. Returns the (P, 2, 2) paddle end points of the kept curve, or None.
    """
    K, P = len(origins), n_paddles
    turn = np.deg2rad(style.max_turn_deg)
    # each curve bends one way on average (so long curves fit into the image) plus noise
    bend = rng.uniform(-BEND_SHARE, BEND_SHARE, size=(K, 1))
    turns = turn * (bend + rng.uniform(-(1 - BEND_SHARE), 1 - BEND_SHARE, size=(K, P)))  # |turn| <= max
    turns[:, 0] = 0.0
    theta = headings[:, None] + np.cumsum(turns, axis=1)  # (K, P)
    unit = np.stack([np.cos(theta), np.sin(theta)], axis=-1)  # (K, P, 2)
    step = style.paddle_length + style.paddle_gap
    starts = origins[:, None, :] + step * (np.cumsum(unit, axis=1) - unit)  # (K, P, 2)
    ends = starts + style.paddle_length * unit
    points = _paddle_points(starts, ends)  # (K, P, S, 2)
    S = points.shape[2]

    R, border = style.resolution, style.marker_radius + 0.5
    ok = ((points >= border) & (points <= R - 1 - border)).all(axis=(1, 2, 3))  # (K,)
    pix = np.clip(np.round(points).astype(np.int64), 0, R - 1)  # (K, P, S, 2)
    ok &= ~canvas.near[pix[..., 1], pix[..., 0]].any(axis=(1, 2))
    if main:
        tips = pix[:, [0, -1], [0, -1]]  # (K, 2, 2): first point of the first paddle, last of the last
        ok &= ~canvas.near_wide[tips[..., 1], tips[..., 0]].any(axis=1)
    if P > 2 and ok.any():
        # a curve may bend, but its paddles two or more apart keep the clearance from each other
        flat = points[ok].reshape(-1, P * S, 2)  # (K', P*S, 2)
        dist = np.linalg.norm(flat[:, :, None] - flat[:, None, :], axis=-1)  # (K', PS, PS)
        paddle = np.repeat(np.arange(P), S)
        far_apart = np.abs(paddle[:, None] - paddle[None, :]) >= 2  # (PS, PS)
        self_ok = ~((dist < style.clearance) & far_apart).any(axis=(1, 2))
        ok[np.flatnonzero(ok)[~self_ok]] = False
    if not ok.any():
        return None
    k = int(np.argmax(ok))
    curve = np.stack([starts[k], ends[k]], axis=1)  # (P, 2, 2)
    canvas.place(curve, main)
    return curve


def _random_starts(rng: np.random.Generator, canvas: _Canvas, k: int) -> np.ndarray | None:
    """``k`` random free pixel centres (with replacement), or None if nothing is free."""
    R, b = canvas.style.resolution, math.ceil(canvas.style.marker_radius + 0.5)
    free = np.flatnonzero(~canvas.near[b : R - b, b : R - b])
    if len(free) == 0:
        return None
    idx = rng.choice(free, size=k)
    y, x = np.divmod(idx, R - 2 * b)
    return np.stack([x + b, y + b], axis=1).astype(np.float64)


def _place_two_paths(rng: np.random.Generator, style: PathStyle) -> tuple[_Canvas, list[np.ndarray]] | None:
    """The two main paths: the first starts in the central square that lies ``2 *
    start_distance`` from the border (as in snakes2, so both have room to grow), the second
    ``start_distance`` away from it, heading away from it."""
    canvas = _Canvas(style)
    K, R = N_CANDIDATES, style.resolution
    low = min(2 * style.start_distance, (R - 1) / 2)
    for _ in range(MAX_TRIES):
        origins = rng.uniform(low, R - 1 - low, size=(K, 2))
        first = _sample_curves(rng, origins, rng.uniform(-np.pi, np.pi, K), style.contour_length, style,
                               canvas, main=True)
        if first is not None:
            break
    else:
        return None
    for _ in range(MAX_TRIES):
        angle = rng.uniform(-np.pi, np.pi, K)
        origins = first[0, 0] + style.start_distance * np.stack([np.cos(angle), np.sin(angle)], axis=1)
        headings = angle + rng.uniform(-np.pi / 2, np.pi / 2, K)
        second = _sample_curves(rng, origins, headings, style.contour_length, style, canvas, main=True)
        if second is not None:
            return canvas, [first, second]
    return None


def _render(style: PathStyle, curves: list[np.ndarray], centres: np.ndarray) -> Image.Image:
    """Draw paddles and markers (white on black) at SUPERSAMPLE scale and box-filter down."""
    s, R = SUPERSAMPLE, style.resolution
    big = Image.new("L", (R * s, R * s), 0)
    draw = ImageDraw.Draw(big)
    width = max(1, round(style.paddle_width * s))
    for curve in curves:
        for (x0, y0), (x1, y1) in (curve + 0.5) * s - 0.5:
            draw.line([(x0, y0), (x1, y1)], fill=255, width=width)
    r = style.marker_radius * s
    for x, y in (centres + 0.5) * s - 0.5:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
    return big.resize((R, R), Image.BOX)


def draw_pathfinder(rng: np.random.Generator, style: PathStyle, label: int, *, with_masks: bool = False) -> Drawing:
    """Draw one image with the given ``label`` (1: both markers on one path)."""
    for _ in range(MAX_RESTARTS):
        placed = _place_two_paths(rng, style)
        if placed is not None:
            break
    else:
        raise RuntimeError(
            f"pathfinder: could not fit two paths of {style.contour_length} paddles into a "
            f"{style.resolution}x{style.resolution} image in {MAX_RESTARTS} tries; lower task.clearance, "
            "task.paddle_length or task.paddle_gap"
        )
    canvas, curves = placed
    for _ in range(style.n_distractors):
        for _ in range(2):
            origins = _random_starts(rng, canvas, N_CANDIDATES)
            if origins is None:
                break
            curve = _sample_curves(rng, origins, rng.uniform(-np.pi, np.pi, N_CANDIDATES),
                                   style.distractor_length, style, canvas, main=False)
            if curve is not None:
                curves.append(curve)
                break

    first = int(rng.integers(2))
    second = first if label == 1 else 1 - first
    centres = np.stack([curves[first][0, 0], curves[second][-1, 1]])  # start of one, end of one
    image = np.asarray(_render(style, curves, centres), dtype=np.uint8)
    drawing = Drawing(image=image, label=int(label), marker_paths=(first, second), marker_centres=centres,
                      curves=curves, n_distractors=len(curves) - 2)
    if with_masks:
        empty = np.zeros((0, 2))
        drawing.curve_masks = np.stack([np.asarray(_render(style, [c], empty)) > 0 for c in curves])
        drawing.marker_masks = np.stack([np.asarray(_render(style, [], centres[i : i + 1])) > 0 for i in range(2)])
    return drawing


def balanced_labels(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` labels, ``n // 2`` of them 1 (one more 0 when ``n`` is odd), in random order."""
    labels = np.zeros(n, dtype=np.int64)
    labels[: n // 2] = 1
    return rng.permutation(labels)
