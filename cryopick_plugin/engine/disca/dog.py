"""Template-free candidate picking with a Difference of Gaussians (the picking step before DISCA).

Scale. A solid ball of radius r responds most strongly to a scale-normalised Laplacian of Gaussian of
σ = r/√3 (3D). The DoG G(σ1) − G(σ2) with σ2 = k·σ1 approximates that Laplacian at σ ≈ √(σ1σ2), so
σ1 = r / (√3·√k) and σ2 = k·σ1, with r = diameter/2 and k = `sigma_ratio` (1.6, the classic DoG ratio;
aitom's DISCA picker uses 1.1 with σ1 tied to 7 nm instead of to the particle).

Polarity. G(σ1) − G(σ2) is positive at the centre of a bright blob. 'dark' particles (the usual cryo-ET
contrast, and aitom's default) are picked on its negative, 'bright' on it, 'both' on its absolute value.

Score. Responses are divided by the robust standard deviation of the DoG map (1.4826 × median absolute
deviation, from a regular grid of voxels) after subtracting its median, so rlnAutopickFigureOfMerit is
"how many noise standard deviations" and a threshold means the same thing in every tomogram.

Peaks. A candidate is a voxel whose response is the largest in the cube of half-width
h = max(1, ⌊min_distance/√3⌋) around it (a cube inscribed in the min-distance ball, computed with a
separable maximum filter) and is positive. Candidates are then visited strongest first across the whole
volume and every weaker candidate closer than `min_distance` is dropped (greedy suppression), which also
settles ties on plateaus and across tile borders. Default min_distance = diameter/2 (one particle radius:
two particles in contact are a diameter apart, two maxima on one particle are closer than a radius).

Tiles. The volume (possibly a memory map larger than the RAM) is read in cubes of `tile` voxels plus a
halo of (Gaussian kernel radius of σ2 + h) voxels, so every response and maximum inside a cube is exactly
what a whole-volume computation gives: the tiled result equals the untiled one. Only float32 copies of
one tile are held at a time, plus the candidate list.

Border. Candidates closer than `exclude_border` voxels to a face are dropped (default ⌈diameter/4⌉: their
particle is cut by the face and their response comes partly from the mirrored padding).

Threshold without truth (`default_threshold`). The candidates' scores are a mixture of background maxima
(noise, fragments; mostly 0.5–3.5 noise standard deviations in a sparse tomogram) and particles. Two
Gaussians are fitted to the logarithm of the scores and the threshold is where the upper one becomes the
more probable, searched between the two means. When the two fitted components are not clearly separated
(Ashman's D < 2) the scores are one population and every candidate is kept (0.0): in a crowded tomogram
that population is the particles themselves; in a tomogram with a handful of particles among hundreds of
background maxima it is the background, and --threshold or a validation tomogram is needed (the command
says so). A fixed number of standard deviations does not carry over
between tomograms: in a crowded one the particles themselves inflate the noise estimate and compress every
score (best fixed thresholds ranged from 1.75 to 4.75 on simulated tomograms), while the mixture follows
the scores' own shape (bench/README.md, "DoG threshold").
"""
import math

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import cKDTree

from ..io import star
from ..errors import InputError

POLARITIES = ('dark', 'bright', 'both')
TRUNCATE = 4.0
# voxels in the regular grid used for the robust noise estimate
NOISE_SAMPLES = 1_000_000


def dog_sigmas(diameter, sigma_ratio=1.6):
    """(σ1, σ2) in voxels for particles of `diameter` voxels."""
    radius = float(diameter) / 2.0
    s1 = radius / (math.sqrt(3.0) * math.sqrt(sigma_ratio))
    return s1, s1 * sigma_ratio


def _kernel_radius(sigma):
    return int(TRUNCATE * float(sigma) + 0.5)  # what scipy.ndimage.gaussian_filter uses


def _check(volume, diameter, polarity, tile, sigma_ratio, min_distance, n_max):
    if getattr(volume, 'ndim', None) != 3:
        raise InputError('volume', f"expected a 3D volume, got shape {getattr(volume, 'shape', None)}")
    if min(volume.shape) < 2:
        raise InputError('volume', f"degenerate shape {tuple(volume.shape)}")
    if not (diameter and diameter >= 2):
        raise InputError('--diameter', f"must be at least 2 voxels, got {diameter}")
    if diameter > max(volume.shape):
        raise InputError('--diameter', f"{diameter:g} voxels is larger than the volume {tuple(volume.shape)}")
    if polarity not in POLARITIES:
        raise InputError('--polarity', f"must be one of {', '.join(POLARITIES)}, got {polarity!r}")
    if int(tile) < 8:
        raise InputError('tile', f"must be at least 8 voxels, got {tile}")
    if not sigma_ratio > 1:
        raise InputError('sigma_ratio', f"must be above 1, got {sigma_ratio}")
    if min_distance is not None and not min_distance > 0:
        raise InputError('--min-distance', f"must be positive, got {min_distance}")
    if n_max is not None and int(n_max) < 1:
        raise InputError('--max-picks', f"must be at least 1, got {n_max}")


def _grid_start(lo, stride):
    return (-lo) % stride


def dog_pick(volume, diameter, polarity='dark', threshold=None, n_max=None, min_distance=None, tile=128,
             sigma_ratio=1.6, exclude_border=None, volume_name=None):
    """Pick blob-like particles of `diameter` voxels in a 3D volume (z, y, x).

    threshold: keep picks whose normalised score is >= threshold (robust noise standard deviations;
    None keeps every positive maximum). n_max: keep at most this many, strongest first. min_distance:
    minimum distance between picks in voxels (default diameter/2). tile: cube edge of the tiles read at a
    time. exclude_border: drop picks closer than this to a face (default ceil(diameter/4)).
    volume_name: written as rlnTomoName when given.

    Returns a DataFrame sorted by decreasing score with rlnCoordinateX/Y/Z (voxels, origin at the first
    voxel), rlnClassNumber = 1 and rlnAutopickFigureOfMerit (the normalised DoG response).
    """
    _check(volume, diameter, polarity, tile, sigma_ratio, min_distance, n_max)
    min_distance = float(diameter) / 2.0 if min_distance is None else float(min_distance)
    exclude_border = int(math.ceil(diameter / 4.0)) if exclude_border is None else int(exclude_border)
    s1, s2 = dog_sigmas(diameter, sigma_ratio)
    half = max(1, int(math.floor(min_distance / math.sqrt(3.0))))
    halo = _kernel_radius(s2) + half
    shape = tuple(int(n) for n in volume.shape)
    tile = int(tile)
    stride = max(1, int(math.ceil((np.prod(shape, dtype=float) / NOISE_SAMPLES) ** (1.0 / 3.0))))

    cand_pos, cand_val, noise = [], [], []
    for z0 in range(0, shape[0], tile):
        for y0 in range(0, shape[1], tile):
            for x0 in range(0, shape[2], tile):
                core = [(z0, min(z0 + tile, shape[0])), (y0, min(y0 + tile, shape[1])),
                        (x0, min(x0 + tile, shape[2]))]
                pos, val, sample = _tile_candidates(volume, shape, core, halo, half, s1, s2, polarity,
                                                    exclude_border, stride)
                cand_pos.append(pos)
                cand_val.append(val)
                noise.append(sample)

    noise = np.concatenate(noise)
    centre = float(np.median(noise))
    scale = 1.4826 * float(np.median(np.abs(noise - centre)))
    if not scale > 0:
        scale = float(np.std(noise))
    if not scale > 0:
        raise InputError('volume', "has no contrast at the particle scale (constant DoG response)")
    pos = np.concatenate(cand_pos) if cand_pos else np.zeros((0, 3), dtype=np.int64)
    val = np.concatenate(cand_val) if cand_val else np.zeros(0)
    # noise samples are the signed response (for 'both' the DoG itself); scores follow the same scale
    score = np.abs(val - centre) / scale if polarity == 'both' else (val - centre) / scale
    if threshold is not None:
        keep = score >= float(threshold)
        pos, score = pos[keep], score[keep]
    chosen = suppress(pos, score, min_distance, n_max)
    pos, score = pos[chosen], score[chosen]
    table = star.coordinates_frame(pos[:, ::-1].astype(float), volume_name, scores=score)
    return table


def _tile_candidates(volume, shape, core, halo, half, s1, s2, polarity, border, stride):
    lo = [max(0, a - halo) for a, _ in core]
    hi = [min(n, b + halo) for (_, b), n in zip(core, shape)]
    region = np.asarray(volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], dtype=np.float32)
    if not np.all(np.isfinite(region)):
        raise InputError('volume', f"contains NaN or infinite values (in z {lo[0]}-{hi[0]})")
    dog = ndimage.gaussian_filter(region, s1, mode='reflect', truncate=TRUNCATE)
    dog -= ndimage.gaussian_filter(region, s2, mode='reflect', truncate=TRUNCATE)
    del region
    signed = dog if polarity == 'bright' else -dog if polarity == 'dark' else dog
    response = np.abs(dog) if polarity == 'both' else signed
    peaks = ndimage.maximum_filter(response, size=2 * half + 1, mode='reflect') == response
    # the core of this tile, in region indices
    sl = tuple(slice(a - l, b - l) for (a, b), l in zip(core, lo))
    core_peaks = peaks[sl] & (response[sl] > 0)
    idx = np.argwhere(core_peaks)
    values = signed[sl][core_peaks].astype(np.float64)
    pos = idx + np.array([a for a, _ in core])
    inside = np.all((pos >= border) & (pos <= np.array(shape) - 1 - border), axis=1)
    grid = tuple(slice(_grid_start(a, stride), None, stride) for a, _ in core)
    sample = signed[sl][grid].ravel().astype(np.float64)
    return pos[inside], values[inside], sample


def suppress(pos, score, min_distance, n_max=None):
    """Greedy suppression: indices of kept points, strongest first, no two closer than `min_distance`.

    Ties in score are broken by position (z, then y, then x) so the result does not depend on the order
    the candidates were found in.
    """
    pos = np.asarray(pos)
    if len(pos) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((pos[:, 2], pos[:, 1], pos[:, 0], -np.asarray(score)))
    tree = cKDTree(pos.astype(float))
    removed = np.zeros(len(pos), dtype=bool)
    kept = []
    for i in order:
        if removed[i]:
            continue
        kept.append(i)
        if n_max is not None and len(kept) >= n_max:
            break
        near = np.asarray(tree.query_ball_point(pos[i].astype(float), min_distance), dtype=np.int64)
        if near.size:
            d = np.linalg.norm(pos[near] - pos[i], axis=1)
            removed[near[d < min_distance]] = True
    return np.asarray(kept, dtype=np.int64)


def _as_list(dfs):
    return [dfs] if isinstance(dfs, pd.DataFrame) else list(dfs)


def threshold_curve(score_dfs, truth_dfs, radius, n_thresholds=200):
    """Localisation precision/recall/F1 (optimal matching, summed over volumes) at candidate thresholds.

    score_dfs, truth_dfs: one table each, or lists of tables of the same length (one per tomogram; row
    groups by rlnTomoName are honoured within a table as well). Returns a dict of arrays 'threshold'
    (decreasing), 'tp', 'n_pred', 'precision', 'recall', 'f1'.
    """
    from .. import evaluate
    preds, truths = _as_list(score_dfs), _as_list(truth_dfs)
    if len(preds) != len(truths):
        raise InputError('validation', f"{len(preds)} score tables for {len(truths)} truth tables")
    for df in preds:
        if star.SCORE not in df.columns:
            raise InputError('validation', f"score table without {star.SCORE}")
    all_scores = np.concatenate([df[star.SCORE].to_numpy(dtype=float) for df in preds]) if preds else []
    if len(all_scores) == 0:
        raise InputError('validation', "no scored picks")
    thresholds = evaluate.candidate_thresholds(all_scores, n_thresholds)
    n_true = sum(len(t) for t in truths)
    rows = []
    for t in thresholds:
        tp = n_pred = 0
        for p_df, t_df in zip(preds, truths):
            kept = p_df[p_df[star.SCORE].to_numpy(dtype=float) >= t]
            n_pred += len(kept)
            if len(kept) and len(t_df):
                tp += len(evaluate.pair_rows(kept, t_df, radius)[0])
        m = evaluate.counts_to_metrics(tp, n_pred, n_true)
        rows.append((t, tp, n_pred, m['precision'], m['recall'], m['f1']))
    arr = np.asarray(rows, dtype=float)
    return {k: arr[:, i] for i, k in enumerate(('threshold', 'tp', 'n_pred', 'precision', 'recall', 'f1'))}


# Fewer candidates than this do not support a two-component fit: every candidate is kept.
MIN_FOR_MIXTURE = 20
# Ashman's D of the two fitted components below which they are taken for one population (D > 2: two
# clearly separated modes, Ashman, Bird & Zepf 1994). Crowded simulated tomograms gave D 0.04–0.75 (their
# candidates are the particles, as many as the minimum distance lets fit), sparse ones 2.6–4.9.
MIN_SEPARATION = 2.0


def default_threshold(scores, min_candidates=MIN_FOR_MIXTURE):
    """A score threshold from the candidates' scores alone (module doc): 0.0 keeps every candidate."""
    return threshold_from_scores(scores, min_candidates)[0]


def threshold_from_scores(scores, min_candidates=MIN_FOR_MIXTURE):
    """(threshold, how it was found): 'too few', 'one population' (both 0.0) or 'two populations'."""
    scores = np.asarray(scores, dtype=float).ravel()
    scores = scores[np.isfinite(scores)]
    if len(scores) < int(min_candidates) or np.ptp(scores) <= 0:
        return 0.0, 'too few'
    from sklearn.mixture import GaussianMixture
    # scores are positive maxima; the floor only keeps log() finite for the weakest ones
    x = np.log(np.maximum(scores, 0.01))[:, None]
    gmm = GaussianMixture(2, n_init=3, random_state=0).fit(x)
    lo, hi = np.argsort(gmm.means_[:, 0])
    means, spreads = gmm.means_[:, 0], np.sqrt(gmm.covariances_.reshape(2))
    separation = math.sqrt(2.0) * (means[hi] - means[lo]) / math.sqrt(spreads[lo] ** 2 + spreads[hi] ** 2)
    if separation < MIN_SEPARATION:
        # One population split in two by the fit, not background plus particles: keep every candidate.
        return 0.0, 'one population'
    grid = np.linspace(means[lo], means[hi], 1001)[:, None]
    # Between the means only: the component with the larger spread is also the more probable far out in
    # the other component's tail, which is no place for a threshold.
    upper = gmm.predict_proba(grid)[:, hi] >= 0.5
    if not upper.any():
        return 0.0, 'one population'
    return float(np.exp(grid[int(np.argmax(upper)), 0])), 'two populations'


def choose_threshold(score_dfs, truth_dfs, radius, n_thresholds=200):
    """The score threshold with the best localisation F1 on validation data (see `threshold_curve`).

    Ties go to the highest threshold (fewest picks). Returns a float: keep picks with score >= it.
    """
    curve = threshold_curve(score_dfs, truth_dfs, radius, n_thresholds)
    return float(curve['threshold'][int(np.argmax(curve['f1']))])
