"""Training a DeepETPicker 3D-ResUNet from tomograms, weak label maps and particle centres.

Samples. Each epoch draws as many patches as there are annotated particles, centred on a particle with a
uniform integer jitter of ± patch//5 voxels (as the reference) — with several classes drawn class-balanced
(every class equally often, with replacement; `class_balance=False` draws each particle once, as the
reference) — plus `bg_fraction` × that many background patches at uniformly random places or, for a
share `hard_fraction` of them (default none), centred on unlabelled blobs found by DoG (hard negatives:
other complexes, fiducials, membranes; see `find_hard_negatives` and bench/README §1.1 for what they did).
Particle-centred patches almost never show the empty parts of a tomogram (ice far from particles, the
volume's top and bottom, carbon edges); without a few random patches the network never learns to stay
silent there and inference fills those regions with false positives.

Augmentation. Random mirror on each axis and a random multiple of 90° about z (both exact on the voxel
grid), and with probability `p_affine` a small rotation (±15° about a random axis) combined with a scaling
of 0.95–1.05 (linear interpolation for the data, nearest for the labels). No elastic deformation.

Normalisation. Per tomogram standardisation, (x − mean) / std with statistics computed slab-wise
(`mrc.volume_stats`), the reference's default; the tomograms are never loaded whole.

Loss. Soft Dice (smooth = 1) per output channel over the whole batch, averaged over channels (background
channel included for several classes, as the reference), plus `ce_weight` × binary / categorical cross
entropy. Dice alone is scale-free with respect to the tiny foreground fraction of weak labels but gives weak
gradients at the start; a little cross entropy speeds up the first epochs (ce_weight=0 is the reference).

Optimisation. AdamW (β = 0.9, 0.99; weight decay 0.01) with a one-cycle learning rate (10% warm-up,
cosine annealing, start lr/30, end lr/3000) stepped every batch (constant lr for runs under 20 batches).
With a time budget the cycle follows the training time as well as the steps (`schedule.OneCycle`): a run
ends at the bottom of its cycle however many steps the machine managed.

Validation, every `val_every` epochs: Dice loss on patches at the validation particles, then the real
picking (overlap tiles + MP-NMS) on a validation sub-volume and one-to-one matching (Hungarian, within
`match_radius`; class by class when there are several, so a pick of the wrong class is an error) of picks
to the true centres, giving precision P, recall R, F1 and the paper's score
P·R^α / (P + R^α) (α = 3 favours recall). The best model by that score is kept (written to `out_model` each
time it improves); training stops after `patience` validations without improvement. When no validation
tomogram is given, the last 20% of the first training tomogram along y is held out (its particles are not
trained on). Finally t_seg and t_lm can be tuned for F1 on the validation map (grid search) and stored in the
model, so picking uses them by default. When the validation F1 stays 0 for ZERO_F1_CHECKS validations in a
row, training warns (thresholds, label diameter or too short a training; the kept model is then only the
lowest validation loss).

Progress, time budget, resuming. The run starts with a line naming the device and precision; every few
seconds a line gives the steps done in the epoch, the rate and the ETA (`progress.Progress`; validation
maps likewise). With `time_budget` (minutes of wall clock, counted from the call) training stops when the
budget is spent — checked after every step — leaving time for what a run always does at its end (a
validation of the last weights unless just done, threshold tuning), estimated from the validations so
far (before the first, from the step time), and the tuning stops at the budget's end (grid searched from the
defaults outwards); the best model so far is kept and the stop is recorded (meta 'stop_reason'). After every epoch the whole training state goes to <out_model>.checkpoint.pt
(`checkpoint.py`): a run with the same settings resumes from it (`resume='auto'`), taking the same steps
as an uninterrupted run; it is removed when training ends, and kept after a time-budget stop so that the
same command continues the training.
"""
import copy
import csv
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass

import numpy as np

from ..io import model_io, mrc, star
from . import mpnms
from .. import checkpoint
from ..errors import InputError
from ..progress import Progress, compute_summary, duration
from .labels import radius_of
from .picking import METHOD, count_tiles, find_peaks, model_predictor, probability_map, read_window
from .resunet3d import PRESETS, build
from .schedule import OneCycle

log = logging.getLogger(__name__)

T_SEG_GRID = (0.3, 0.4, 0.5, 0.6, 0.7)
T_LM_GRID = (0.05, 0.1, 0.2, 0.3, 0.5)
# Consecutive validations with F1 0 after which training warns: the checkpoint is then chosen by validation
# loss alone, which says nothing about whether picking will find anything.
ZERO_F1_CHECKS = 3


def package_version():
    """cryopick's version read from constants.py (importing the package would set up Scipion)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'constants.py')
    try:
        with open(path) as fh:
            found = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", fh.read())
        return found.group(1) if found else 'unknown'
    except OSError:
        return 'unknown'


# ------------------------------------------------------------------------------------------- matching
def match_points(pred_xyz, true_xyz, radius):
    """One-to-one matching of predictions to truth within `radius` (Hungarian on distances).

    Returns (pairs (K, 2) of (pred index, true index), distances (K,)).
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist
    pred_xyz = np.asarray(pred_xyz, dtype=float).reshape(-1, 3)
    true_xyz = np.asarray(true_xyz, dtype=float).reshape(-1, 3)
    if len(pred_xyz) == 0 or len(true_xyz) == 0:
        return np.zeros((0, 2), int), np.zeros(0)
    d = cdist(pred_xyz, true_xyz)
    cost = np.where(d <= radius, d, 1e6)
    rows, cols = linear_sum_assignment(cost)
    ok = d[rows, cols] <= radius
    return np.stack([rows[ok], cols[ok]], 1), d[rows[ok], cols[ok]]


def pick_scores(pred_xyz, true_xyz, radius, alpha=3.0):
    """precision, recall, F1 and the DeepETPicker score P·R^α/(P+R^α) of predictions against truth."""
    pairs, _ = match_points(pred_xyz, true_xyz, radius)
    tp = len(pairs)
    p = tp / len(pred_xyz) if len(pred_xyz) else 0.0
    r = tp / len(true_xyz) if len(true_xyz) else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    ra = r ** alpha
    score = p * ra / (p + ra) if p + ra else 0.0
    return {'precision': p, 'recall': r, 'f1': f1, 'score': score, 'tp': tp,
            'n_pred': int(len(pred_xyz)), 'n_true': int(len(true_xyz))}


# ---------------------------------------------------------------------------------------------- data
@dataclass
class Tomo:
    name: str
    data: object          # memmap (z, y, x)
    labels: object        # memmap (z, y, x) uint8
    voxel: float
    mean: float
    std: float
    zyx: np.ndarray       # particle centres, int (N, 3)
    classes: np.ndarray   # (N,)
    region: tuple = None  # (lo, hi) (z, y, x) of the part patches may come from; None = all
    hard: np.ndarray = None  # (M, 3) int zyx of unlabelled blobs (hard negatives), or None


def load_item(item, role='train'):
    """(tomogram path, label-map path, coordinate table) → Tomo, with the checks on its input."""
    try:
        tomo_path, label_path, table = item
    except (TypeError, ValueError):
        raise InputError(role, "an item is (tomogram, label map, coordinate table)") from None
    data, voxel, stats = mrc.open_checked(tomo_path, ndim=3)
    labels, _ = mrc.open_volume(label_path, ndim=3)
    if labels.shape != data.shape:
        raise InputError(label_path, f"label map shape {labels.shape} differs from the tomogram's {data.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise InputError(label_path, f"label map must hold integer classes, found {labels.dtype}")
    if table is None or len(table) == 0:
        raise InputError(tomo_path, "no particle coordinates for this tomogram")
    star.check_inside(tomo_path, table, data.shape)
    zyx = np.rint(star.xyz_array(table)[:, ::-1]).astype(int)
    classes = table[star.CLASS].to_numpy(dtype=int) if star.CLASS in table.columns \
        else np.ones(len(table), int)
    top = max(int(np.max(labels[sl])) for sl in mrc.iter_slabs(labels.shape))
    if top == 0:
        raise InputError(label_path, "label map is empty (all background)")
    if top > classes.max():
        raise InputError(label_path, f"label map holds class {top} but the coordinates only go to "
                                     f"class {classes.max()}")
    name = os.path.splitext(os.path.basename(os.fspath(tomo_path)))[0]
    return Tomo(name, data, labels, voxel, stats['mean'], stats['std'], zyx, classes)


def patch_start(centre, patch, lo, hi):
    """Window start per axis: centred on `centre`, kept inside [lo, hi) when the patch fits."""
    start = np.asarray(centre) - patch // 2
    room = np.asarray(hi) - np.asarray(lo)
    inside = np.clip(start, lo, np.asarray(hi) - patch)
    return np.where(room >= patch, inside, np.asarray(lo))


def read_patch(t, start, patch):
    x = read_window(t.data, start, patch, t.mean, t.std, 'zero')
    y = read_window(t.labels, start, patch, 0.0, 1.0, 'zero').astype(np.uint8)
    return x, y


def augment(x, y, rng, p_affine=0.2):
    """Mirror / 90° about z always available; small rotation + scaling with probability p_affine."""
    for axis in range(3):
        if rng.random() < 0.5:
            x, y = np.flip(x, axis), np.flip(y, axis)
    k = int(rng.integers(4))
    if k:
        x, y = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k, axes=(1, 2))
    if rng.random() < p_affine:
        from scipy.ndimage import affine_transform
        from scipy.spatial.transform import Rotation
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        angle = np.deg2rad(rng.uniform(-15, 15))
        m = Rotation.from_rotvec(axis * angle).as_matrix() / rng.uniform(0.95, 1.05)
        c = (np.array(x.shape) - 1) / 2.0
        off = c - m @ c
        x = affine_transform(np.ascontiguousarray(x), m, offset=off, order=1, mode='nearest')
        y = affine_transform(np.ascontiguousarray(y), m, offset=off, order=0, mode='nearest')
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


def find_hard_negatives(t, particle_diameter, min_distance, n_max):
    """Unlabelled blobs of a training tomogram: DoG picks (particle polarity, the particles' median size)
    at least `min_distance` voxels from every annotated centre and inside the trainable region.

    Real tomograms hold many dense objects nobody annotated — other complexes, gold fiducials, membranes,
    ice contamination — and these, not empty ice, are where a picker trained only on particle-centred and
    random patches fires falsely (measured on the simulated benchmark: half of the large classes' picks
    sat on distractor proteins, beads and vesicles). Patches centred on them are background patches the
    network would otherwise almost never see.
    """
    from scipy.spatial import cKDTree
    from ..disca.dog import dog_pick
    picks = dog_pick(t.data, particle_diameter, 'dark', n_max=n_max)
    if not len(picks):
        return np.zeros((0, 3), int)
    zyx = np.rint(star.xyz_array(picks)[:, ::-1]).astype(int)
    score = picks[star.SCORE].to_numpy(dtype=float)
    if len(t.zyx):
        dist, _ = cKDTree(t.zyx).query(zyx)
        on_particle = dist < min_distance
        # Only blobs as strong as the annotated particles are objects; weaker DoG maxima are noise, and
        # random background patches already cover noise.
        floor = np.quantile(score[on_particle], 0.1) if on_particle.sum() >= 3 else -np.inf
        keep = ~on_particle & (score >= floor)
        zyx = zyx[keep]
    if t.region is not None:
        lo, hi = np.asarray(t.region[0]), np.asarray(t.region[1])
        zyx = zyx[np.all((zyx >= lo) & (zyx < hi), axis=1)]
    return zyx


def epoch_samples(tomos, patch, rng, bg_fraction, class_balance=False, hard_fraction=0.0):
    """(tomo index, centre zyx) of one epoch: particles jittered, plus background centres.

    Background centres are uniformly random, except that a `hard_fraction` of them is drawn (jittered) from
    the tomograms' hard negatives (`Tomo.hard`, see `find_hard_negatives`) when there are any.

    Without `class_balance` every particle is drawn once. With it the epoch has the same number of particle
    patches, but drawn with replacement so that every class is drawn equally often: in crowded cells the
    abundant small complexes outnumber the rare big ones by ten to one, and an unbalanced epoch teaches the
    network the abundant class long before it sees enough of the rare ones to tell them apart.
    """
    jitter = patch // 5
    pool = [(i, c, k) for i, t in enumerate(tomos)
            for c, k in zip(t.zyx[_trainable(t)], t.classes[_trainable(t)])]
    if class_balance and pool:
        classes = np.array([k for _, _, k in pool])
        counts = {k: int(np.sum(classes == k)) for k in np.unique(classes)}
        weight = np.array([1.0 / counts[k] for k in classes])
        chosen = rng.choice(len(pool), size=len(pool), replace=True, p=weight / weight.sum())
        pool = [pool[j] for j in chosen]
    out = [(i, c + rng.integers(-jitter, jitter + 1, size=3)) for i, c, _ in pool]
    n_bg = int(round(bg_fraction * len(out)))
    with_hard = [i for i, t in enumerate(tomos) if t.hard is not None and len(t.hard)]
    for _ in range(n_bg):
        if with_hard and rng.random() < hard_fraction:
            i = with_hard[int(rng.integers(len(with_hard)))]
            centre = tomos[i].hard[int(rng.integers(len(tomos[i].hard)))]
            out.append((i, centre + rng.integers(-jitter, jitter + 1, size=3)))
            continue
        i = int(rng.integers(len(tomos)))
        lo, hi = tomos[i].region or ((0, 0, 0), tomos[i].data.shape)
        out.append((i, np.array([rng.integers(a, b) for a, b in zip(lo, hi)])))
    order = rng.permutation(len(out))
    return [out[k] for k in order]


def _trainable(t):
    if t.region is None:
        return np.ones(len(t.zyx), bool)
    lo, hi = np.asarray(t.region[0]), np.asarray(t.region[1])
    return np.all((t.zyx >= lo) & (t.zyx < hi), axis=1)


# ---------------------------------------------------------------------------------------------- loss
def seg_loss(logits, target, n_classes, ce_weight=0.0, smooth=1.0):
    """Soft Dice (+ ce_weight × cross entropy). target: (B, D, H, W) integer classes."""
    import torch
    import torch.nn.functional as F
    dims = (0, 2, 3, 4)
    if n_classes == 1:
        prob = torch.sigmoid(logits)
        onehot = (target > 0).float()[:, None]
    else:
        prob = torch.softmax(logits, 1)
        onehot = F.one_hot(target.long(), n_classes + 1).permute(0, 4, 1, 2, 3).float()
    inter = (prob * onehot).sum(dims)
    dice = (2 * inter + smooth) / (prob.sum(dims) + onehot.sum(dims) + smooth)
    loss = 1 - dice.mean()
    if ce_weight:
        if n_classes == 1:
            loss = loss + ce_weight * F.binary_cross_entropy_with_logits(logits, onehot)
        else:
            loss = loss + ce_weight * F.cross_entropy(logits, target.long())
    return loss


# ------------------------------------------------------------------------------------------ validation
def validation_set(val_tomos, train_tomos, max_side=(96, 160, 160), holdout=0.2):
    """[(tomo, (lo, hi) crop, true centres zyx in the crop, classes)] for picking validation.

    Without validation tomograms the last `holdout` of the first training tomogram along y is held out and
    that tomogram's training region shrinks accordingly.
    """
    out = []
    if val_tomos:
        for t in val_tomos:
            shape = np.array(t.data.shape)
            side = np.minimum(shape, max_side)
            lo = (shape - side) // 2
            out.append((t, lo, lo + side))
    else:
        t = train_tomos[0]
        shape = np.array(t.data.shape)
        split = int(round(shape[1] * (1 - holdout)))
        if split < 1 or split >= shape[1]:
            raise InputError(t.name, "too small to hold out a validation region; give a validation tomogram")
        t.region = ((0, 0, 0), (shape[0], split, shape[2]))
        lo = np.array([0, split, 0])
        hi = np.minimum(shape, lo + np.array(max_side))
        zlo = max(0, (shape[0] - max_side[0]) // 2)
        lo[0], hi[0] = zlo, min(shape[0], zlo + max_side[0])
        xlo = max(0, (shape[2] - max_side[2]) // 2)
        lo[2], hi[2] = xlo, min(shape[2], xlo + max_side[2])
        out.append((t, lo, hi))
    result = []
    for t, lo, hi in out:
        inside = np.all((t.zyx >= lo) & (t.zyx < hi), axis=1)
        result.append((t, tuple(int(v) for v in lo), tuple(int(v) for v in hi), t.zyx[inside] - lo,
                       t.classes[inside]))
    return result


def _val_maps(model, vset, patch, pad, n_classes, device, batch_size, precision='auto', flip_average=False,
              padding='zero', say=None):
    """Probability maps of the validation crops; `say` receives progress lines (tiles done, ETA)."""
    maps = []
    predictor = model_predictor(model, device, precision, flip_average)
    for t, lo, hi, _, _ in vset:
        crop = np.asarray(t.data[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], dtype=np.float32)
        progress = Progress(f'validation map {t.name}', _n_tiles([(t, lo, hi)], patch, pad), unit='tile',
                            say=say) if say else None
        maps.append(probability_map(crop, predictor, n_classes, patch, pad, batch_size, t.mean, t.std, padding,
                                    progress=progress))
    return maps


def _n_tiles(vset, patch, pad):
    return sum(count_tiles(tuple(int(h - l) for l, h in zip(v[1], v[2])), patch, pad) for v in vset)


def _val_scores(maps, vset, diameters, thresholds, match_radius, alpha, device):
    """Picking scores on the validation maps. With several classes a pick counts only when its class is the
    true particle's (matching class by class), so checkpoints and thresholds are chosen for telling the
    classes apart, not only for finding particles."""
    tp = n_pred = n_true = 0
    for prob, (_, _, _, truth, truth_cls) in zip(maps, vset):
        zyx, cls, _ = find_peaks(prob, diameters, device=device, **thresholds)
        if prob.shape[0] == 1:
            groups = [(zyx, truth)]
        else:
            groups = [(zyx[cls == c], truth[truth_cls == c]) for c in range(1, prob.shape[0] + 1)]
        for picked, true in groups:
            s = pick_scores(picked, true, match_radius, alpha)
            tp, n_pred, n_true = tp + s['tp'], n_pred + s['n_pred'], n_true + s['n_true']
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_true if n_true else 0.0
    ra = r ** alpha
    return {'precision': p, 'recall': r, 'f1': 2 * p * r / (p + r) if p + r else 0.0,
            'score': p * ra / (p + ra) if p + ra else 0.0, 'n_pred': n_pred, 'n_true': n_true}


def tune_thresholds(maps, vset, diameters, base, match_radius, alpha, device, deadline=None):
    """Grid search of t_seg × t_lm on validation maps; returns (best thresholds, their scores).

    The operating point maximises F1 (ties: the recall-weighted score, then the defaults). The paper's
    P·R^α/(P+R^α) stays the checkpoint criterion, where favouring recall early in training is useful; as a
    threshold criterion it drives the thresholds down until the picks are mostly false positives (α = 3
    rewards a recall gain of 0.1 more than a precision loss of 0.3).

    The grid is searched from the defaults outwards (the result is the same in any order). deadline
    (time.monotonic() value): stop there, after the defaults at least — a poorly trained map can take long to
    score at low thresholds, where nearly every voxel is foreground; scores['grid_points'] says how many of
    the grid were tried.
    """
    grid = sorted(((t_seg, t_lm) for t_seg in T_SEG_GRID for t_lm in T_LM_GRID),
                  key=lambda p: (abs(p[0] - 0.5), abs(p[1] - 0.1)))
    best, tried = None, 0
    for t_seg, t_lm in grid:
        if best is not None and deadline is not None and time.monotonic() >= deadline:
            break
        thr = dict(base, t_seg=t_seg, t_lm=t_lm)
        s = _val_scores(maps, vset, diameters, thr, match_radius, alpha, device)
        tried += 1
        key = (round(s['f1'], 6), s['score'], -abs(t_seg - 0.5), -abs(t_lm - 0.1))
        if best is None or key > best[0]:
            best = (key, thr, s)
    return best[1], dict(best[2], grid_points=tried)


# ---------------------------------------------------------------------------------------------- train
def _default_log(record):
    if isinstance(record, dict):
        log.info(' '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in record.items()))
    else:
        log.info('%s', record)


def train(train_items, val_items, out_model, preset='cpu', epochs=30, batch_size=None, lr=None,
          device='auto', seed=0, alpha=3.0, val_every=2, patience=5, log=None, diameters=None,
          label_kind='tball', patch=None, pad=None, widths=None, norm='bn', bg_fraction=0.1, ce_weight=0.5,
          p_affine=0.2, match_radius=None, tune=True, thresholds=None, max_steps_per_epoch=None,
          class_balance=True, hard_fraction=0.0, precision='auto', time_budget=None, resume='auto'):
    """Train a 3D-ResUNet and write the best model to `out_model`; return the model's meta dict.

    train_items / val_items: lists of (tomogram path, label-map path, coordinate DataFrame with
    rlnCoordinateX/Y/Z and rlnClassNumber) — the table holds this tomogram's particles only. diameters:
    label diameter in voxels, scalar or {class: d}; None measures it on the label maps. preset 'cpu' or
    'paper' gives widths, patch, pad, batch size and lr unless given. patience counts validations.
    `log` receives one dict per epoch (and a few others: hard negatives, tuned thresholds) and the
    progress lines (str: device and precision at the start, steps / rate / ETA within epochs and
    validations, resuming, stopping). max_steps_per_epoch caps the batches of an epoch (the epoch's
    shuffled samples are cut, so each epoch sees a different random subset). hard_fraction: share of the
    background patches centred on unlabelled blobs (`find_hard_negatives`; 0 = all random, the reference).
    precision: 'auto', 'fp32' or 'bf16' arithmetic for the convolutions (`settings.resolve_precision`;
    weights, optimiser and loss stay fp32).
    time_budget: minutes of wall clock for the whole call (None: no limit); training stops early enough
    for the final validation and tuning (module doc) and meta['stop_reason'] says 'time budget'.
    resume: 'auto' (continue from <out_model>.checkpoint.pt when it holds a run with the same settings),
    True (require it) or False (start afresh); see `checkpoint.py`.
    A learning curve is written beside the model as <out_model>.history.csv and .history.json.
    """
    import torch
    from .labels import estimate_diameters
    from ..settings import autocast, memory_format, resolve_device, resolve_precision
    t_begin = time.monotonic()
    log = log or _default_log
    warn = logging.getLogger(__name__).warning
    if time_budget is not None and not float(time_budget) > 0:
        raise InputError('--time-budget', f"must be a positive number of minutes, got {time_budget:g}")
    deadline = t_begin + 60.0 * float(time_budget) if time_budget else None
    checkpoint.check(checkpoint.path_for(out_model), resume)
    if preset not in PRESETS:
        raise InputError('--preset', f"unknown preset {preset!r} ({', '.join(PRESETS)})")
    cfg = PRESETS[preset]
    patch = int(patch or cfg['patch'])
    pad = int(cfg['pad'] if pad is None else pad)
    batch_size = int(batch_size or cfg['batch_size'])
    lr = float(lr or cfg['lr'])
    widths = tuple(widths or cfg['widths'])
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise InputError('options', "epochs, batch size and learning rate must be positive")
    if not train_items:
        raise InputError('--train', "no training tomogram given")
    device = resolve_device(device)
    requested_precision, precision = precision, resolve_precision(precision, device)
    layout = memory_format(5, precision)
    # said first: loading the tomograms and measuring them can take a while
    log(f'train3d: {compute_summary(device, precision, requested_precision)}')

    tomos = [load_item(it, 'train') for it in train_items]
    val_tomos = [load_item(it, 'val') for it in (val_items or [])]
    voxels = {round(t.voxel, 4) for t in tomos + val_tomos}
    if max(voxels) > 0 and (max(voxels) - min(voxels)) > 0.01 * max(voxels):
        raise InputError('--train', f"tomograms have different voxel sizes ({sorted(voxels)} Å)")
    all_classes = np.concatenate([t.classes for t in tomos])
    n_classes = int(all_classes.max())
    missing = sorted(set(range(1, n_classes + 1)) - set(all_classes.tolist()))
    if missing or all_classes.min() < 1:
        raise InputError('--train', f"class(es) {missing or [int(all_classes.min())]} have no training particles; "
                                    f"classes must be numbered 1..N with particles in each")
    val_classes = set(np.concatenate([t.classes for t in val_tomos]).tolist()) if val_tomos else set()
    if val_classes - set(range(1, n_classes + 1)):
        raise InputError('--val', f"validation classes {sorted(val_classes)} not among the training classes")

    if diameters is None:
        measured = {}
        for t in tomos:
            for c, d in estimate_diameters(t.labels, t.zyx[:, ::-1], t.classes).items():
                measured.setdefault(c, []).append(d)
        diameters = {c: int(np.median(v)) for c, v in measured.items()}
        if set(diameters) != set(range(1, n_classes + 1)):
            raise InputError('--train', "could not measure the label diameter of every class on the label "
                                        "maps; give the diameter")
    elif not isinstance(diameters, dict):
        diameters = {c: diameters for c in range(1, n_classes + 1)}
    diameters = {int(c): int(d) for c, d in diameters.items()}
    for c, d in diameters.items():
        radius_of(d)
        if d > patch - 2 * pad:
            raise InputError('diameter', f"label diameter {d} (class {c}) does not fit the kept centre of a "
                                         f"{patch}³ patch with pad {pad}; use a larger patch or bin the tomograms")

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    vset = validation_set(val_tomos, tomos)
    if not any(len(t.zyx[_trainable(t)]) for t in tomos):
        raise InputError('--train', "no training particle left outside the validation region")
    # iterations / t_dist None: derived from the label diameters in pick3d.find_peaks
    base_thr = {'t_seg': mpnms.DEFAULT_T_SEG, 't_lm': mpnms.DEFAULT_T_LM, 'kernel': mpnms.DEFAULT_KERNEL,
                'iterations': None, 't_dist': None}
    base_thr.update(thresholds or {})
    match_radius = float(match_radius or max(2.0, min(diameters.values()) / 2.0))
    n_hard = 0
    if hard_fraction and bg_fraction:
        # label diameters are about half the particle's: DoG at the particles' median size, and a blob
        # counts as unlabelled when it is further than the largest particle's radius from every centre
        label_d = sorted(diameters.values())
        for t in tomos:
            t.hard = find_hard_negatives(t, 2.0 * float(np.median(label_d)), float(max(label_d)),
                                         n_max=max(50, 4 * len(t.zyx)))
            n_hard += len(t.hard)
        log({'hard_negatives': n_hard})

    model = build(preset, n_classes=n_classes, widths=widths, norm=norm).to(device).to(memory_format=layout)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    n_samples = len(epoch_samples(tomos, patch, np.random.default_rng(0), bg_fraction))
    steps = max(1, math.ceil(n_samples / batch_size))
    if max_steps_per_epoch:
        steps = min(steps, int(max_steps_per_epoch))
    total_steps = epochs * steps
    # One cycle over the planned steps or, with a time budget, over the training time (schedule.py); too
    # few steps for a warm-up phase without a budget: constant learning rate.
    sched = OneCycle(opt, lr, total_steps, pct_start=0.1, div_factor=30, final_div_factor=100,
                     constant=total_steps < 20 and deadline is None)
    n_step = 0
    # fixed validation patches for the loss
    vrng = np.random.default_rng(seed + 1)
    val_patches = []
    for t, lo, hi, truth, _ in vset:
        for c in truth[:64]:
            centre = c + lo + vrng.integers(-(patch // 5), patch // 5 + 1, size=3)
            val_patches.append(read_patch(t, patch_start(centre, patch, lo, hi), patch))

    arch = model.arch()
    meta = {'voxel_size': float(tomos[0].voxel), 'classes': list(range(1, n_classes + 1)),
            'diameters': {str(c): d for c, d in sorted(diameters.items())}, 'label_kind': label_kind,
            'normalisation': 'standardise per tomogram (mean, std over the whole volume)',
            'patch': patch, 'pad_infer': pad, 'thresholds': dict(base_thr), 'preset': preset,
            'match_radius': match_radius, 'alpha': alpha, 'class_balance': bool(class_balance), 'lr': lr,
            'batch_size': batch_size, 'seed': seed, 'bg_fraction': bg_fraction, 'hard_fraction': hard_fraction,
            'hard_negatives': n_hard, 'precision': precision,
            'train_tomograms': [t.name for t in tomos], 'val_tomograms': [v[0].name for v in vset],
            'cryopick_version': package_version(), 'model_format_version': model_io.FORMAT_VERSION}
    n_particles = sum(int(_trainable(t).sum()) for t in tomos)
    log(f"train3d: {len(tomos)} training tomogram(s), {n_particles} particles, {n_classes} class(es); validation "
        f"on {', '.join(meta['val_tomograms'])}; up to {epochs} epochs × {steps} steps of {batch_size} "
        f"patch(es) of {patch}³" + (f'; time budget {duration(60.0 * float(time_budget))}' if deadline else ''))

    # Everything that shapes the run's steps: a checkpoint made with other values is not resumed.
    resume_settings = {'train': [_fingerprint(t) for t in tomos], 'val': [_fingerprint(t) for t in val_tomos],
                       'preset': preset, 'epochs': epochs, 'steps_per_epoch': steps, 'batch_size': batch_size,
                       'lr': lr, 'widths': list(widths), 'norm': norm, 'patch': patch, 'pad': pad,
                       'diameters': meta['diameters'], 'bg_fraction': bg_fraction, 'hard_fraction': hard_fraction,
                       'class_balance': bool(class_balance), 'ce_weight': ce_weight, 'p_affine': p_affine,
                       'val_every': val_every, 'alpha': alpha, 'match_radius': match_radius,
                       'thresholds': base_thr, 'seed': seed}
    ckpt_path = checkpoint.path_for(out_model)
    saved = checkpoint.load(ckpt_path, resume_settings, resume, say=warn)
    history, best, best_state, since_best, n_step, first_epoch = [], None, None, 0, 0, 1
    zero_epochs, warnings, previous_seconds = [], [], 0.0
    if saved is not None:
        model.load_state_dict(saved['model'])
        opt.load_state_dict(saved['optimizer'])
        sched.load_state_dict(saved['scheduler'])
        checkpoint.restore_rng(saved['rng'], rng)
        history, best, best_state = saved['history'], saved['best'], saved['best_state']
        since_best, n_step, zero_epochs = saved['since_best'], saved['n_step'], saved['zero_epochs']
        warnings, previous_seconds, first_epoch = saved['warnings'], saved['train_seconds'], saved['epoch'] + 1
        meta.update(saved['meta'])
        log(f'train3d: resuming from {ckpt_path} after epoch {saved["epoch"]} ({n_step} steps done'
            + (f', best epoch {best[1]}, validation F1 {best[2]["val_f1"]:.3f})' if best else ')'))

    timing, kept = {}, {}
    n_val_tiles = _n_tiles(vset, patch, pad)
    val_voxels = sum(int(np.prod(np.subtract(v[2], v[1]))) for v in vset)

    def validation_seconds(step_seconds):
        """(one validation, its probability maps, one scoring of them): measured, or estimated from the step
        time before the first validation (a tile's forward pass costs about a third of a training patch's
        forward and backward pass; MP-NMS about SCORE_SECONDS_PER_VOXEL)."""
        if timing:
            return timing['vloss'] + timing['maps'] + timing['score'], timing['maps'], timing['score']
        per_patch = (step_seconds or 0.0) / batch_size / 3.0
        maps = n_val_tiles * per_patch
        score = val_voxels * n_classes * SCORE_SECONDS_PER_VOXEL
        return maps + len(val_patches) * per_patch + score, maps, score

    def final_reserve(step_seconds):
        """Seconds the end of a run needs: a validation of the last weights, then the threshold tuning, which
        scores the best weights' maps again (kept since their validation; only a resumed run's earlier best
        is mapped anew)."""
        val, maps, score = validation_seconds(step_seconds)
        if not tune:
            return val
        again = maps if saved is not None and 'best_maps' not in kept else 0.0
        return val + again + len(T_SEG_GRID) * len(T_LM_GRID) * score

    def validate(record):
        t0 = time.monotonic()
        model.eval()
        with torch.no_grad():
            vl = []
            for x, y in val_patches:
                with autocast(device, precision):
                    logits = model(torch.from_numpy(x[None, None]).to(device).to(memory_format=layout))
                vl.append(float(seg_loss(logits.float(), torch.from_numpy(y[None].astype(np.int64)).to(device),
                                         n_classes, ce_weight)))
        t1 = time.monotonic()
        maps = kept['maps'] = _val_maps(model, vset, patch, pad, n_classes, device, max(batch_size, 2), precision,
                                        say=log)
        t2 = time.monotonic()
        s = _val_scores(maps, vset, diameters, base_thr, match_radius, alpha, device)
        timing.update(vloss=t1 - t0, maps=t2 - t1, score=time.monotonic() - t2)
        record.update({'val_loss': float(np.mean(vl)) if vl else float('nan'), 'val_precision': s['precision'],
                       'val_recall': s['recall'], 'val_f1': s['f1'], 'val_score': s['score']})
        return s

    def step_note(losses, progress, epoch):
        left = (progress.total - progress.done) + (epochs - epoch) * steps
        val_left = sum(1 for e in range(epoch, epochs + 1) if e % val_every == 0 or e == epochs)
        run = left * (progress.seconds_per_step or 0.0) + val_left * validation_seconds(progress.seconds_per_step)[0]
        text = f'loss {np.mean(losses[-20:]):.4f}; '
        budget_left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if budget_left is not None and run > budget_left:
            # the budget ends the run: its time left is the ETA, the planned epochs only a comparison
            return text + (f'run ETA {duration(budget_left)} (time budget; all {epochs} epochs would take '
                           f'{duration(run)})')
        return text + f'run ETA ≤ {duration(run)}'

    t_start = time.time()
    t_train_begin = time.monotonic()
    stop_reason = 'patience' if best is not None and since_best >= patience else 'epochs'
    epoch = first_epoch - 1
    while stop_reason == 'epochs' and epoch < epochs:
        epoch += 1
        model.train()
        samples = epoch_samples(tomos, patch, rng, bg_fraction, class_balance and n_classes > 1, hard_fraction)
        samples = samples[:steps * batch_size]
        n_batches = math.ceil(len(samples) / batch_size)
        losses = []
        t0 = time.time()
        progress = Progress(f'epoch {epoch}/{epochs}', n_batches, say=log)
        out_of_time = False
        for b in range(0, len(samples), batch_size):
            xs, ys = [], []
            for i, centre in samples[b:b + batch_size]:
                t = tomos[i]
                lo, hi = t.region or ((0, 0, 0), t.data.shape)
                x, y = read_patch(t, patch_start(centre, patch, lo, hi), patch)
                x, y = augment(x, y, rng, p_affine)
                xs.append(x)
                ys.append(y)
            x = torch.from_numpy(np.stack(xs)[:, None]).to(device).to(memory_format=layout)
            y = torch.from_numpy(np.stack(ys).astype(np.int64)).to(device)
            with autocast(device, precision):
                logits = model(x)
            loss = seg_loss(logits.float(), y, n_classes, ce_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n_step += 1
            if deadline is not None:
                sched.set_window(t_train_begin, deadline - final_reserve(progress.seconds_per_step))
            sched.step()
            losses.append(float(loss.detach()))
            progress.update(note=lambda: step_note(losses, progress, epoch))
            if deadline is not None and time.monotonic() + final_reserve(progress.seconds_per_step) >= deadline:
                out_of_time = True
                break
        record = {'epoch': epoch, 'train_loss': float(np.mean(losses)), 'lr': float(opt.param_groups[0]['lr']),
                  'seconds': time.time() - t0}
        if len(losses) < n_batches:
            record.update(steps=len(losses), stopped='time budget')
        if deadline is not None and not out_of_time:
            out_of_time = time.monotonic() + final_reserve(progress.seconds_per_step) >= deadline
        # The last weights of a run cut by the budget are validated too: they may be its best.
        if epoch % val_every == 0 or epoch == epochs or out_of_time:
            s = validate(record)
            key = (s['score'], s['f1'], -record['val_loss'])
            if best is None or key > best[0]:
                best = (key, epoch, record)
                best_state = copy.deepcopy(model.state_dict())
                kept['best_maps'] = kept['maps']    # the tuning at the end needs no second map of these weights
                since_best = 0
                meta.update({'best_epoch': epoch, 'epochs_run': epoch, 'best_val': _summary(record)})
                model_io.save_model(out_model, METHOD, arch, best_state, meta)
            else:
                since_best += 1
            zero_epochs = zero_epochs + [epoch] if s['f1'] == 0 else []
            if len(zero_epochs) == ZERO_F1_CHECKS:
                text = _zero_f1_warning(zero_epochs, s, base_thr, match_radius, n_classes)
                warn('train3d: %s', text)
                warnings.append(text)
        history.append(record)
        if best is not None and since_best >= patience:
            stop_reason = 'patience'
        if out_of_time:
            stop_reason = 'time budget'
        checkpoint.save(ckpt_path, resume_settings, {
            'epoch': epoch, 'model': model.state_dict(), 'optimizer': opt.state_dict(),
            'scheduler': sched.state_dict(), 'rng': checkpoint.rng_state(rng), 'history': history, 'best': best,
            'best_state': best_state, 'since_best': since_best, 'n_step': n_step, 'zero_epochs': zero_epochs,
            'warnings': warnings, 'train_seconds': previous_seconds + time.time() - t_start,
            'meta': {k: meta[k] for k in ('best_epoch', 'best_val') if k in meta}})
        log(record)

    model.load_state_dict(best_state)
    model.eval()
    meta.update({'epochs_run': epoch, 'best_epoch': best[1], 'best_val': _summary(best[2]),
                 'train_seconds': round(previous_seconds + time.time() - t_start, 1), 'stop_reason': stop_reason,
                 'steps_run': n_step, 'steps_planned': total_steps})
    if time_budget:
        meta['time_budget_min'] = float(time_budget)
    if saved is not None:
        meta['resumed_after_epoch'] = int(saved['epoch'])
    if stop_reason == 'time budget':
        log(f'train3d: time budget of {duration(60.0 * float(time_budget))} spent: stopped after {n_step} of '
            f'{total_steps} steps (epoch {epoch}); best epoch {best[1]}' + ('; tuning the thresholds' if tune else ''))
    if not best[2].get('val_f1'):
        text = ('no validation found any particle (F1 0 at every check): the model kept is the one with the lowest '
                'validation loss. ' + ZERO_F1_ADVICE)
        warn('train3d: %s', text)
        warnings.append(text)
    if warnings:
        meta['warnings'] = warnings
    if tune:
        maps = kept.get('best_maps') or _val_maps(model, vset, patch, pad, n_classes, device, max(batch_size, 2),
                                                  precision, say=log)
        thr, s = tune_thresholds(maps, vset, diameters, base_thr, match_radius, alpha, device, deadline)
        if s['grid_points'] < len(T_SEG_GRID) * len(T_LM_GRID):
            log(f"train3d: threshold tuning cut by the time budget after {s['grid_points']} of "
                f"{len(T_SEG_GRID) * len(T_LM_GRID)} grid points (nearest the defaults first)")
        meta['thresholds'] = thr
        meta['tuned_val'] = {k: round(float(v), 4) for k, v in s.items()}
        log({'tuned_t_seg': thr['t_seg'], 'tuned_t_lm': thr['t_lm'], 'tuned_f1': s['f1'],
             'tuned_score': s['score']})
    meta['history'] = {'epochs': len(history), 'final_train_loss': history[-1]['train_loss'],
                       'best': _summary(best[2]), 'file': os.path.basename(os.fspath(out_model)) + '.history.csv'}
    model_io.save_model(out_model, METHOD, arch, best_state, meta)
    write_history(out_model, history)
    if stop_reason == 'time budget':
        log(f'train3d: {out_model} written; the training state stays in {ckpt_path}: the same command continues '
            f'the training from epoch {epoch + 1}')
    else:
        checkpoint.remove(ckpt_path)
    return meta


ZERO_F1_ADVICE = ('Check the picking thresholds, that the label maps and the label diameter fit the particles '
                  '(about half the particle diameter, odd) and that the validation tomograms are annotated with '
                  'the same classes; or the training is too short to learn them (more epochs or steps).')
# MP-NMS time per voxel and class of a validation map, for the time budget before the first validation has
# been measured (1.2e-7 s on one loaded core of an EPYC for a 4-class 96×160×160 map with thousands of
# maxima; 2e-7 leaves room for slower CPUs).
SCORE_SECONDS_PER_VOXEL = 2e-7


def _zero_f1_warning(zero_epochs, scores, thresholds, match_radius, n_classes):
    if scores['n_pred'] == 0:
        what = (f"the network's map never passes t_seg {thresholds['t_seg']:g} / t_lm {thresholds['t_lm']:g} "
                f"(no picks at all)")
    else:
        what = (f"{scores['n_pred']} picks, none within {match_radius:g} voxels of one of the "
                f"{scores['n_true']} validation particles" + (' of its class' if n_classes > 1 else ''))
    return (f"validation F1 is 0 at the last {len(zero_epochs)} validations (epochs "
            f"{', '.join(map(str, zero_epochs))}): {what}. {ZERO_F1_ADVICE} Until a validation finds particles, "
            f"the model kept is the one with the lowest validation loss.")


def _fingerprint(t):
    """What identifies a training tomogram for resuming: name, shape, and its particles."""
    import hashlib
    digest = hashlib.sha1(np.ascontiguousarray(t.zyx, dtype=np.int64).tobytes()
                          + np.ascontiguousarray(t.classes, dtype=np.int64).tobytes()).hexdigest()[:16]
    return [t.name, list(t.data.shape), int(len(t.zyx)), digest]


def retune(model_path, val_items, out_model=None, device='cpu', batch_size=2, flip_average=False,
           padding='zero'):
    """Choose t_seg and t_lm of a trained model again on validation tomograms, with the current peak
    finder (de-duplication and pooling left to their defaults), and write the model with them.

    val_items: [(tomogram, label map, coordinate table)] as for `train`. Returns the new meta.
    Useful when the peak finder's defaults change after a model was trained, or to adapt a model's
    thresholds to another data set's validation tomogram without retraining.
    """
    arch, state, meta = model_io.load_model(model_path, METHOD)
    from .picking import load_picker
    net, _ = load_picker(model_path, device)
    vset = validation_set([load_item(it, 'validation') for it in val_items], [])
    diameters = {int(c): float(d) for c, d in meta['diameters'].items()}
    match_radius = float(meta.get('match_radius') or max(2.0, min(diameters.values()) / 2.0))
    base = {'t_seg': mpnms.DEFAULT_T_SEG, 't_lm': mpnms.DEFAULT_T_LM,
            'kernel': int((meta.get('thresholds') or {}).get('kernel') or mpnms.DEFAULT_KERNEL),
            'iterations': None, 't_dist': None}
    maps = _val_maps(net, vset, int(meta['patch']), int(meta['pad_infer']), len(diameters), device,
                     max(2, batch_size), flip_average=flip_average, padding=padding)
    thr, s = tune_thresholds(maps, vset, diameters, base, match_radius, float(meta.get('alpha', 3.0)), device)
    meta = dict(meta, thresholds=thr, tuned_val={k: round(float(v), 4) for k, v in s.items()},
                retuned_on=[v[0].name for v in vset])
    model_io.save_model(out_model or model_path, METHOD, arch, state, meta)
    return meta


def _summary(record):
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()}


def write_history(out_model, history):
    """Learning curve as <model>.history.csv and <model>.history.json."""
    cols = ['epoch', 'train_loss', 'val_loss', 'val_precision', 'val_recall', 'val_f1', 'val_score', 'lr',
            'seconds']
    base = os.fspath(out_model)
    with mrc.atomic_path(base + '.history.csv') as tmp:
        with open(tmp, 'w', newline='') as fh:
            w = csv.DictWriter(fh, cols, extrasaction='ignore')
            w.writeheader()
            for r in history:
                w.writerow({k: r.get(k, '') for k in cols})
    with mrc.atomic_path(base + '.history.json') as tmp:
        with open(tmp, 'w') as fh:
            json.dump(history, fh, indent=1)
