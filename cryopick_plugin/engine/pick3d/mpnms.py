"""Mean-pool non-maximum suppression (MP-NMS, DeepETPicker) and de-duplication of picks.

On a probability map: binarise at t_seg, smooth the binary mask with a k×k×k mean filter `iterations`
times (by default ⌈d/(k−1)⌉ for a particle/label diameter d, which spreads each blob to about one
diameter so one blob gives one dome), and keep the voxels that are the maximum of their k×k×k
neighbourhood and above t_lm. The score of a pick is the smoothed value at the peak: close to 1 for a
solid blob of the expected size, smaller for fragments.

Everything runs in torch (CPU or GPU). `mp_nms_slabs` runs the same computation over z-slabs of a
(memory-mapped) map with a halo wide enough that the result equals a single pass over the whole map.

`deduplicate` removes picks closer than t_dist (one value, or one per pick) to a higher-scoring pick
(KD-tree, greedy by score).
"""
import math

import numpy as np
from scipy.spatial import cKDTree

DEFAULT_KERNEL = 5
DEFAULT_T_SEG = 0.5
DEFAULT_T_LM = 0.1


def default_iterations(diameter, kernel=DEFAULT_KERNEL):
    """⌈d/(k−1)⌉ mean-pool passes for diameter d (at least 1)."""
    return max(1, int(math.ceil(float(diameter) / (kernel - 1))))


def default_t_dist(diameter):
    """De-duplication distance: half the diameter plus one voxel (the reference's min(d)//2 + 1)."""
    return int(diameter) // 2 + 1


def halo(kernel, iterations):
    """Voxels of context one output voxel of `mp_nms` depends on along each axis."""
    return (iterations + 1) * (kernel // 2)


def _box_along(h, axis, kernel, reduce):
    """k-wide centred box sum (reduce='sum', zeros beyond the border) or max (reduce='max', the border
    ignored) along one axis.

    Written as in-place operations on shifted views rather than as `avg_pool3d` / `max_pool3d`: the cube
    filters are separable, and k − 1 vector operations per axis are several times faster on CPU than
    torch's k³-tap pooling kernels (same result up to float rounding; exact for the binary mask's sums).
    """
    import torch
    n = h.shape[axis]
    out = h.clone()
    for shift in range(1, min(kernel // 2, n - 1) + 1):
        for dst, src in ((out.narrow(axis, shift, n - shift), h.narrow(axis, 0, n - shift)),
                         (out.narrow(axis, 0, n - shift), h.narrow(axis, shift, n - shift))):
            if reduce == 'sum':
                dst += src
            else:
                torch.maximum(dst, src, out=dst)
    return out


def _pooled(prob, t_seg, kernel, iterations):
    """`iterations` k×k×k mean filters (zero padding) of the mask prob > t_seg, as (z, y, x) float32.

    The 1-D filters along different axes commute, so (Pz Py Px)^n = Pz^n Py^n Px^n with the same zero
    padding at every pass — exactly the reference's repeated `avg_pool3d` (count_include_pad).
    """
    import torch
    h = (prob > t_seg).to(torch.float32)
    for axis in (2, 1, 0):
        for _ in range(iterations):
            h = _box_along(h, axis, kernel, 'sum')
    return h / float(kernel) ** (3 * iterations)


def _local_max(h, kernel):
    for axis in (2, 1, 0):
        h = _box_along(h, axis, kernel, 'max')
    return h


def mp_nms(prob, diameter=None, t_seg=DEFAULT_T_SEG, t_lm=DEFAULT_T_LM, kernel=DEFAULT_KERNEL,
           iterations=None, device='cpu'):
    """Peaks of one class's probability map (z, y, x), numpy or torch.

    Returns (zyx int array (N, 3), scores (N,)) sorted by decreasing score.
    """
    import torch
    if kernel < 3 or kernel % 2 == 0:
        raise ValueError(f"MP-NMS kernel must be odd and ≥ 3, got {kernel}")
    if iterations is None:
        if diameter is None:
            raise ValueError("give the diameter or the number of iterations")
        iterations = default_iterations(diameter, kernel)
    prob = torch.as_tensor(np.asarray(prob, dtype=np.float32) if not torch.is_tensor(prob) else prob,
                           device=device)
    if prob.ndim != 3:
        raise ValueError(f"MP-NMS needs a (z, y, x) map, got shape {tuple(prob.shape)}")
    with torch.no_grad():
        # Only the neighbourhood of the foreground can hold a peak (h > t_lm > 0 needs a foreground
        # voxel within the pooling reach): work on its bounding box. Zero padding at the crop edge
        # equals the zeros of the background there, so the result is unchanged.
        fg = prob > t_seg
        if not bool(fg.any()):
            return np.zeros((0, 3), int), np.zeros(0)
        reach = halo(kernel, iterations)
        lo, hi = [], []
        for axis in range(3):
            other = tuple(a for a in range(3) if a != axis)
            nz = torch.nonzero(fg.any(dim=other[1]).any(dim=other[0])).flatten()
            lo.append(max(0, int(nz[0]) - reach))
            hi.append(min(prob.shape[axis], int(nz[-1]) + 1 + reach))
        crop = prob[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        h = _pooled(crop, t_seg, kernel, iterations)
        peak = (_local_max(h, kernel) == h) & (h > t_lm)
        idx = torch.nonzero(peak).cpu().numpy() + np.asarray(lo)
        scores = h[peak].cpu().numpy().astype(np.float64)
    order = np.lexsort((idx[:, 2], idx[:, 1], idx[:, 0], -scores)) if len(idx) else np.zeros(0, int)
    return idx[order].astype(int), scores[order]


def mp_nms_slabs(prob_map, diameter=None, t_seg=DEFAULT_T_SEG, t_lm=DEFAULT_T_LM, kernel=DEFAULT_KERNEL,
                 iterations=None, device='cpu', slab=None, max_bytes=64 * 1024 ** 2):
    """`mp_nms` over a large (z, y, x) map read `slab` planes at a time (plus halo); same result as one pass.

    The map may be a numpy memmap; each slab is copied to float32 with its halo only. By default a slab
    holds about `max_bytes` of float32 (the pooling makes a few copies of it).
    """
    if iterations is None:
        iterations = default_iterations(diameter, kernel)
    nz = prob_map.shape[0]
    if slab is None:
        slab = max(8, int(max_bytes // (4 * int(np.prod(prob_map.shape[1:])))))
    margin = halo(kernel, iterations)
    all_idx, all_scores = [], []
    for z0 in range(0, nz, slab):
        z1 = min(nz, z0 + slab)
        a, b = max(0, z0 - margin), min(nz, z1 + margin)
        block = np.asarray(prob_map[a:b], dtype=np.float32)
        # Zero planes beyond the true volume border keep the mean filter's zero padding there; inner
        # halo planes are real data, so the core [z0, z1) is exact.
        idx, scores = mp_nms(block, t_seg=t_seg, t_lm=t_lm, kernel=kernel, iterations=iterations,
                             device=device)
        idx[:, 0] += a
        keep = (idx[:, 0] >= z0) & (idx[:, 0] < z1)
        all_idx.append(idx[keep])
        all_scores.append(scores[keep])
    idx = np.concatenate(all_idx) if all_idx else np.zeros((0, 3), int)
    scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
    order = np.lexsort((idx[:, 2], idx[:, 1], idx[:, 0], -scores)) if len(idx) else np.zeros(0, int)
    return idx[order], scores[order]


def deduplicate(points, scores, t_dist):
    """Indices of the points kept when every point closer than `t_dist` (strictly) to a better-scoring
    kept point is removed. `t_dist` is one distance, or one per point (a pair then uses the larger of its
    two). Ties in score go to the earlier point."""
    scores = np.asarray(scores, dtype=float)
    per_point = np.ndim(t_dist) > 0
    if per_point:
        t_dist = np.asarray(t_dist, dtype=float)
        if len(t_dist) != len(scores):
            raise ValueError(f"{len(t_dist)} de-duplication distances for {len(scores)} points")
    if len(scores) == 0 or not np.any(np.asarray(t_dist) > 0):
        return np.arange(len(scores))
    points = np.asarray(points, dtype=float).reshape(len(scores), -1)
    order = np.argsort(-scores, kind='stable')
    tree = cKDTree(points)
    reach = float(np.max(t_dist))
    removed = np.zeros(len(points), dtype=bool)
    keep = []
    for i in order:
        if removed[i]:
            continue
        keep.append(i)
        near = np.asarray(tree.query_ball_point(points[i], r=np.nextafter(reach, 0)), dtype=int)
        if per_point and len(near):
            dist = np.linalg.norm(points[near] - points[i], axis=1)
            near = near[dist < np.maximum(t_dist[near], t_dist[i])]
        removed[near[near != i]] = True
    return np.array(sorted(keep, key=lambda i: (-scores[i], i)), dtype=int)
