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

Validation, every `val_every` epochs: Dice loss on patches at the validation particles, then the real
picking (overlap tiles + MP-NMS) on a validation sub-volume and one-to-one matching (Hungarian, within
`match_radius`; class by class when there are several, so a pick of the wrong class is an error) of picks
to the true centres, giving precision P, recall R, F1 and the paper's score
P·R^α / (P + R^α) (α = 3 favours recall). The best model by that score is kept (written to `out_model` each
time it improves); training stops after `patience` validations without improvement. When no validation
tomogram is given, the last 20% of the first training tomogram along y is held out (its particles are not
trained on). Finally t_seg and t_lm can be tuned for F1 on the validation map (grid search) and stored in the
model, so picking uses them by default.
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
from ..errors import InputError
from .labels import radius_of
from .picking import METHOD, find_peaks, model_predictor, probability_map, read_window
from .resunet3d import PRESETS, build

log = logging.getLogger(__name__)

T_SEG_GRID = (0.3, 0.4, 0.5, 0.6, 0.7)
T_LM_GRID = (0.05, 0.1, 0.2, 0.3, 0.5)


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
              padding='zero'):
    maps = []
    predictor = model_predictor(model, device, precision, flip_average)
    for t, lo, hi, _, _ in vset:
        crop = np.asarray(t.data[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], dtype=np.float32)
        maps.append(probability_map(crop, predictor, n_classes, patch, pad, batch_size, t.mean, t.std, padding))
    return maps


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


def tune_thresholds(maps, vset, diameters, base, match_radius, alpha, device):
    """Grid search of t_seg × t_lm on validation maps; returns (best thresholds, their scores).

    The operating point maximises F1 (ties: the recall-weighted score, then the defaults). The paper's
    P·R^α/(P+R^α) stays the checkpoint criterion, where favouring recall early in training is useful; as a
    threshold criterion it drives the thresholds down until the picks are mostly false positives (α = 3
    rewards a recall gain of 0.1 more than a precision loss of 0.3).
    """
    best = None
    for t_seg in T_SEG_GRID:
        for t_lm in T_LM_GRID:
            thr = dict(base, t_seg=t_seg, t_lm=t_lm)
            s = _val_scores(maps, vset, diameters, thr, match_radius, alpha, device)
            key = (round(s['f1'], 6), s['score'], -abs(t_seg - 0.5), -abs(t_lm - 0.1))
            if best is None or key > best[0]:
                best = (key, thr, s)
    return best[1], best[2]


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
          class_balance=True, hard_fraction=0.0, precision='auto'):
    """Train a 3D-ResUNet and write the best model to `out_model`; return the model's meta dict.

    train_items / val_items: lists of (tomogram path, label-map path, coordinate DataFrame with
    rlnCoordinateX/Y/Z and rlnClassNumber) — the table holds this tomogram's particles only. diameters:
    label diameter in voxels, scalar or {class: d}; None measures it on the label maps. preset 'cpu' or
    'paper' gives widths, patch, pad, batch size and lr unless given. patience counts validations.
    `log` receives one dict per epoch. max_steps_per_epoch caps the batches of an epoch (the epoch's
    shuffled samples are cut, so each epoch sees a different random subset). hard_fraction: share of the
    background patches centred on unlabelled blobs (`find_hard_negatives`; 0 = all random, the reference).
    precision: 'auto', 'fp32' or 'bf16' arithmetic for the convolutions (`settings.resolve_precision`;
    weights, optimiser and loss stay fp32).
    A learning curve is written beside the model as <out_model>.history.csv and .history.json.
    """
    import torch
    from .labels import estimate_diameters
    from ..settings import autocast, memory_format, resolve_device, resolve_precision
    log = log or _default_log
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
    precision = resolve_precision(precision, device)
    layout = memory_format(5, precision)

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
    if total_steps >= 20:
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps, pct_start=0.1,
                                                    anneal_strategy='cos', div_factor=30, final_div_factor=100)
    else:  # too few steps for a warm-up phase: constant learning rate
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
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
    history, best, best_state, since_best = [], None, None, 0
    t_start = time.time()
    epoch = 0
    for epoch in range(1, epochs + 1):
        model.train()
        samples = epoch_samples(tomos, patch, rng, bg_fraction, class_balance and n_classes > 1, hard_fraction)
        samples = samples[:steps * batch_size]
        losses = []
        t0 = time.time()
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
            if n_step < total_steps:
                sched.step()
            losses.append(float(loss.detach()))
        record = {'epoch': epoch, 'train_loss': float(np.mean(losses)), 'lr': float(opt.param_groups[0]['lr']),
                  'seconds': time.time() - t0}
        if epoch % val_every == 0 or epoch == epochs:
            model.eval()
            with torch.no_grad():
                vl = []
                for x, y in val_patches:
                    with autocast(device, precision):
                        logits = model(torch.from_numpy(x[None, None]).to(device).to(memory_format=layout))
                    vl.append(float(seg_loss(logits.float(), torch.from_numpy(y[None].astype(np.int64)).to(device),
                                             n_classes, ce_weight)))
            maps = _val_maps(model, vset, patch, pad, n_classes, device, max(batch_size, 2), precision)
            s = _val_scores(maps, vset, diameters, base_thr, match_radius, alpha, device)
            record.update({'val_loss': float(np.mean(vl)) if vl else float('nan'), 'val_precision': s['precision'],
                           'val_recall': s['recall'], 'val_f1': s['f1'], 'val_score': s['score']})
            key = (s['score'], s['f1'], -record['val_loss'])
            if best is None or key > best[0]:
                best = (key, epoch, record)
                best_state = copy.deepcopy(model.state_dict())
                since_best = 0
                meta.update({'best_epoch': epoch, 'epochs_run': epoch, 'best_val': _summary(record)})
                model_io.save_model(out_model, METHOD, arch, best_state, meta)
            else:
                since_best += 1
        history.append(record)
        log(record)
        if best is not None and since_best >= patience:
            break

    model.load_state_dict(best_state)
    model.eval()
    meta.update({'epochs_run': epoch, 'best_epoch': best[1], 'best_val': _summary(best[2]),
                 'train_seconds': round(time.time() - t_start, 1)})
    if tune:
        maps = _val_maps(model, vset, patch, pad, n_classes, device, max(batch_size, 2), precision)
        thr, s = tune_thresholds(maps, vset, diameters, base_thr, match_radius, alpha, device)
        meta['thresholds'] = thr
        meta['tuned_val'] = {k: round(float(v), 4) for k, v in s.items()}
        log({'tuned_t_seg': thr['t_seg'], 'tuned_t_lm': thr['t_lm'], 'tuned_f1': s['f1'],
             'tuned_score': s['score']})
    meta['history'] = {'epochs': len(history), 'final_train_loss': history[-1]['train_loss'],
                       'best': _summary(best[2]), 'file': os.path.basename(os.fspath(out_model)) + '.history.csv'}
    model_io.save_model(out_model, METHOD, arch, best_state, meta)
    write_history(out_model, history)
    return meta


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
