"""torchvision's detection operations with static shapes, for one `jax.jit`: resize, anchors, the
box coder, clipping, padded NMS and RoIAlign.

Each function computes what its torchvision counterpart computes (`models/detection/transform.py`,
`anchor_utils.py`, `_utils.py`, `ops/boxes.py`, `ops/roi_align.py`, `ops/poolers.py`; the details
are in REFERENCE.md), with one change of form: where torchvision returns a variable number of
boxes, these return a fixed number and a `valid` mask. Boxes are (x1, y1, x2, y2) in pixels.

Two deliberate differences, neither visible in the numbers:
- torchvision's `batched_nms` either offsets each group's coordinates (the "coordinate trick")
  or loops over the groups; here each group (a feature level, a class) is its own padded `nms`,
  and `top_survivors` merges them by score. Both keep the same boxes unless an IoU lies within
  float32 rounding of the threshold; this way the overlap matrices are per group, not K x K.
- `roi_align` is by default an einsum of per-axis bilinear weights (as google-research's fvlm
  does), not a gather: its gradient has no scatter, which XLA:CPU runs as a slow serial loop.
  The gather form is kept (`method="gather"`), tested equal, and measured slower in the
  detector's training step (`docs/performance.md`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

BBOX_XFORM_CLIP = math.log(1000.0 / 16)  # the box coder's clamp on dw, dh
RPN_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
BOX_HEAD_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


# --- the transform ---------------------------------------------------------------------------
def resized_size(size: int, target: int) -> int:
    """The side torchvision's transform resizes a square `size` image to (min_size = max_size =
    `target`): interpolate's floor(size * scale) with recompute_scale_factor."""
    return int(math.floor(size * (target / size)))


def bilinear_matrix(size: int, out: int) -> np.ndarray:
    """(out, size) weights of torch's bilinear interpolation, align_corners=False: the source
    coordinate (i + 0.5) * size / out - 0.5, clamped at 0, between its two neighbours."""
    scale = np.float32(size) / np.float32(out)
    m = np.zeros((out, size), np.float32)
    for i in range(out):
        src = max(scale * np.float32(i + 0.5) - np.float32(0.5), np.float32(0.0))
        i0 = int(src)
        i1 = i0 + 1 if i0 < size - 1 else i0
        lam = np.float32(src - i0)
        m[i, i0] += np.float32(1.0) - lam
        m[i, i1] += lam
    return m


def resize_bilinear(x: jax.Array, out: int) -> jax.Array:
    """(B, H, W, C) -> (B, out, out, C), as torch's bilinear interpolate (align_corners=False)."""
    _, h, w, _ = x.shape
    mh = jnp.asarray(bilinear_matrix(h, out))  # (out, H)
    mw = jnp.asarray(bilinear_matrix(w, out))  # (out, W)
    return jnp.einsum("oh,bhwc,pw->bopc", mh, x, mw)


def nearest_indices(size: int, out: int) -> np.ndarray:
    """Source rows of torch's nearest interpolation from `size` to `out`: floor(i * size / out)."""
    scale = np.float32(size) / np.float32(out)
    return np.minimum(np.floor(np.arange(out, dtype=np.float32) * scale).astype(np.int32), size - 1)


# --- anchors ---------------------------------------------------------------------------------
def base_anchors(sizes: tuple[int, ...], ratios: tuple[float, ...]) -> np.ndarray:
    """(len(ratios) * len(sizes), 4) zero-centred anchors, ratio-major, rounded: torchvision's
    `AnchorGenerator.generate_anchors` (aspect ratio = h / w)."""
    scales = np.asarray(sizes, np.float32)
    h_ratios = np.sqrt(np.asarray(ratios, np.float32))
    w_ratios = np.float32(1.0) / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)  # (R * S,)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    return np.round(np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2.0)).astype(np.float32)


def grid_anchors(base: np.ndarray, feature: int, image: int) -> np.ndarray:
    """(feature * feature * A, 4) anchors for a square feature map, location-major: each cell's
    offset is its index times the stride (image // feature), with no half-stride shift."""
    stride = image // feature
    shifts = np.arange(feature, dtype=np.float32) * np.float32(stride)
    sy, sx = np.meshgrid(shifts, shifts, indexing="ij")
    shifts = np.stack([sx, sy, sx, sy], axis=-1).reshape(-1, 1, 4)  # (H*W, 1, 4)
    return (shifts + base[None]).reshape(-1, 4)  # (H*W*A, 4)


# --- boxes -----------------------------------------------------------------------------------
def decode(deltas: jax.Array, boxes: jax.Array, weights: tuple[float, ...]) -> jax.Array:
    """torchvision's `BoxCoder.decode_single`: deltas (..., K, 4) (dx, dy, dw, dh) applied to
    reference boxes (..., 4); returns (..., K, 4)."""
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    ctr_x = boxes[..., 0] + 0.5 * widths
    ctr_y = boxes[..., 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
    dw = jnp.minimum(deltas[..., 2] / ww, BBOX_XFORM_CLIP)
    dh = jnp.minimum(deltas[..., 3] / wh, BBOX_XFORM_CLIP)
    pred_ctr_x = dx * widths[..., None] + ctr_x[..., None]
    pred_ctr_y = dy * heights[..., None] + ctr_y[..., None]
    half_w = 0.5 * (jnp.exp(dw) * widths[..., None])
    half_h = 0.5 * (jnp.exp(dh) * heights[..., None])
    return jnp.stack(
        [pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h], -1
    )


def encode(targets: jax.Array, boxes: jax.Array, weights: tuple[float, ...]) -> jax.Array:
    """torchvision's `encode_boxes`, the inverse of `decode`: the deltas (..., 4) that take
    reference boxes (..., 4) to target boxes (..., 4)."""
    wx, wy, ww, wh = weights
    ex_w, ex_h = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    ex_x, ex_y = boxes[..., 0] + 0.5 * ex_w, boxes[..., 1] + 0.5 * ex_h
    gt_w, gt_h = targets[..., 2] - targets[..., 0], targets[..., 3] - targets[..., 1]
    gt_x, gt_y = targets[..., 0] + 0.5 * gt_w, targets[..., 1] + 0.5 * gt_h
    return jnp.stack([wx * (gt_x - ex_x) / ex_w, wy * (gt_y - ex_y) / ex_h,
                      ww * jnp.log(gt_w / ex_w), wh * jnp.log(gt_h / ex_h)], -1)  # fmt: skip


def clip(boxes: jax.Array, size: int) -> jax.Array:
    """Boxes clamped into a square image of side `size`."""
    return jnp.clip(boxes, 0.0, float(size))


def not_small(boxes: jax.Array, min_size: float) -> jax.Array:
    """torchvision's `remove_small_boxes` as a mask: both sides at least `min_size`."""
    return (boxes[..., 2] - boxes[..., 0] >= min_size) & (boxes[..., 3] - boxes[..., 1] >= min_size)


def area(boxes: jax.Array) -> jax.Array:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def pairwise_iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """(..., N, 4), (..., M, 4) -> (..., N, M) IoU, computed as torchvision's NMS kernel does."""
    lt = jnp.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = jnp.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = jnp.maximum(rb - lt, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area(a)[..., :, None] + area(b)[..., None, :] - inter)


def nms(boxes: jax.Array, scores: jax.Array, valid: jax.Array, threshold: float) -> jax.Array:
    """torchvision's `nms` as a mask: boxes (K, 4), scores (K,), valid (K,) bool -> keep (K,).

    In order of decreasing score (a stable sort, as torchvision's kernel), each kept box removes
    the later ones whose IoU with it is > threshold (strictly, as torchvision). Invalid boxes
    neither survive nor suppress. A fixed-length `fori_loop` over a (K, K) overlap matrix.
    """
    boxes, scores, valid = jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(valid)
    k = boxes.shape[0]
    order = jnp.argsort(-jnp.where(valid, scores, -jnp.inf), stable=True)  # (K,)
    b, ok = boxes[order], valid[order]
    overlap = pairwise_iou(b, b) > threshold  # (K, K)
    later = jnp.arange(k)

    def step(i, suppressed):
        kept = ok[i] & ~suppressed[i]
        return suppressed | (kept & overlap[i] & (later > i))

    suppressed = jax.lax.fori_loop(0, k, step, jnp.zeros(k, bool))
    return jnp.zeros(k, bool).at[order].set(ok & ~suppressed)  # back to the input's order


def top_survivors(scores: jax.Array, keep: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """The first `n` kept entries by decreasing score, as `batched_nms(...)[:n]` orders them:
    indices (n,) into the flattened inputs, and which of them exist (n,)."""
    masked = jnp.where(keep, scores, -jnp.inf).reshape(-1)
    top, idx = jax.lax.top_k(masked, n)
    return idx, top > -jnp.inf


# --- RoIAlign ---------------------------------------------------------------------------------
def roi_scale(feature: int, image: int) -> float:
    """`MultiScaleRoIAlign`'s inferred scale of a level: feature / image rounded to a power of 2."""
    return float(2.0 ** round(math.log2(feature / image)))


def roi_levels(boxes: jax.Array, scales: tuple[float, ...]) -> jax.Array:
    """torchvision's `LevelMapper` (canonical 224 at level 4): each box's index into `scales`."""
    k_min, k_max = -math.log2(scales[0]), -math.log2(scales[-1])
    s = jnp.sqrt(area(boxes))
    level = jnp.floor(4.0 + jnp.log2(s / 224.0) + jnp.float32(1e-6))
    return (jnp.clip(level, k_min, k_max) - k_min).astype(jnp.int32)


def _axis_samples(
    start: jax.Array, end: jax.Array, size: int, out: int, ratio: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """RoIAlign's bilinear samples along one axis (aligned=False), each (..., out, ratio): the
    two rows each of a bin's `ratio` samples reads, its fraction towards the second, and whether
    it counts. A sample beyond [-1, size] counts as 0, one in [-1, 0] reads row 0, one past
    size - 1 reads the last row (torchvision's `bilinear_interpolate`)."""
    length = jnp.maximum(end - start, 1.0)
    bin_size = (length / out)[..., None, None]  # (..., 1, 1)
    p = jnp.arange(out, dtype=jnp.float32)[:, None]  # (out, 1)
    s = jnp.arange(ratio, dtype=jnp.float32)[None, :]  # (1, ratio)
    y = start[..., None, None] + p * bin_size + (s + 0.5) * bin_size / ratio  # (..., out, ratio)
    inside = (y >= -1.0) & (y <= size)
    y = jnp.maximum(y, 0.0)
    low = jnp.floor(y).astype(jnp.int32)
    edge = low >= size - 1
    low = jnp.where(edge, size - 1, low)
    high = jnp.where(edge, size - 1, low + 1)
    y = jnp.where(edge, low.astype(y.dtype), y)
    return low, high, y - low, inside


def _axis_weights(start: jax.Array, end: jax.Array, size: int, out: int, ratio: int) -> jax.Array:
    """(..., out, size) RoIAlign weights along one axis: each of the `out` bins averages its
    `ratio` samples (`_axis_samples`), as rows of one-hot bilinear weights."""
    low, high, frac, inside = _axis_samples(start, end, size, out, ratio)
    rows = jnp.arange(size)
    w = (1.0 - frac)[..., None] * (low[..., None] == rows) + frac[..., None] * (
        high[..., None] == rows
    )  # (..., out, ratio, size)
    w = jnp.where(inside[..., None], w, 0.0)
    return w.sum(-2) / ratio  # (..., out, size)


def roi_align(
    feature: jax.Array, boxes: jax.Array, scale: float, out: int = 7, ratio: int = 2,
    method: str = "einsum",
) -> jax.Array:  # fmt: skip
    """torchvision's `roi_align(aligned=False, sampling_ratio=ratio)` of one level.

    feature (B, H, W, C), boxes (B, R, 4) in image pixels -> (B, R, out, out, C). `method`:
    - "einsum" (the default): bilinear sampling is separable, so each box is two small weight
      matrices and two einsums; no gather, so the gradient has no scatter;
    - "gather": torchvision's kernel as written, four corner reads per sample point; its
      gradient is a scatter-add. `docs/performance.md` measures the two in the training step.
    """
    if method == "gather":
        return _roi_align_gather(feature, boxes, scale, out, ratio)
    if method != "einsum":
        raise ValueError(f"roi_align: unknown method {method!r}; use 'einsum' or 'gather'")
    _, h, w, _ = feature.shape
    x1, y1, x2, y2 = (boxes[..., i] * scale for i in range(4))
    wy = _axis_weights(y1, y2, h, out, ratio)  # (B, R, out, H)
    wx = _axis_weights(x1, x2, w, out, ratio)  # (B, R, out, W)
    rows = jnp.einsum("brph,bhwc->brpwc", wy, feature)  # (B, R, out, W, C)
    return jnp.einsum("brqw,brpwc->brpqc", wx, rows)  # (B, R, out, out, C)


def _roi_align_gather(
    feature: jax.Array, boxes: jax.Array, scale: float, out: int, ratio: int
) -> jax.Array:
    """`roi_align` by gathering each sample's four neighbours, weighted and averaged per bin."""
    b, h, w, c = feature.shape
    r, n = boxes.shape[1], out * ratio

    def axis(lo, hi, size):  # rows (B, R, n, 2) and their weights (B, R, n, 2)
        low, high, frac, inside = (a.reshape(b, r, n) for a in _axis_samples(lo, hi, size, out,
                                                                              ratio))  # fmt: skip
        weight = jnp.stack([1.0 - frac, frac], -1) * inside[..., None]
        return jnp.stack([low, high], -1), weight

    x1, y1, x2, y2 = (boxes[..., i] * scale for i in range(4))
    ry, wy = axis(y1, y2, h)
    rx, wx = axis(x1, x2, w)
    index = ry[:, :, :, None, :, None] * w + rx[:, :, None, :, None, :]  # (B, R, n, n, 2, 2)
    weight = wy[:, :, :, None, :, None] * wx[:, :, None, :, None, :]
    flat = feature.reshape(b, h * w, c)
    corners = jax.vmap(lambda f, i: f[i])(flat, index.reshape(b, -1))
    values = (corners.reshape(*index.shape, c) * weight[..., None]).sum((4, 5))  # (B, R, n, n, C)
    return values.reshape(b, r, out, ratio, out, ratio, c).mean((3, 5))


def multiscale_roi_align(
    features: list[jax.Array], boxes: jax.Array, image: int, out: int = 7, ratio: int = 2,
    method: str = "einsum",
) -> jax.Array:  # fmt: skip
    """`MultiScaleRoIAlign`: each box pooled from the level its size maps it to.
    features: the levels' (B, H_l, W_l, C); boxes (B, R, 4) -> (B, R, out, out, C)."""
    scales = tuple(roi_scale(f.shape[1], image) for f in features)
    if len(features) == 1 or len(set(scales)) == 1:  # one scale: every box maps to level 0
        return roi_align(features[0], boxes, scales[0], out, ratio, method)
    level = roi_levels(boxes, scales)  # (B, R)
    pooled = 0.0
    for i, (f, s) in enumerate(zip(features, scales, strict=True)):
        mine = (level == i)[..., None, None, None]
        pooled = pooled + roi_align(f, boxes, s, out, ratio, method) * mine
    return pooled


# --- training targets -------------------------------------------------------------------------
BELOW_LOW, BETWEEN = -1, -2  # torchvision's Matcher codes for unmatched predictions


def match(
    quality: jax.Array, gt_valid: jax.Array, high: float, low: float, low_quality: bool
) -> jax.Array:
    """torchvision's `Matcher` on a (G, N) quality matrix whose padded rows are `~gt_valid`:
    each prediction's best ground truth (N,), or BELOW_LOW (< low) / BETWEEN ([low, high)).
    `low_quality` (allow_low_quality_matches) gives back its best match to every prediction
    that ties for some ground truth's highest quality, however low."""
    q = jnp.where(gt_valid[:, None], quality, -1.0)  # a padded row never wins
    vals, best = q.max(0), q.argmax(0)  # (N,)
    matches = jnp.where(vals < low, BELOW_LOW, jnp.where(vals < high, BETWEEN, best))
    if low_quality:
        highest = q.max(1, keepdims=True)  # (G, 1)
        ties = ((q == highest) & gt_valid[:, None]).any(0)  # (N,)
        matches = jnp.where(ties, best, matches)
    return matches


def sample(
    key: jax.Array, labels: jax.Array, batch: int, positive_fraction: float
) -> tuple[jax.Array, jax.Array]:
    """`BalancedPositiveNegativeSampler` with a PRNG key: of labels (N,) (>= 1 positive,
    0 negative, -1 ignored) it picks min(batch * fraction, #positive) positives and fills the
    rest of `batch` with negatives, uniformly at random. Returns the (N,) positive and negative
    masks. A fixed count is ranked by random priorities, so the shapes are static."""
    pos, neg = labels >= 1, labels == 0
    n_pos = jnp.minimum(int(batch * positive_fraction), pos.sum())
    n_neg = jnp.minimum(batch - n_pos, neg.sum())
    k_pos, k_neg = jax.random.split(key)

    def pick(k, eligible, n):
        priority = jnp.where(eligible, jax.random.uniform(k, labels.shape), -1.0)
        rank = jnp.argsort(jnp.argsort(-priority))  # 0 for the highest priority
        return eligible & (rank < n)

    return pick(k_pos, pos, n_pos), pick(k_neg, neg, n_neg)


def smooth_l1(x: jax.Array, beta: float) -> jax.Array:
    """torch's `smooth_l1_loss` per element, of the difference x."""
    a = jnp.abs(x)
    return jnp.where(a < beta, 0.5 * a * a / beta, a - 0.5 * beta)
