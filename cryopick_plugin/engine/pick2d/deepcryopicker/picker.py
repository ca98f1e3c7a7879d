"""DeepCryoPicker: fully automatic 2D picking with an unsupervised training set.

Pipeline (`deepcryopicker_pick`):

1. Working scale. The micrograph is rescaled by a multiple of 0.125 (as in the paper) so the particle
   diameter becomes about the preset's particle size (24 px for 'cpu', 160 px for 'paper'); with no
   diameter given it is estimated first (`estimate_diameter`: clustering at ~1024 px, median equivalent
   diameter of compact regions).
2. Preprocessing: `preprocess2d.deepcryopicker_chain`. Particles are dark on a lighter background in
   cryo-EM micrographs (polarity 'dark'), so the image is inverted to make them the brightest cluster.
3. Unsupervised candidates (`ibc.py`): intensity-based clustering (IBC, default), k-means, fuzzy c-means
   or super-clustering (SLIC + IBC, for irregular particles such as β-gal); the brightest cluster is the
   particle mask, cleaned, measured with regionprops, merged blobs split at distance-transform maxima.
4. Automatic good/bad selection by shape (size against the mean, solidity, circularity, axis ratio,
   Feret box; `ibc.select_good`). The good particles are grouped into up to 3 shape classes (k-means on
   standardised shape features; the paper found 3 shape classes + background best); background windows
   are taken at least one diameter away from every candidate, plus one window 0.5–0.75 diameter off the
   centre of each good particle (so that scores peak at particle centres).
5. A balanced training set (`per_class` samples per class from 0/90/180/270° rotations, mirrors when
   needed) trains the patch classifier (`cnn2d.py`).
   Self-training (not in the paper; `self_training`, three rounds by default): the trained classifier
   picks its own training micrographs, and a fresh classifier is trained on its confident picks (score
   ≥ 0.5) with background drawn away from every pick — the clustering finds a minority of the particles
   on crowded micrographs, and the ones it misses otherwise end up among the background windows. Each
   round finds more of them (β-gal: 785 → 1 482 → 1 804 confident picks of 2 892 particles).
6. Sliding-window scoring of the whole working image; the particle score is 1 − P(background), the class
   the most likely shape class. The default score threshold is calibrated on the training micrographs
   (`calibrate_threshold`: the 95th percentile of the score on background away from every clustering
   candidate and every confident pick, read from a normal fitted to the lower side of those scores)
   rather than fixed at 0.5.
   High-score connected regions larger than `max_region` particles (carbon edges, aggregates, ice;
   judged at a score of 0.5 or the threshold if higher) are removed with half a diameter around them;
   local maxima above the threshold go through NMS (`nms_2d`, 0.6·diameter) and are mapped back to
   pixels of the input micrograph. Maxima closer than half a diameter to the micrograph's edge (a cut
   particle, half reflection padding) are dropped.

Coordinates are x = column, y = row of the input array (no flip), origin at the first pixel.
"""
import dataclasses
import time

import numpy as np
import pandas as pd

from . import cnn2d, ibc
from .. import preprocess as preprocess2d
from ...io import star
from ...errors import InputError
from ..micrograph_io import EDGE_MARGIN, away_from_edge, downsample

METHOD = 'deepcryopicker'
SCALE_STEP = 0.125
DEFAULT_THRESHOLD = 0.5
CALIBRATION_QUANTILE = 0.95
CALIBRATION_MIN = 0.05
# 'quantile': the background scores' own 95th percentile. 'robust' reads it from a normal fitted to their
# lower side, immune to the particles that the clustering missed on crowded micrographs. With one round
# of self-training (the default) the classifier scores those hidden particles high, the plain quantile
# climbs to ≈ 0.5 and loses recall (β-gal test F1 0.62 against 0.70 robust; simulated micrographs at SNR
# 0.1 / 0.03 / 0.01: 0.675 / 0.373 / 0.188 against 0.684 / 0.406 / 0.270). bench/README §3, §4b.
CALIBRATION_RULE = 'robust'
# Rounds of retraining on the classifier's own confident picks (`self_training_set`); 0 = the paper.
# Test F1 at the own threshold after 1 / 2 / 3 rounds: β-gal 0.714 / 0.762 / 0.780, simulated micrographs
# at SNR 0.1 0.749 / 0.692 / 0.686, 0.03 0.487 / 0.519 / 0.603, 0.01 0.204 / 0.331 / 0.381 (bench/README
# §3, §4b); each round costs one more training.
SELF_TRAINING_ROUNDS = 3
# Margin, in particle diameters, removed around a large high-score region with it (`picks_from_scores`).
RIM_MARGIN = 0.5
# Turns of the micrograph whose scores are averaged (`score_image`): 4 or 1. Four turns ranked β-gal's
# particles a little better (test F1 +0.015 with one self-training round, +0.003 with two) but narrow the
# score distribution, so that on sparse micrographs with a weak classifier background maxima clear the
# background-quantile threshold; opt-in.
SCORE_ROTATIONS = 1


@dataclasses.dataclass
class DeepCryoPickerModel:
    net: object            # torch module (cnn2d.build_network(arch))
    arch: dict
    meta: dict             # preset, window, particle (px in the window), classes, polarity, clustering, threshold
    device: str = 'cpu'


# ------------------------------------------------------------------------------------------------- NMS

def nms_2d(xy, scores, min_distance):
    """Greedy non-maximum suppression: keep the best-scoring point, drop all within `min_distance`,
    repeat. Returns the kept indices, best first."""
    from scipy.spatial import cKDTree
    xy = np.asarray(xy, dtype=float).reshape(-1, 2)
    scores = np.asarray(scores, dtype=float).ravel()
    if len(xy) != len(scores):
        raise InputError('nms', f"{len(xy)} positions but {len(scores)} scores")
    if len(xy) == 0:
        return np.zeros(0, dtype=int)
    order = np.argsort(-scores, kind='stable')
    tree = cKDTree(xy)
    alive = np.ones(len(xy), bool)
    keep = []
    for i in order:
        if not alive[i]:
            continue
        keep.append(i)
        alive[tree.query_ball_point(xy[i], r=float(min_distance))] = False
    return np.asarray(keep, dtype=int)


# ---------------------------------------------------------------------------------------------- scales

def working_scale(diameter_px, particle_px):
    """Scale factor (a multiple of 0.125, at least 0.125) that brings `diameter_px` near `particle_px`."""
    if not diameter_px or diameter_px <= 0:
        raise InputError('--diameter', f"must be positive, got {diameter_px}")
    return max(SCALE_STEP, round(particle_px / float(diameter_px) / SCALE_STEP) * SCALE_STEP)


def rescale(image, scale):
    """Resize by `scale` (area averaging when shrinking, bicubic when enlarging)."""
    import cv2
    if scale == 1:
        return np.asarray(image, np.float32).copy()
    if scale < 1:
        return downsample(image, 1.0 / scale)
    h, w = image.shape
    return cv2.resize(np.asarray(image, np.float32), (int(round(w * scale)), int(round(h * scale))),
                      interpolation=cv2.INTER_CUBIC)


def _to_input_frame(xy, small_shape, shape):
    # Pixel-edge-aligned mapping, the one both area averaging and cv2's bicubic resize use.
    xy = np.asarray(xy, float).reshape(-1, 2)
    s = np.array([shape[1] / small_shape[1], shape[0] / small_shape[0]])
    return (xy + 0.5) * s - 0.5


def prepare(image, scale, polarity='dark'):
    """Rescale, run the DeepCryoPicker chain and make particles bright; float32 [0, 1]."""
    if polarity not in ('dark', 'bright'):
        raise InputError('polarity', f"'{polarity}' (dark or bright)")
    img = rescale(np.asarray(image, np.float32), scale)
    if polarity == 'dark':
        img = -img
    return preprocess2d.deepcryopicker_chain(img)


def estimate_diameter(image, polarity='dark', clustering='ibc', seed=0, size=1024):
    """Particle diameter in input pixels, from compact clustered regions at about `size` px.

    Rough: it measures the brightest (after inversion: darkest) cores of the particles. On the β-gal
    JPGs it gives 43–47 px against the 108 px annotation circles, so give the diameter whenever known.
    """
    scale = min(1.0, size / max(image.shape))
    work = prepare(image, scale, polarity)
    k = 4
    mask = ibc.foreground(ibc.cluster_labels(work, clustering, k, seed), k)
    mask = ibc.clean_mask(mask, diameter=8, min_fraction=0.5)
    regions = ibc.candidate_regions(mask, diameter=1e9)  # no splitting
    d = np.array([2 * np.sqrt(r['area'] / np.pi) for r in regions if r['solidity'] >= 0.85])
    if len(d) < 3:
        raise InputError('diameter', "could not estimate the particle diameter (too few compact regions); "
                                     "give --diameter")
    return float(np.median(d) / scale)


# ------------------------------------------------------------------------------------------ candidates

def find_candidates(work, diameter, clustering='ibc', shape='irregular', seed=0, k=4, keep=1):
    """Candidate particles in a working image (particles bright, diameter in working pixels).

    Returns (regions list (ibc.candidate_regions), good boolean array, particle mask).
    """
    # Superpixels about half a particle across, so a particle is a few whole superpixels.
    n_segments = int(max(100, work.size / (0.5 * diameter) ** 2))
    labels = ibc.cluster_labels(work, clustering, k, seed, n_segments=n_segments)
    mask = ibc.clean_mask(ibc.foreground(labels, k, keep), diameter)
    # carbon, thick ice and contamination are no particle candidates (nor their edge fragments)
    mask &= ~ibc.slab_mask(mask, diameter)
    regions = ibc.candidate_regions(mask, diameter)
    if shape == 'round' and regions:
        # Round views: Hough circles give the centres; region shape still decides good/bad.
        centres = ibc.hough_centres(mask, diameter)
        if len(centres):
            from scipy.spatial import cKDTree
            tree = cKDTree(centres)
            for r in regions:
                dist, j = tree.query([r['x'], r['y']])
                if dist < 0.35 * diameter:
                    r['x'], r['y'] = float(centres[j, 0]), float(centres[j, 1])
    good = ibc.select_good(regions, diameter, shape)
    return regions, good, mask


def _patches(image, xy, window):
    half = window // 2
    padded = np.pad(image, ((half, window - half), (half, window - half)), mode='reflect')
    out = np.empty((len(xy), window, window), np.float32)
    for i, (x, y) in enumerate(np.rint(np.asarray(xy)).astype(int)):
        out[i] = padded[y:y + window, x:x + window]
    return out


def _background_positions(shape, occupied_xy, diameter, n, rng):
    """Up to n random positions at least one diameter from every occupied position."""
    from scipy.spatial import cKDTree
    h, w = shape
    tries = rng.uniform([0, 0], [w - 1, h - 1], size=(max(20 * n, 200), 2))
    if len(occupied_xy):
        d, _ = cKDTree(np.asarray(occupied_xy)).query(tries)
        tries = tries[d >= diameter]
    return tries[:n]


def _shape_classes(regions, good, n_classes, seed):
    from sklearn.cluster import KMeans
    idx = np.flatnonzero(good)
    feats = np.array([[regions[i]['area'], regions[i]['circularity'], regions[i]['axis_ratio'],
                       regions[i]['solidity']] for i in idx])
    n_classes = int(min(n_classes, max(1, len(idx) // 20)))
    if n_classes <= 1:
        return idx, np.ones(len(idx), int), 1
    feats = (feats - feats.mean(0)) / np.maximum(feats.std(0), 1e-6)
    lab = KMeans(n_clusters=n_classes, n_init=5, random_state=seed).fit_predict(feats)
    return idx, lab + 1, n_classes


def build_training_set(works, diameters, window, shape='irregular', clustering='ibc', n_shape_classes=3,
                       per_class=600, seed=0, log=None):
    """Automatic training set from working images (particles bright) and their working diameters.

    Returns (patches (N, w, w), labels (N,) with 0 = background, 1..K shape classes, info dict).
    """
    rng = np.random.default_rng(seed)
    all_regions, all_good, owners = [], [], []
    for i, (work, d) in enumerate(zip(works, diameters)):
        regions, good, _ = find_candidates(work, d, clustering, shape, seed)
        all_regions += regions
        all_good.append(good)
        owners += [i] * len(regions)
    good = np.concatenate(all_good) if all_good else np.zeros(0, bool)
    owners = np.asarray(owners, int)
    if good.sum() < 5:
        raise InputError('training', f"only {int(good.sum())} good particle candidates found by clustering "
                                     f"(of {len(all_regions)} regions); check --diameter and the polarity")
    idx, classes, n_classes = _shape_classes(all_regions, good, n_shape_classes, seed)
    pos_p, pos_l, neg_p = [], [], []
    n_bg_each = max(1, int(np.ceil(2 * per_class / max(len(works), 1))))
    for i, (work, d) in enumerate(zip(works, diameters)):
        mine = idx[owners[idx] == i]
        xy = np.array([[all_regions[j]['x'], all_regions[j]['y']] for j in mine]).reshape(-1, 2)
        if len(mine):
            pos_p.append(_patches(work, xy, window))
            pos_l.append(classes[owners[idx] == i])
        occupied = np.array([[r['x'], r['y']] for r, o in zip(all_regions, owners) if o == i]).reshape(-1, 2)
        bg_xy = _background_positions(work.shape, occupied, d, n_bg_each, rng)
        neg_p.append(_patches(work, bg_xy, window))
        if len(mine):
            # Off-centre windows (0.5–0.75 diameter from a good particle) are background too: without
            # them the classifier scores the whole neighbourhood of a particle high, and the score map
            # has broad plateaus instead of peaks at the centres.
            angle = rng.uniform(0, 2 * np.pi, len(xy))
            shift = rng.uniform(0.5, 0.75, len(xy)) * d
            off = xy + np.stack([np.cos(angle), np.sin(angle)], 1) * shift[:, None]
            off = np.clip(off, 0, np.array(work.shape[::-1]) - 1)
            neg_p.append(_patches(work, off, window))
    patches = np.concatenate(pos_p + neg_p)
    labels = np.concatenate(pos_l + [np.zeros(sum(len(p) for p in neg_p), int)])
    if (labels == 0).sum() < 5:
        raise InputError('training', "too few background windows: the micrographs are crowded; "
                                     "check --diameter")
    raw_counts = {int(c): int((labels == c).sum()) for c in np.unique(labels)}
    patches, labels = cnn2d.augment_rotations(patches, labels, per_class, rng)
    info = {'regions': len(all_regions), 'good': int(good.sum()), 'shape_classes': n_classes,
            'raw_counts': raw_counts, 'per_class': int(per_class), 'total': int(len(labels))}
    if log:
        log(f"training set: {info['good']} good of {info['regions']} candidates, {n_classes} shape "
            f"class(es) + background, raw counts {raw_counts}, {per_class} per class after rotations")
    return patches, labels, info


SELF_TRAINING_SCORE = 0.5


def self_training_set(model, works, diameters, window, per_class, clustering='ibc', shape='irregular', seed=0,
                      log=None, min_score=SELF_TRAINING_SCORE):
    """A second automatic training set from a trained model's own picks on its training micrographs.

    The clustering finds a fraction of the particles of a crowded micrograph (β-gal: about 1 in 3 within
    half a diameter) and the shape selection keeps the isolated ones, so the first classifier learns
    isolated particles only — and, since "background" is anything a diameter away from a candidate,
    particles the clustering missed land among its background windows (15–30 % of them on β-gal). Its
    confident picks (score ≥ `min_score` after NMS; class = its most likely shape class) include crowded
    and touching particles; they replace the clustering's good candidates as positives, and the background
    windows are drawn a diameter away from them, from every clustering candidate and from every weaker
    pick (≥ CALIBRATION_MIN), plus one off-centre window per positive as in `build_training_set`.
    Returns (patches, labels, info, confident pick positions per micrograph).
    """
    rng = np.random.default_rng(seed)
    pos_p, pos_l, neg_p, known = [], [], [], []
    n_bg_each = max(1, int(np.ceil(2 * per_class / max(len(works), 1))))
    for work, d in zip(works, diameters):
        score, classes, stride = score_image(model, work, d)
        xy, sc, cl, _ = picks_from_scores(score, classes, stride, d, CALIBRATION_MIN)
        regions, _, _ = find_candidates(work, d, clustering, shape, seed)
        cand = np.array([[r['x'], r['y']] for r in regions]).reshape(-1, 2)
        # Particles cut by the edge make poor positives (half of their window is reflection padding), but
        # they are no background either: they stay among the positions the background keeps away from.
        confident = (sc >= min_score) & away_from_edge(xy, work.shape, EDGE_MARGIN * d)
        known.append(xy[confident])
        pos_p.append(_patches(work, xy[confident], window))
        pos_l.append(cl[confident])
        bg_xy = _background_positions(work.shape, np.concatenate([xy, cand]), d, n_bg_each, rng)
        neg_p.append(_patches(work, bg_xy, window))
        p = xy[confident]
        angle = rng.uniform(0, 2 * np.pi, len(p))
        shift = rng.uniform(0.5, 0.75, len(p)) * d
        off = np.clip(p + np.stack([np.cos(angle), np.sin(angle)], 1) * shift[:, None], 0,
                      np.array(work.shape[::-1]) - 1)
        neg_p.append(_patches(work, off, window))
    labels = np.concatenate(pos_l + [np.zeros(sum(len(q) for q in neg_p), int)])
    n_pos = int((labels > 0).sum())
    if n_pos < 5 or (labels == 0).sum() < 5:
        raise InputError('training', f"{n_pos} confident picks on the training micrographs, "
                                     f"too few to retrain on")
    patches = np.concatenate(pos_p + neg_p)
    raw_counts = {int(c): int((labels == c).sum()) for c in np.unique(labels)}
    patches, labels = cnn2d.augment_rotations(patches, labels, per_class, rng)
    info = {'confident_picks': n_pos, 'raw_counts': raw_counts, 'min_score': float(min_score)}
    if log:
        log(f"self-training set: {n_pos} confident picks (score ≥ {min_score:g}), raw counts {raw_counts}")
    return patches, labels, info, known


# ------------------------------------------------------------------------------------------- training

def train_deepcryopicker(images, diameter_px, preset='cpu', clustering='ibc', shape='irregular',
                         polarity='dark', n_shape_classes=3, per_class=None, epochs=None, seed=0,
                         device='auto', out=None, log=None, calibrate=True,
                         self_training=SELF_TRAINING_ROUNDS, score_rotations=SCORE_ROTATIONS, resume='auto',
                         **arch_overrides):
    """Train a DeepCryoPicker classifier from micrographs with no labels.

    images       list of 2D float arrays (the micrographs as read)
    diameter_px  particle diameter in pixels of those micrographs (one number, or one per image)
    preset       'cpu' (48² windows, narrow, Adam) or 'paper' (227² AlexNet-like, SGD 1e-4)
    per_class, epochs   override the preset's training-set size per class and epochs
    out          when given, the model is saved there (model_io, method 'deepcryopicker')
    calibrate    choose the model's score threshold on the training micrographs (`calibrate_threshold`);
                 False keeps the fixed DEFAULT_THRESHOLD
    self_training  rounds of retraining on the model's own confident picks (`self_training_set`,
                 default SELF_TRAINING_ROUNDS); 0 is the published method
    score_rotations  4: scores averaged over the four 90° turns of the micrograph (`score_image`), 1: not;
                 stored in the model, so calibration, self-training and picking score alike
    resume       with `out`: the classifier trainings save their state after every epoch in
                 <out>.checkpoint.pt; 'auto' continues from it when it holds a run with the same settings
                 (finished trainings are not run again), True requires it, False starts afresh
                 (`checkpoint.py`). It is removed when the model is written.
    log          callable(str) for progress: device and precision at the start, the training sets, steps /
                 rate / ETA within epochs, one line per epoch
    Returns (DeepCryoPickerModel, info dict: training-set sizes and final accuracies).
    """
    import copy
    import logging

    import torch
    from ... import checkpoint
    from ...progress import compute_summary
    from ...settings import resolve_device
    device = resolve_device(device)
    ckpt = checkpoint.path_for(out) if out else None
    if ckpt:
        checkpoint.check(ckpt, resume)
    torch.manual_seed(seed)
    if preset not in cnn2d.PRESETS:
        raise InputError('preset', f"unknown preset '{preset}' ({', '.join(cnn2d.PRESETS)})")
    p = cnn2d.PRESETS[preset]
    images = [np.asarray(im, np.float32) for im in images]
    if not images:
        raise InputError('images', "no micrographs to train on")
    diameters = np.broadcast_to(np.asarray(diameter_px, float), (len(images),))
    window, particle = int(arch_overrides.pop('window', None) or p['window']), float(p['particle'])
    if 'particle' in arch_overrides:
        particle = float(arch_overrides.pop('particle'))
    per_class = int(per_class or p['per_class'])
    n_epochs = int(epochs or p['epochs'])
    if log:
        log(f'DeepCryoPicker training on {len(images)} micrograph(s), {1 + int(self_training)} classifier '
            f'training(s) at most; {compute_summary(device, None)}')
    # Everything that shapes the trainings: a checkpoint made with other values is not resumed.
    resume_settings = {'micrographs': [[list(im.shape), _digest(im)] for im in images],
                       'diameters': [float(d) for d in diameters], 'preset': preset, 'clustering': clustering,
                       'shape': shape, 'polarity': polarity, 'n_shape_classes': int(n_shape_classes),
                       'per_class': per_class, 'epochs': n_epochs, 'seed': int(seed),
                       'self_training': int(self_training), 'window': window, 'particle': particle,
                       'arch_overrides': arch_overrides}
    saved = checkpoint.load(ckpt, resume_settings, resume, say=logging.getLogger(__name__).warning) \
        if ckpt else None
    run = {'done': saved['done'] if saved else None, 'partial': saved['training'] if saved else None}
    scales = [working_scale(d, particle) for d in diameters]
    works = [prepare(im, s, polarity) for im, s in zip(images, scales)]
    work_d = [d * s for d, s in zip(diameters, scales)]

    def fit(index, net, patches, labels, seed_index):
        """Classifier training number `index` (0: on the clustering's set, then one per self-training
        round), continued from the checkpoint when it was interrupted, saved after every epoch."""
        partial = run['partial'] if run['partial'] is not None and run['partial']['index'] == index else None
        if partial is not None and log:
            log(f"resuming classifier training {index + 1} from {ckpt} after epoch {partial['epoch']}")

        def on_epoch(state):
            checkpoint.save(ckpt, resume_settings, {'done': run['done'], 'training': dict(state, index=index)})
        return cnn2d.train_classifier(net, patches, labels, n_epochs, p['batch'], p['lr'], p['optimizer'],
                                      seed_index, device, log, resume=partial, on_epoch=on_epoch if ckpt else None)

    def finished(index, net, meta, info, rounds, known, stats):
        """Training `index` is done: what the next ones need goes into the checkpoint."""
        run['done'] = {'index': index, 'net': net.state_dict(), 'arch': arch, 'meta': copy.deepcopy(meta),
                       'info': copy.deepcopy(info), 'rounds': copy.deepcopy(rounds), 'known': known,
                       'stats': dict(stats), 'rng': checkpoint.rng_state()}
        if ckpt:
            checkpoint.save(ckpt, resume_settings, {'done': run['done'], 'training': None})

    done = run['done']
    if done is None:
        patches, labels, info = build_training_set(works, work_d, window, shape, clustering, n_shape_classes,
                                                   per_class, seed, log)
        n_classes = int(labels.max()) + 1
        arch = cnn2d.arch_for(preset, n_classes, window=window, **arch_overrides)
        net = cnn2d.build_network(arch)
        stats = fit(0, net, patches, labels, seed)
        meta = {'preset': preset, 'window': window, 'particle_px': particle, 'polarity': polarity,
                'clustering': clustering, 'shape': shape, 'n_shape_classes': n_classes - 1,
                'diameter_px': float(np.median(diameters)), 'threshold': DEFAULT_THRESHOLD,
                'score_rotations': int(score_rotations),
                'threshold_source': 'fixed default',
                'training': {**info, **stats, 'epochs': n_epochs, 'seed': int(seed)}}
        known = None
        rounds = []
        finished(0, net, meta, info, rounds, known, stats)
        first_round = 0
    else:
        arch, meta, info, rounds, known, stats = (done['arch'], done['meta'], done['info'], done['rounds'],
                                                  done['known'], done['stats'])
        net = cnn2d.build_network(arch)
        net.load_state_dict(done['net'])
        # the next network starts from the random state an uninterrupted run would have
        checkpoint.restore_rng(done['rng'])
        first_round = int(done['index'])
        if log:
            log(f"resuming from {ckpt}: {done['index'] + 1} classifier training(s) done")
    model = DeepCryoPickerModel(net.eval(), arch, meta, device)
    for r in range(first_round, int(self_training)):
        try:
            patches, labels, st_info, picked = self_training_set(model, works, work_d, window, per_class,
                                                                 clustering, shape, seed + r + 1, log)
        except InputError as exc:
            # A classifier too unsure of its picks to learn from them: keep the one we have.
            meta['training']['self_training_stopped'] = f'before round {r + 1}: {exc.problem}'
            if log:
                log(f"self-training stopped before round {r + 1}: {exc.problem}")
            break
        known = picked
        net = cnn2d.build_network(arch)
        stats = fit(r + 1, net, patches, labels, seed + r + 1)
        model = DeepCryoPickerModel(net.eval(), arch, meta, device)
        rounds.append({**st_info, **stats})
        finished(r + 1, net, meta, info, rounds, known, stats)
    if rounds:
        meta['training']['self_training'] = rounds
        info = {**info, 'self_training': rounds}
    if saved is not None:
        meta['training']['resumed'] = {'trainings_done': 0 if saved['done'] is None else saved['done']['index'] + 1,
                                       'epochs_done': saved['training']['epoch'] if saved['training'] else 0}
    if calibrate:
        thr, calib = calibrate_threshold(model, works, work_d, clustering, shape, seed, known=known)
        meta.update(threshold=thr, threshold_source=calib.pop('source'), threshold_calibration=calib)
        if log:
            log(f"score threshold {thr:.3f} ({meta['threshold_source']})")
    if out:
        save_deepcryopicker(model, out)
        checkpoint.remove(ckpt)
    info = {**info, **stats}
    return model, info


def _digest(image):
    """Short fingerprint of a micrograph (every fourth pixel), to resume only the same training."""
    import hashlib
    return hashlib.sha1(np.ascontiguousarray(image[::4, ::4], dtype=np.float32).tobytes()).hexdigest()[:16]


def calibrate_threshold(model, works, diameters, clustering='ibc', shape='irregular', seed=0,
                        background_quantile=CALIBRATION_QUANTILE, n_background=300, rule=CALIBRATION_RULE,
                        known=None):
    """Score threshold from the training micrographs themselves, no labels needed.

    The classifier's 1 − P(background) is not a calibrated probability: on crowded micrographs
    (β-gal: about 600 touching particles per 4096² image) a particle's window holds parts of its
    neighbours, looks like the off-centre background windows of the training set, and most true
    particles score well below 0.5 — a fixed 0.5 then keeps a fifth of them. The background is what the
    clustering already tells apart: positions at least one diameter from every clustering candidate.
    The threshold is the `background_quantile` of the smoothed score map there (a chosen false-positive
    rate on empty ice), clipped to [CALIBRATION_MIN, DEFAULT_THRESHOLD] so that a classifier that is
    silent on the background does not drop to zero and one that is noisy never goes above the fixed
    default. rule 'robust' reads the quantile from the lower side of the distribution instead
    (`robust_background_threshold`). `known`: per micrograph, more particle positions (working pixels)
    to keep the background away from — the confident picks of self-training, which otherwise count as
    background wherever the clustering missed them. Returns (threshold, details dict with 'source', both
    values).
    """
    from scipy import ndimage as ndi
    rng = np.random.default_rng(seed + 7)
    values = []
    for i, (work, d) in enumerate(zip(works, diameters)):
        regions, _, _ = find_candidates(work, d, clustering, shape, seed)
        occupied = np.array([[r['x'], r['y']] for r in regions]).reshape(-1, 2)
        if known is not None and len(known[i]):
            occupied = np.concatenate([occupied, np.asarray(known[i], float).reshape(-1, 2)])
        bg = _background_positions(work.shape, occupied, d, n_background, rng)
        if not len(bg):
            continue
        score, _, stride = score_image(model, work, d)
        smooth = ndi.gaussian_filter(score, 1.0)
        rows = np.clip(np.rint(bg[:, 1] / stride).astype(int), 0, smooth.shape[0] - 1)
        cols = np.clip(np.rint(bg[:, 0] / stride).astype(int), 0, smooth.shape[1] - 1)
        values.append(smooth[rows, cols])
    values = np.concatenate(values) if values else np.zeros(0)
    if len(values) < 20:
        return DEFAULT_THRESHOLD, {'source': 'fixed default (too few background positions to calibrate)',
                                   'background_positions': int(len(values))}
    raw = float(np.quantile(values, background_quantile))
    robust = robust_background_threshold(values, background_quantile)
    if rule == 'robust':
        thr = float(np.clip(robust, CALIBRATION_MIN, DEFAULT_THRESHOLD))
        source = (f'background quantile {background_quantile:g} of a normal fitted to the lower half of the '
                  f'background scores (logit scale) of the training micrographs')
    else:
        thr = float(np.clip(raw, CALIBRATION_MIN, DEFAULT_THRESHOLD))
        source = f'background quantile {background_quantile:g} of the training micrographs'
    return thr, {'source': source, 'rule': rule, 'background_positions': int(len(values)),
                 'quantile_value': round(raw, 4), 'robust_value': round(robust, 4)}


def robust_background_threshold(values, quantile=CALIBRATION_QUANTILE):
    """The `quantile` of the background score distribution, estimated from its lower side only.

    "Background" positions (≥ one diameter from every clustering candidate) still hold the particles that
    the clustering missed — on crowded micrographs a large share — and those inflate the upper tail that a
    plain quantile reads. A normal is fitted, on the logit scale, to the 5th and 25th percentiles, which
    the hidden particles (high scores) barely move; its `quantile` is returned (score scale).
    """
    from scipy.stats import norm
    v = np.clip(np.asarray(values, float), 1e-4, 1 - 1e-4)
    z = np.log(v / (1 - v))
    lo, mid = np.quantile(z, [0.05, 0.25])
    sigma = max((mid - lo) / (norm.ppf(0.25) - norm.ppf(0.05)), 1e-6)
    mu = mid - norm.ppf(0.25) * sigma
    t = mu + norm.ppf(quantile) * sigma
    return float(1.0 / (1.0 + np.exp(-t)))


def save_deepcryopicker(model, path):
    from ...io.model_io import save_model
    return save_model(path, METHOD, model.arch, model.net.state_dict(), model.meta)


def load_deepcryopicker(path, device='auto'):
    """Load a model written by `save_deepcryopicker` / `train_deepcryopicker(out=...)`."""
    from ...io.model_io import load_model
    from ...settings import resolve_device
    device = resolve_device(device)
    arch, state, meta = load_model(path, METHOD)
    net = cnn2d.build_network(arch)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise InputError(path, f"weights do not fit the architecture ({str(exc).splitlines()[0]})") from None
    return DeepCryoPickerModel(net.to(device).eval(), arch, meta, device)


# -------------------------------------------------------------------------------------------- picking

def score_image(model, work, diameter_work, stride=None, rotations=None):
    """Score map of a working image: (particle score (ny, nx), class map (ny, nx), stride).

    rotations: the class probabilities are averaged over the image turned by 0, 90, 180 and 270° (4;
    default: the model's `score_rotations`, 1 for models saved without it) or not turned (1). The
    classifier was trained on all four turns of its windows, yet its score on one particle still depends
    on the turn;
    the average ranks particles more consistently (β-gal test F1 +0.003 to +0.015, bench/README §3) for
    4× the scoring time. The image is padded so that the window grid maps onto itself under every turn.
    """
    stride = int(stride or max(1, round(diameter_work / 6)))
    if rotations is None:
        # models saved before the option were calibrated on unturned scores
        rotations = model.meta.get('score_rotations', 1)
    rotations = int(rotations)
    if rotations not in (1, 4):
        raise InputError('rotations', f"score rotations must be 1 or 4, got {rotations}")
    work = np.asarray(work, np.float32)
    h, w = work.shape
    step = cnn2d.grid_step(model.arch, stride)
    side = max(-(-(h - 1) // step), -(-(w - 1) // step)) * step + 1  # square, (side − 1) a multiple of step
    padded = np.pad(work, ((0, side - h), (0, side - w)), mode='reflect') if rotations > 1 else work
    probs = None
    for k in range(rotations):
        p, step = cnn2d.dense_score_map(model.net, model.arch, np.ascontiguousarray(np.rot90(padded, k)), step,
                                        model.device)
        p = np.rot90(p, -k, axes=(0, 1))
        probs = p if probs is None else probs + p
    ny, nx = (h - 1) // step + 1, (w - 1) // step + 1
    probs = probs[:ny, :nx] / rotations
    score = 1.0 - probs[..., 0]
    classes = np.argmax(probs[..., 1:], axis=-1) + 1 if probs.shape[-1] > 1 else np.ones(score.shape, int)
    return np.ascontiguousarray(score, np.float32), np.ascontiguousarray(classes, int), step


def picks_from_scores(score, classes, stride, diameter_work, threshold, max_region=4.0, nms_factor=0.6,
                      shape=None, edge_margin=EDGE_MARGIN):
    """Positions (working pixels), scores and classes from a score map (see module doc, step 6).

    shape: the working image's (rows, columns); with it, maxima closer than `edge_margin` diameters to its
    edge are dropped (`micrograph_io.away_from_edge`)."""
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    smooth = ndi.gaussian_filter(score, 1.0)
    # Regions are judged at the default threshold at least, so lowering the pick threshold (for recall)
    # does not join crowded particles into one "large region" that would then be dropped.
    high = smooth >= max(threshold, DEFAULT_THRESHOLD)
    lab, n = ndi.label(high)
    removed = 0
    if n:
        cell = float(stride) ** 2
        areas = np.bincount(lab.ravel())[1:] * cell
        big = np.flatnonzero(areas > max_region * ibc.disk_area(diameter_work)) + 1
        if len(big):
            # Half a diameter around each region goes too: its rim, where the score falls through 0.5,
            # would otherwise be left as a ring of maxima just under 0.5 — a row of false picks along
            # every carbon edge and around every contamination blob at a calibrated threshold below 0.5
            # (simulated micrographs: F1 at the own threshold 0.52 → 0.64 at SNR 0.1; bench/README §4b).
            near = ndi.distance_transform_edt(~np.isin(lab, big)) <= RIM_MARGIN * diameter_work / stride
            smooth = np.where(near, 0, smooth)
            removed = len(big)
    peaks = peak_local_max(smooth, min_distance=max(1, int(0.3 * diameter_work / stride)),
                           threshold_abs=threshold, exclude_border=False)
    if shape is not None and edge_margin:
        peaks = peaks[away_from_edge(peaks[:, ::-1] * stride, shape, edge_margin * diameter_work)]
    xy = peaks[:, ::-1].astype(float) * stride
    sc = smooth[peaks[:, 0], peaks[:, 1]] if len(peaks) else np.zeros(0)
    cl = classes[peaks[:, 0], peaks[:, 1]] if len(peaks) else np.zeros(0, int)
    keep = nms_2d(xy, sc, nms_factor * diameter_work)
    return xy[keep], sc[keep], cl[keep], removed


def deepcryopicker_pick(image, diameter_px=None, preset='cpu', model=None, seed=0, device='auto', log=None,
                        threshold=None, clustering='ibc', shape='irregular', polarity='dark',
                        max_region=4.0, edge_margin=EDGE_MARGIN, **train_options):
    """Pick one micrograph; train on it first when no model is given.

    image        2D float array (as read by micrograph_io.read_micrograph)
    diameter_px  particle diameter in pixels of `image` (None: the model's training diameter, else estimated)
    model        DeepCryoPickerModel, a model file path, or None (train on this micrograph)
    threshold    particle score threshold (default: the model's, calibrated at training)
    edge_margin  picks closer than this many diameters to the micrograph's edge are dropped (0.5: the
                 particle is cut by the edge; 0 keeps them)
    Returns (DataFrame rlnCoordinateX (column), rlnCoordinateY (row), rlnAutopickFigureOfMerit,
    rlnClassNumber — in pixels of `image`; model; diagnostics dict with 'score' map, 'stride', 'scale',
    'candidates' (x, y, good) in input pixels, 'training' sizes, 'times' per stage, 'removed_regions').
    """
    t0 = time.time()
    image = np.asarray(image, np.float32)
    if image.ndim != 2:
        raise InputError('image', f"expected a 2D micrograph, got shape {image.shape}")
    times = {}
    if isinstance(model, str):
        model = load_deepcryopicker(model, device)
    if diameter_px is None:
        diameter_px = model.meta.get('diameter_px') if model is not None else None
        if diameter_px is None:
            diameter_px = estimate_diameter(image, polarity, clustering, seed)
            if log:
                log(f"estimated particle diameter: {diameter_px:.1f} px")
        times['estimate_diameter'] = time.time() - t0
    info = {}
    if model is None:
        t = time.time()
        model, info = train_deepcryopicker([image], diameter_px, preset, clustering, shape, polarity,
                                           seed=seed, device=device, log=log, **train_options)
        times['train'] = time.time() - t
    meta = model.meta
    polarity = meta.get('polarity', polarity)
    t = time.time()
    scale = working_scale(diameter_px, meta['particle_px'])
    work = prepare(image, scale, polarity)
    d_work = diameter_px * scale
    times['preprocess'] = time.time() - t
    t = time.time()
    regions, good, _ = find_candidates(work, d_work, meta.get('clustering', clustering),
                                       meta.get('shape', shape), seed)
    times['cluster'] = time.time() - t
    t = time.time()
    score, classes, stride = score_image(model, work, d_work)
    times['score'] = time.time() - t
    thr = float(meta.get('threshold', DEFAULT_THRESHOLD) if threshold is None else threshold)
    xy, sc, cl, removed = picks_from_scores(score, classes, stride, d_work, thr, max_region, shape=work.shape,
                                            edge_margin=edge_margin)
    xy = _to_input_frame(xy, work.shape, image.shape)
    inside = np.all((xy >= -0.5) & (xy <= np.array(image.shape[::-1]) - 0.5), axis=1)
    xy, sc, cl = xy[inside], sc[inside], cl[inside]
    df = pd.DataFrame({star.X: xy[:, 0], star.Y: xy[:, 1], star.SCORE: sc.astype(float),
                       star.CLASS: cl.astype(int)})
    cand = np.array([[r['x'], r['y']] for r in regions]).reshape(-1, 2)
    diag = {'score': score, 'stride': stride, 'scale': scale, 'working_shape': work.shape,
            'diameter_px': float(diameter_px), 'threshold': thr, 'removed_regions': removed,
            'candidates': np.column_stack([_to_input_frame(cand, work.shape, image.shape), good]),
            'training': info, 'times': {**times, 'total': time.time() - t0}}
    if log:
        log(f"{len(df)} picks (threshold {thr:.2f}, {len(regions)} clustering candidates, "
            f"{int(good.sum())} good), {diag['times']['total']:.1f} s")
    return df, model, diag
