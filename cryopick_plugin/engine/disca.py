"""DISCA: unsupervised clustering of subtomograms by YOPO features and Gaussian mixtures.

The generalised EM loop of the DISCA paper (PNAS 2023), ported from its Keras code:

1. features of every subtomogram from the YOPO network (`yopo.py`, eval mode);
2. PCA to 16 dimensions, then a full-covariance Gaussian mixture for every candidate K; the lowest BIC
   wins. For the current K a second mixture is started from the current labels and the better of the two
   is kept, so a good solution is not lost to an unlucky random start;
3. empty clusters are dropped and, when K is unchanged, the new labels are matched to the previous ones
   with the Hungarian method so that cluster numbers keep their meaning between iterations;
4. stop when fewer than 0.1 % of the labels change (same K) or after `max_iter` iterations;
5. score the labels with the distortion-based Davies-Bouldin index (DDBI) of the supplementary material and
   keep the iteration with the lowest one;
6. train: smoothed one-hot labels (the smoothing factor shrinks by 0.9 each iteration), the data plus one
   uniformly random 3D rotation of every subtomogram (corners filled with matching noise), categorical
   hinge loss, Nadam with a learning rate decaying by 0.95 per iteration; when K changed, a new head is
   first trained for a few epochs on the fixed features.

The kept result carries the network weights that produced its features together with the PCA and Gaussian
mixture that produced its labels, so `disca_predict` reproduces the labels of the training data exactly and
assigns new subtomograms to the same clusters with a posterior probability.

Departures from the reference, on purpose: the 'cpu' preset starts from the labels of a Gaussian mixture
on rotation-invariant spectral features (radial power spectrum and radial profile; option `init`) rather
than on the features of the untrained network — the reference can afford many slow iterations to climb out
of a poor start, a CPU run cannot, and a random network's features merge whole classes whose labels the
training then entrenches — and it does not accept convergence before iteration `min_iter` (4), because
labels are trivially stable while the network has barely moved. The 'paper' preset keeps the reference's
start. Both presets seed each Gaussian mixture with k-means++ instead of the reference's random
responsibilities (option `gmm_init`; 'random' reproduces the reference), which can leave EM on the saddle
where all components coincide (see `_gmm`). With the acquisition's tilt range (option `wedge_tilt`) the
rotated training copies get the missing wedge back (`wedge_training`), and the kept clusters go through an
orientation check (`orientation_merge`; `orientation_transfer`, `orientation_groups`): clusters whose
members, rotated, cross into each other are one molecule split by its orientation to the wedge and are
merged. At the end every kept cluster is tested for being two molecules the network has learnt to call
one (`split_check`, on by default): its members' rotation-invariant spectral features, a view the
network's self-training cannot have merged, are split in two when BIC and a clear separation both say so
(`split_cluster`), and pieces of one molecule that splits of different clusters left apart are joined
again (`_rejoin`; bench/README.md §2). When the split check changed the clusters, the network — still
taught to merge them — is trained on the corrected clusters and the EM loop runs again from them for at
most `refine_iter` iterations (`_refine`); the refined clustering is kept when its DDBI beats that of the
split labels, and the checks run once more on it. Further: rotations are uniform on SO(3) (scipy) instead of the SVD
of a random matrix; each subtomogram is normalised to zero mean and unit variance; the 'cpu' preset bins
subtomograms to 24³ and uses a quarter of the width; candidate K is a range capped by the data size.
"""
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.spatial.transform import Rotation
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import homogeneity_completeness_v_measure
from sklearn.mixture import GaussianMixture

from . import geometry, yopo
from .errors import InputError
from .geometry import rotate_volume
from .model_io import load_model, save_model
from .mrc import atomic_path
from .settings import resolve_device

logger = logging.getLogger(__name__)

METHOD = 'disca'

# Training settings for each preset; `disca_cluster(..., options={...})` overrides any of them.
TRAINING = {
    'paper': {'lr': 1e-5, 'batch_size': 64, 'pca_dim': 16, 'reg_covar': 1e-5, 'n_init': 5,
              'gmm_max_iter': 100, 'label_smoothing': 0.2, 'head_epochs': 10, 'head_lr': 1e-4,
              'stable_fraction': 0.999, 'min_per_cluster': 10, 'init': 'network', 'min_iter': 1,
              'wedge_tilt': None, 'wedge_training': True, 'orientation_merge': True, 'gmm_init': 'k-means++',
              'split_check': True, 'refine_iter': 5},
    # Fewer, shorter iterations on a CPU: a larger learning rate gets the features moving within them.
    'cpu': {'lr': 5e-4, 'batch_size': 16, 'pca_dim': 16, 'reg_covar': 1e-5, 'n_init': 3,
            'gmm_max_iter': 100, 'label_smoothing': 0.2, 'head_epochs': 10, 'head_lr': 1e-3,
            'stable_fraction': 0.999, 'min_per_cluster': 10, 'init': 'spectral', 'min_iter': 4,
            'wedge_tilt': None, 'wedge_training': True, 'orientation_merge': True, 'gmm_init': 'k-means++',
            'split_check': True, 'refine_iter': 5},
}
# 20 for the cpu preset too: at SNR 0.1 and 0.03 a run stops on label stability by iteration 9–11 anyway,
# while at SNR 0.01 the clusters keep sharpening to the end (homogeneity after the split check 0.849 at 10
# iterations, 0.875 at 20; bench/README.md §2).
DEFAULT_MAX_ITER = {'paper': 20, 'cpu': 20}


# ---------------------------------------------------------------------------------------------- metrics

def align_labels(reference, labels):
    """Renumber `labels` so that they agree with `reference` as much as possible (Hungarian method).

    Works when the two have different numbers of clusters: clusters of `labels` without a partner get the
    numbers after the largest reference number. Returns a new int array.
    """
    reference = np.asarray(reference, dtype=int)
    labels = np.asarray(labels, dtype=int)
    ref_ids = np.unique(reference)
    lab_ids = np.unique(labels)
    overlap = np.zeros((len(lab_ids), len(ref_ids)), dtype=np.int64)
    np.add.at(overlap, (np.searchsorted(lab_ids, labels), np.searchsorted(ref_ids, reference)), 1)
    rows, cols = linear_sum_assignment(-overlap)
    mapping = {int(lab_ids[r]): int(ref_ids[c]) for r, c in zip(rows, cols)}
    spare = int(ref_ids.max()) + 1 if len(ref_ids) else 0
    for lab in lab_ids:
        if int(lab) not in mapping:
            mapping[int(lab)] = spare
            spare += 1
    return np.array([mapping[int(v)] for v in labels], dtype=int)


def ddbi(features, labels, reg_covar=1e-5):
    """Distortion-based Davies-Bouldin index (DISCA supplementary Eq. 1); lower is better.

    For cluster i with mean μᵢ and precision Pᵢ = (Σᵢ + reg·I)⁻¹: the distortion Tᵢ is the mean squared
    Mahalanobis distance of its members to μᵢ under Pᵢ, and the separation Dᵢⱼ = (μⱼ−μᵢ)ᵀ Pᵢ (μⱼ−μᵢ). The
    index is the mean over clusters j of maxᵢ≠ⱼ (Tᵢ + Tⱼ) / (Dᵢⱼ + Dⱼᵢ). One cluster gives inf.
    """
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    ids = np.unique(labels)
    if len(ids) < 2:
        return float('inf')
    d = features.shape[1]
    means, precisions, distortion = [], [], []
    for c in ids:
        members = features[labels == c]
        mu = members.mean(axis=0)
        cov = np.cov(members.T, bias=False).reshape(d, d) if len(members) > 1 else np.zeros((d, d))
        prec = np.linalg.inv(cov + reg_covar * np.eye(d))
        diff = members - mu
        distortion.append(float(np.mean(np.einsum('ni,ij,nj->n', diff, prec, diff))))
        means.append(mu)
        precisions.append(prec)
    means = np.array(means)
    k = len(ids)
    sep = np.zeros((k, k))
    for i in range(k):
        diff = means - means[i]
        sep[i] = np.einsum('ni,ij,nj->n', diff, precisions[i], diff)
    ratio = np.zeros((k, k))
    for i in range(k):
        for j in range(k):
            if i != j:
                ratio[i, j] = (distortion[i] + distortion[j]) / max(sep[i, j] + sep[j, i], 1e-300)
    return float(np.mean(ratio.max(axis=0)))


def clustering_scores(truth, labels):
    """Agreement with known classes: Hungarian accuracy, homogeneity, completeness, V-measure, K found."""
    truth = np.asarray(truth, dtype=int)
    labels = np.asarray(labels, dtype=int)
    h, c, v = homogeneity_completeness_v_measure(truth, labels)
    accuracy = float(np.mean(align_labels(truth, labels) == truth))
    return {'accuracy': accuracy, 'homogeneity': float(h), 'completeness': float(c), 'v_measure': float(v),
            'k': int(len(np.unique(labels)))}


# ------------------------------------------------------------------------------------ mixture fitting

def _compact(labels):
    """Renumber labels 0..K-1 in order of first component number (drops empty components)."""
    ids, compact = np.unique(labels, return_inverse=True)
    return compact.astype(int), ids


GMM_INITS = ('k-means++', 'kmeans', 'random')


def _gmm(k, options, seed, tol, init_from=None):
    # The reference starts EM from random responsibilities ('random'): every component then begins at
    # the global mean with the global covariance — a saddle point that EM leaves slowly, so with tol 1e-4
    # a fit often stops there after two steps, with components stacked on one another. Such a fit costs
    # parameters without gaining likelihood and BIC rejects its K: two clusters 8 σ apart came out as
    # K = 1, and the spectral start at SNR 0.03 as K = 4 instead of 5 (bench/README.md §2). k-means++
    # seeding puts the components on separate points from the start.
    kwargs = dict(n_components=k, covariance_type='full', tol=tol, reg_covar=options['reg_covar'],
                  max_iter=options['gmm_max_iter'], random_state=seed,
                  init_params=options.get('gmm_init', 'k-means++'))
    if init_from is not None:
        weights, means, precisions = init_from
        # Started from the current solution; extra random restarts would only compete with it.
        kwargs.update(n_init=1, weights_init=weights, means_init=means, precisions_init=precisions)
    else:
        kwargs.update(n_init=options['n_init'])
    return GaussianMixture(**kwargs)


def _init_from_labels(x, labels, k, reg_covar):
    weights, means, precisions = [], [], []
    for j in range(k):
        members = x[labels == j]
        if len(members) < 2:
            return None
        weights.append(len(members) / len(x))
        means.append(members.mean(axis=0))
        precisions.append(np.linalg.inv(np.cov(members.T).reshape(x.shape[1], x.shape[1])
                                        + reg_covar * np.eye(x.shape[1])))
    return np.array(weights), np.array(means), np.array(precisions)


def fit_mixtures(x, candidate_ks, options, seed, current_k=None, current_labels=None):
    """Fit a Gaussian mixture for every candidate K and keep the lowest BIC.

    Returns (labels compacted to 0..K-1, the chosen GaussianMixture, component number of each label,
    {k: BIC}). For `current_k` a mixture started from `current_labels` competes with the random one.
    """
    bics, fits = {}, {}
    for k in candidate_ks:
        tried = []
        if k == current_k and current_labels is not None:
            init = _init_from_labels(x, current_labels, k, options['reg_covar'])
            if init is not None:
                tried.append(_gmm(k, options, seed, 1e-3, init))
            tried.append(_gmm(k, options, seed, 1e-3))
        else:
            tried.append(_gmm(k, options, seed, 1e-4))
        best = None
        for gmm in tried:
            try:
                with warnings.catch_warnings():
                    # 100 EM steps as in the reference; a start that has not settled still gets its BIC.
                    warnings.simplefilter('ignore', ConvergenceWarning)
                    gmm.fit(x)
            except (ValueError, np.linalg.LinAlgError) as exc:  # a degenerate start: skip it
                logger.debug('GMM k=%d failed: %s', k, exc)
                continue
            bic = float(gmm.bic(x))
            if best is None or bic < best[0]:
                best = (bic, gmm)
        if best is not None:
            bics[int(k)], fits[int(k)] = best
    if not fits:
        raise RuntimeError('no Gaussian mixture could be fitted to the features')
    k_best = min(bics, key=bics.get)
    gmm = fits[k_best]
    labels, components = _compact(gmm.predict(x))
    return labels, gmm, components, bics


SAMPLES_PER_PARAMETER = 30


def bic_dim(n, samples_per_parameter=SAMPLES_PER_PARAMETER):
    """Largest PCA dimension d whose full-covariance Gaussian (d + d(d+1)/2 + 1 free parameters) has at
    least `samples_per_parameter` subtomograms per parameter.

    BIC charges every component its parameter count times log N. With 16 dimensions a component costs 153
    parameters, and a thousand subtomograms cannot pay for a fifth class even when it is perfectly
    separated: K collapses (measured in bench/README.md §2). Fewer dimensions for fewer subtomograms keep
    the estimate of K honest; large sets get the full preset dimension back.
    """
    d = 1
    while (d + 1) + (d + 1) * (d + 2) // 2 + 1 <= n / samples_per_parameter:
        d += 1
    return d


def candidate_ks(n, k_range, min_per_cluster=10):
    """The candidate K values for n subtomograms: k_range capped at n // min_per_cluster.

    Raises InputError when even the smallest K would leave fewer than `min_per_cluster` per cluster.
    """
    k_min, k_max = int(k_range[0]), int(k_range[1])
    if k_min < 1 or k_max < k_min:
        raise InputError('k_range', f"bad range of cluster numbers {k_min}..{k_max}")
    cap = n // int(min_per_cluster)
    if cap < k_min:
        raise InputError('subtomograms', f"{n} subtomograms are too few for at least {k_min} clusters "
                                         f"(need {min_per_cluster} per cluster, i.e. {k_min * min_per_cluster})")
    if cap < k_max:
        logger.info('largest K lowered from %d to %d (%d subtomograms, at least %d per cluster)',
                    k_max, cap, n, min_per_cluster)
    return list(range(k_min, min(k_max, cap) + 1))


# ------------------------------------------------------------------------------------- augmentation

def random_rotations(stack, rng, order=1, tilt_range=None, matrices=None):
    """Each subtomogram rotated by its own uniformly random 3D rotation; corners filled with noise.

    Voxels that the rotation brings in from outside the box get Gaussian noise with the mean and standard
    deviation of that subtomogram's own corners (outside the inscribed sphere), so no blank corners tell
    the network how a subtomogram was turned.

    tilt_range (degrees, optional): re-impose the acquisition's missing wedge (tilt axis Y, beam Z) after
    the rotation, then restore each subtomogram's mean and standard deviation. A rotated subtomogram
    otherwise carries its wedge in a direction no real subtomogram has, and the network can learn the
    molecule's orientation relative to the wedge — which splits a class into "top" and "side" views. With
    the wedge put back where the microscope leaves it, the rotated copy looks like a real subtomogram of
    the same molecule in another orientation, so the training (same label for both) teaches invariance to
    the particle-versus-wedge orientation as well.

    matrices (optional, (n, 3, 3)): these rotations instead of random ones (identities give copies that
    went through the same interpolation, noise and wedge, for comparison).
    """
    n, b = len(stack), stack.shape[-1]
    wedge = None
    if tilt_range is not None:
        if not 0 < float(tilt_range) < 90:
            raise InputError('wedge tilt range', f"must be between 0 and 90 degrees, got {tilt_range:g}")
        wedge = geometry.wedge_mask((b, b, b), float(tilt_range))[:, :, :b // 2 + 1]
    matrices = Rotation.random(n, random_state=rng).as_matrix() if matrices is None else np.asarray(matrices)
    grid = np.indices((b, b, b)) - (b - 1) / 2.0
    corners = np.sqrt((grid ** 2).sum(axis=0)) > (b - 1) / 2.0
    out = np.empty_like(stack)
    ones = np.ones((b, b, b), dtype=np.float32)
    for i in range(n):
        rotated = rotate_volume(stack[i], matrices[i], order=order)
        inside = rotate_volume(ones, matrices[i], order=0) > 0.5
        background = stack[i][corners]
        noise = rng.normal(background.mean(), background.std() + 1e-6, size=int((~inside).sum()))
        rotated[~inside] = noise.astype(np.float32)
        if wedge is not None:
            mean, std = float(stack[i].mean()), float(stack[i].std())
            rotated = np.fft.irfftn(np.fft.rfftn(rotated) * wedge, s=(b, b, b))
            rotated = (rotated - rotated.mean()) / (rotated.std() + 1e-6) * std + mean
        out[i] = rotated
    return out


# ------------------------------------------------------------------------------------------- result

@dataclass
class DiscaResult:
    """What `disca_cluster` returns. Labels are 0-based; `k` clusters."""
    labels: np.ndarray                 # (N,) cluster of each subtomogram, 0..k-1, at the kept iteration
    probabilities: np.ndarray          # (N, k) Gaussian-mixture posterior of each cluster
    k: int
    best_iteration: int
    history: list                      # one dict per iteration (see disca_cluster)
    features: np.ndarray               # (N, feature_dim) network features of the kept iteration
    features_pca: np.ndarray           # (N, d) their PCA projection, where the mixture was fitted
    embeddings: list                   # per iteration: (N, 2) float32, first two PCA components
    iteration_labels: list             # per iteration: (N,) labels
    model_state: dict                  # network + PCA + mixture tensors, for save_disca_model
    arch: dict
    options: dict
    meta: dict = field(default_factory=dict)
    # labels after the first pass of the checks, before refinement re-trained on them (None without one)
    unrefined_labels: np.ndarray = None

    def class_sizes(self):
        return np.bincount(self.labels, minlength=self.k).tolist()


def _mixture_state(pca, gmm, components):
    """PCA and Gaussian-mixture parameters as float64 tensors (for the model file)."""
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))
    return {'pca.mean': t(pca.mean_), 'pca.components': t(pca.components_),
            'gmm.weights': t(gmm.weights_), 'gmm.means': t(gmm.means_),
            'gmm.precisions_cholesky': t(gmm.precisions_cholesky_),
            'gmm.covariances': t(gmm.covariances_),
            'gmm.label_of_component': torch.from_numpy(components.astype(np.int64))}


def _posterior(x_pca, state):
    """Cluster posterior (N, K) of PCA features under the stored mixture, components merged into labels."""
    weights = state['gmm.weights'].numpy()
    means = state['gmm.means'].numpy()
    chol = state['gmm.precisions_cholesky'].numpy()
    label_of = state['gmm.label_of_component'].numpy()
    n_comp, d = means.shape
    log_p = np.empty((len(x_pca), n_comp))
    for c in range(n_comp):
        y = (x_pca - means[c]) @ chol[c]
        log_det = np.sum(np.log(np.diag(chol[c])))
        log_p[:, c] = np.log(weights[c]) - 0.5 * (d * np.log(2 * np.pi) + (y ** 2).sum(axis=1)) + log_det
    log_p -= log_p.max(axis=1, keepdims=True)
    resp = np.exp(log_p)
    resp /= resp.sum(axis=1, keepdims=True)
    # Components that ended empty on the training data have no label; their share goes to the others.
    k = int(label_of.max()) + 1
    merged = np.zeros((len(x_pca), k))
    for c in range(n_comp):
        if label_of[c] >= 0:
            merged[:, label_of[c]] += resp[:, c]
    merged /= np.maximum(merged.sum(axis=1, keepdims=True), 1e-300)
    return merged


# --------------------------------------------------------------------------------------- main loop

class _DeterministicTorch:
    """Deterministic torch algorithms on CPU for the duration of a run, restored afterwards."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        self.previous = torch.are_deterministic_algorithms_enabled()
        if self.device == 'cpu':
            torch.use_deterministic_algorithms(True)
        return self

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.previous)
        return False


def _train_head(head, features, targets, options, generator, device):
    """Train a new head alone on fixed features (reference: 10 epochs, Nadam 1e-4, categorical hinge)."""
    head.train()
    opt = torch.optim.NAdam(head.parameters(), lr=options['head_lr'], betas=(0.9, 0.999), eps=1e-8)
    f = torch.from_numpy(features).to(device)
    t = torch.from_numpy(targets).to(device)
    bs = options['batch_size']
    for _ in range(options['head_epochs']):
        order = torch.randperm(len(f), generator=generator)
        for start in range(0, len(f), bs):
            idx = order[start:start + bs].to(device)
            loss = yopo.categorical_hinge(head(f[idx]), t[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


def _train_epoch(net, head, opt, data, targets, options, generator, device):
    """One epoch over (data, targets) in random order; returns the mean loss."""
    net.train()
    head.train()
    order = torch.randperm(len(data), generator=generator).numpy()
    bs = options['batch_size']
    total, count = 0.0, 0
    for start in range(0, len(data), bs):
        idx = order[start:start + bs]
        if len(idx) < 2:  # batch norm needs two samples
            continue
        x = torch.from_numpy(data[idx][:, None]).to(device)
        t = torch.from_numpy(targets[idx]).to(device)
        loss = yopo.categorical_hinge(head(net(x)), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(idx)
        count += len(idx)
    return total / max(count, 1)


def _write_progress(out_dir, history, embeddings, iteration_labels):
    with atomic_path(os.path.join(out_dir, 'history.json')) as tmp:
        with open(tmp, 'w') as fh:
            json.dump({'iterations': history}, fh, indent=1)
    with atomic_path(os.path.join(out_dir, 'embeddings.npz'), suffix='.npz') as tmp:
        with open(tmp, 'wb') as fh:
            np.savez_compressed(fh, embeddings=np.stack(embeddings), labels=np.stack(iteration_labels))


def disca_cluster(stack, preset='cpu', k_range=(2, 20), max_iter=None, seed=0, device='auto', log=None,
                  out_dir=None, arch=None, options=None):
    """Cluster a stack of subtomograms with DISCA.

    stack: (N, b, b, b) array (b ≥ 21 after binning); preset: 'cpu' or 'paper' (network width, input box
    and training settings); k_range: (smallest, largest) number of clusters tried, the largest capped at
    N // min_per_cluster; max_iter: EM iterations (preset default); seed: makes the run reproducible;
    device: 'auto' | 'cpu' | 'cuda'; log: callable receiving one progress line per iteration; out_dir:
    when given, history.json and embeddings.npz there are rewritten after every iteration; arch / options:
    dictionaries overriding the preset's architecture (`yopo.PRESETS`) and training settings (`TRAINING`).

    Returns a DiscaResult. Each history entry holds: iteration, phase ('cluster', or 'refine' for the EM
    iterations run again after the split check changed the clusters — `_refine`), k, bic (of the chosen
    mixture), bic_by_k, ddbi, changed (fraction of labels that changed, 1.0 at the first iteration), loss (training loss after
    the clustering of that iteration, None when not trained), lr, smoothing, head_k (outputs of the head
    trained), head_rebuilt (a new head was made because K changed), sizes, time_s.
    """
    preset_name = preset if isinstance(preset, str) else 'cpu'
    arch = yopo.make_arch(preset if arch is None else arch)
    opts = dict(TRAINING.get(preset_name, TRAINING['cpu']))
    opts.update(options or {})
    if opts.get('gmm_init', 'k-means++') not in GMM_INITS:
        raise InputError('gmm_init', f"unknown mixture initialisation {opts['gmm_init']!r} "
                                     f"({', '.join(GMM_INITS)})")
    max_iter = int(max_iter or DEFAULT_MAX_ITER.get(preset_name, 12))
    if max_iter < 1:
        raise InputError('max_iter', 'must be at least 1')
    device = resolve_device(device)
    say = log or (lambda line: logger.info('%s', line))

    data = yopo.prepare_stack(stack, arch)
    n = len(data)
    ks = candidate_ks(n, k_range, opts['min_per_cluster'])
    # A full covariance in d dimensions is singular with fewer than d + 1 members; with small data the PCA
    # is narrowed so that even the largest K leaves every cluster more members than dimensions.
    pca_dim = int(max(2, min(opts['pca_dim'], arch['feature_dim'], n // ks[-1] - 1, n - 1, bic_dim(n))))
    if len(ks) and ks[-1] < int(k_range[1]):
        say(f'K capped at {ks[-1]} for {n} subtomograms ({opts["min_per_cluster"]} per cluster at least)')

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)

    with _DeterministicTorch(device):
        net = yopo.build_features(arch).to(device)
        loop = {'head': None, 'opt': None, 'k': None, 'labels': None,
                'smoothing': float(opts['label_smoothing']), 'lr': float(opts['lr'])}
        history, embeddings, iteration_labels = [], [], []

        def train(features, labels, k, rebuild):
            """One epoch on smoothed labels (augmented by random rotations), a new head first when K
            changed; returns the history fields of the training."""
            loop['smoothing'] *= 0.9
            one_hot = np.eye(k, dtype=np.float32)[labels]
            targets = one_hot * (1.0 - loop['smoothing']) + loop['smoothing'] / k
            if rebuild:
                loop['head'] = yopo.YOPOHead(arch['feature_dim'], k).to(device)
                _train_head(loop['head'], features, one_hot, opts, generator, device)
                loop['opt'] = torch.optim.NAdam(list(net.parameters()) + list(loop['head'].parameters()),
                                                lr=loop['lr'], betas=(0.9, 0.999), eps=1e-8)
            loop['lr'] *= 0.95
            for group in loop['opt'].param_groups:
                group['lr'] = loop['lr']
            augmented = np.concatenate([data, random_rotations(data, rng,
                                                               tilt_range=opts.get('wedge_tilt')
                                                               if opts.get('wedge_training', True) else None)])
            loss = _train_epoch(net, loop['head'], loop['opt'], augmented, np.tile(targets, (2, 1)), opts,
                                generator, device)
            return {'loss': loss, 'lr': loop['lr'], 'smoothing': loop['smoothing'], 'head_k': loop['head'].k,
                    'head_rebuilt': bool(rebuild)}

        def iterate(first, count, eligible_from, min_iter, phase):
            """EM iterations first .. first + count - 1 (features → PCA → mixtures → training); returns the
            eligible iteration with the lowest DDBI (None when none was eligible)."""
            best = None
            for it in range(first, first + count):
                t0 = time.time()
                features = yopo.extract_features(net, data, device, batch_size=max(opts['batch_size'], 64))
                pca = PCA(n_components=pca_dim, random_state=seed).fit(features)
                x = pca.transform(features)
                if it == 0 and count > 1 and opts.get('init') == 'spectral':
                    # First labels from rotation-invariant spectra instead of an untrained network's features
                    # (see the module doc); the network then learns from them. Such an iteration is never
                    # kept (its mixture lives in another feature space than the network's), so a
                    # one-iteration run clusters the network's features as the reference does.
                    x = spectral_embedding(stack, pca_dim, seed)
                new_labels, gmm, components, bics = fit_mixtures(x, ks, opts, seed + it, loop['k'], loop['labels'])
                new_k = int(new_labels.max()) + 1
                same_k = new_k == loop['k']
                if same_k:
                    aligned = align_labels(loop['labels'], new_labels)
                    # Keep the component → label map in step with the renumbering.
                    components = components[np.argsort([aligned[new_labels == j][0] for j in range(new_k)])]
                    new_labels = aligned
                changed = 1.0 if loop['labels'] is None else float(np.mean(new_labels != loop['labels']))
                labels = loop['labels'] = new_labels
                k = loop['k'] = new_k
                score = ddbi(x, labels, opts['reg_covar'])
                embeddings.append(x[:, :2].astype(np.float32))
                iteration_labels.append(labels.copy())
                entry = {'iteration': it, 'phase': phase, 'k': k, 'bic': bics[int(gmm.n_components)],
                         'bic_by_k': {str(kk): v for kk, v in bics.items()}, 'ddbi': score, 'changed': changed,
                         'loss': None, 'lr': None, 'smoothing': None, 'head_k': None, 'head_rebuilt': False,
                         'sizes': np.bincount(labels, minlength=k).tolist()}
                if it >= eligible_from and (best is None or score < best['ddbi']):
                    label_of = np.full(gmm.n_components, -1, dtype=np.int64)
                    for j in range(k):
                        label_of[components[j]] = j
                    state = {f'net.{key}': v.detach().cpu().clone() for key, v in net.state_dict().items()}
                    state.update(_mixture_state(pca, gmm, label_of))
                    best = {'iteration': it, 'ddbi': score, 'labels': labels.copy(), 'k': k, 'state': state,
                            'features': features, 'x': x, 'probabilities': _posterior(x, state)}
                converged = (it - first >= min_iter and same_k and (1.0 - changed) > opts['stable_fraction'])
                last = converged or it == first + count - 1
                if not last:
                    entry.update(train(features, labels, k, not same_k))
                entry['time_s'] = time.time() - t0
                history.append(entry)
                say(f"iteration {it}: K={k} BIC={entry['bic']:.1f} DDBI={score:.4f} changed={changed:.3f} "
                    f"loss={entry['loss'] if entry['loss'] is None else round(entry['loss'], 4)} "
                    f"sizes={entry['sizes']} {entry['time_s']:.1f}s")
                if out_dir:
                    _write_progress(out_dir, history, embeddings, iteration_labels)
                if last:
                    return best
            return best

        # The reference keeps only iterations of a trained network when there are any.
        best = iterate(0, max_iter, 1 if max_iter > 1 else 0, max(1, int(opts.get('min_iter', 1))), 'cluster')
        say(f"kept iteration {best['iteration']}: K={best['k']} DDBI={best['ddbi']:.4f}")
        meta = {'input_box': int(np.asarray(stack).shape[-1]), 'network_box': int(data.shape[-1]),
                'n_train': n, 'seed': seed, 'preset': preset_name, 'pca_dim': pca_dim, 'k_candidates': ks,
                'normalisation': 'per-subtomogram zero mean, unit variance',
                'prediction': 'network features -> PCA -> Gaussian mixture posterior'}
        best = _check_kept(best, stack, data, arch, opts, ks, rng, seed, device, say, meta)
        refine_iter = int(opts.get('refine_iter', 0) or 0)
        unrefined = None
        if refine_iter > 0 and any(t.get('accepted') for t in meta.get('split_check', [])):
            unrefined = best['labels']
            best = _refine(best, net, loop, train, iterate, data, len(history), refine_iter, stack, arch, opts,
                           ks, rng, seed, device, say, meta)
    meta.update({'k': best['k'], 'best_iteration': best['iteration'], 'ddbi': best['ddbi'],
                 'iterations': len(history)})
    return DiscaResult(labels=best['labels'], probabilities=best['probabilities'], k=best['k'],
                       best_iteration=best['iteration'], history=history, features=best['features'],
                       features_pca=best['x'], embeddings=embeddings, iteration_labels=iteration_labels,
                       model_state=best['state'], arch=arch, options=opts, meta=meta,
                       unrefined_labels=unrefined)


def _check_kept(best, stack, data, arch, opts, ks, rng, seed, device, say, meta):
    """The checks on a kept clustering: clusters that are one molecule in different orientations are
    merged (with the tilt range given), then clusters holding two molecules are split (`_split_mixed`).
    What each check did goes into meta (replacing an earlier pass's record)."""
    meta.pop('orientation_merge', None)
    meta.pop('split_check', None)
    if opts.get('wedge_tilt') and opts.get('orientation_merge', True) and best['k'] > 1:
        best, meta['orientation_merge'] = _merge_orientations(best, data, arch, opts, rng, device, say)
    if opts.get('split_check', True):
        best, meta['split_check'] = _split_mixed(best, stack, opts, ks[-1] if ks else best['k'], seed, say)
        if any(t.get('accepted') for t in meta['split_check']):
            meta['prediction'] = ('network features -> PCA -> Gaussian mixture posterior'
                                  ' -> split tests on spectral features (split_check)')
    return best


def _refine(best, net, loop, train, iterate, data, first, count, stack, arch, opts, ks, rng, seed, device,
            say, meta):
    """EM iterations again after the split check changed the clusters.

    The self-training had taught the network to call the molecules of a split cluster one class, so its
    features still merge them and only the spectral split tests tell them apart. Here the network starts
    from the kept iteration, gets a new head for the corrected clusters and is trained on them, and the
    EM loop goes on for at most `count` iterations from those labels (K free again). The refined
    clustering replaces the split one when its DDBI is lower than the split labels' DDBI in the kept
    iteration's feature space (the criterion that chose the kept iteration); the checks then run again on
    it. meta['refine'] records the comparison."""
    split = best
    split_score = ddbi(split['x'], split['labels'], opts['reg_covar'])
    net.load_state_dict({key[4:]: v for key, v in split['state'].items() if key.startswith('net.')})
    features = yopo.extract_features(net, data, device, batch_size=max(opts['batch_size'], 64))
    loop['labels'], loop['k'] = split['labels'].copy(), int(split['k'])
    fitted = train(features, split['labels'], int(split['k']), True)
    say(f"refinement: network trained on the {split['k']} clusters of the split check "
        f"(loss {fitted['loss']:.4f}); {count} more iterations at most")
    # Its first clustering still sees features trained on the merged clusters for all but one epoch (as
    # the untrained network's at iteration 0 of the main loop): not eligible when there are later ones.
    refined = iterate(first, count, first + 1 if count > 1 else first, 0, 'refine')
    info = {'from_iteration': int(split['iteration']), 'k_split': int(split['k']), 'ddbi_split': split_score,
            'first_iteration': int(first), 'training_loss': fitted['loss'],
            'split_check_before': meta.get('split_check')}
    if refined is None or refined['ddbi'] >= split_score:
        info['kept'] = False
        say(f"refinement: split clustering kept (DDBI {split_score:.4f} ≤ "
            f"{'-' if refined is None else round(refined['ddbi'], 4)})")
        meta['refine'] = info
        return split
    info.update({'kept': True, 'iteration': int(refined['iteration']), 'k_refined': int(refined['k']),
                 'ddbi_refined': refined['ddbi']})
    say(f"refinement: kept iteration {refined['iteration']}: K={refined['k']} DDBI={refined['ddbi']:.4f} "
        f"(split labels {split_score:.4f})")
    refined = _check_kept(refined, stack, data, arch, opts, ks, rng, seed, device, say, meta)
    meta['refine'] = info
    return refined


# ------------------------------------------------------------------------- orientation-split clusters

ORIENTATION_MIN_SHARE = 0.1


def orientation_transfer(data, net, state, labels, tilt_range, rng, device='cpu', batch_size=64, copies=2):
    """Where rotated copies of each cluster's members are assigned, against unrotated controls.

    Every member gets `copies` uniformly random rotations with the acquisition's missing wedge put back
    (`random_rotations(tilt_range=)`), i.e. it is shown as the same molecule in other orientations; the
    kept network, PCA and mixture assign the copies. transfer[a, b] = share of cluster a's copies assigned
    to b. control[a, b] = the same for copies rotated by the identity (same interpolation, corner noise and
    wedge), the share that changes cluster for no change of orientation. Returns (transfer, control), K×K.
    """
    k = int(labels.max()) + 1
    n = len(data)

    def assign(copies_stack):
        feats = yopo.extract_features(net, copies_stack, device, batch_size)
        x = (feats.astype(np.float64) - state['pca.mean'].numpy()) @ state['pca.components'].numpy().T
        return _posterior(x, state).argmax(axis=1)

    def shares(assigned, members):
        table = np.zeros((k, k))
        np.add.at(table, (members, assigned), 1.0)
        return table / np.maximum(table.sum(axis=1, keepdims=True), 1.0)

    moved = [assign(random_rotations(data, rng, tilt_range=tilt_range)) for _ in range(int(copies))]
    transfer = shares(np.concatenate(moved), np.tile(labels, int(copies)))
    identity = np.broadcast_to(np.eye(3), (n, 3, 3))
    control = shares(assign(random_rotations(data, rng, tilt_range=tilt_range, matrices=identity)), labels)
    return transfer, control


def orientation_groups(transfer, control, min_share=ORIENTATION_MIN_SHARE):
    """Clusters to merge: a and b are one molecule seen in different orientations when turning the
    members of each sends at least `min_share` more of them into the other than the unrotated control
    does — in both directions (different molecules stay put however they are turned; the views of one
    molecule cross over both ways). Returns a list of groups (sorted lists of cluster indices), one per
    resulting cluster, ordered by their smallest member."""
    k = len(transfer)
    gain = np.asarray(transfer) - np.asarray(control)
    parent = list(range(k))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a in range(k):
        for b in range(a + 1, k):
            if gain[a, b] >= min_share and gain[b, a] >= min_share:
                parent[root(b)] = root(a)
    groups = {}
    for i in range(k):
        groups.setdefault(root(i), []).append(i)
    return sorted((sorted(g) for g in groups.values()), key=lambda g: g[0])


# ------------------------------------------------------------------------------------- mixed clusters

SPLIT_DIM = 2
SPLIT_MIN_SEPARATION = 3.0
SPLIT_MAX_DEPTH = 3
SPLIT_MAX_CROSSING = 0.5


def _standardised(x, mean, std):
    return (np.asarray(x, dtype=np.float64) - mean) / std


def split_cluster(features, options, seed=0, dim=SPLIT_DIM, min_separation=SPLIT_MIN_SEPARATION,
                  min_size=10):
    """Test whether one cluster's members form two groups; return (accepted, side (N,) 0/1, state, info).

    features: (N, F) rotation-invariant features of the members (`spectral_features`). They are
    standardised over the members — so that what varies inside this cluster, not between clusters, sets
    the scale — and reduced by PCA to `dim` dimensions, where one and two full-covariance Gaussians are
    fitted. The split is accepted when two components have the lower BIC, both sides hold at least
    `min_size` members, and the two means lie at least `min_separation` apart in the Mahalanobis metric
    of the pooled covariance. BIC alone is not enough: a two-component fit to one noisy, non-Gaussian
    group can win by a little, with the means only ≈ 1–2.5 apart (Ashman's D; measured 3.1–4.6 on two
    merged molecules, 2.7 on one molecule split by its orientation to the wedge at SNR 0.1, 1.3 for a
    skewed single group — bench/README.md §2). `state` holds the standardisation,
    PCA and two-component mixture as tensors (for the model file; `_split_side` applies it).
    """
    x = np.asarray(features, dtype=np.float64)
    info = {'members': int(len(x)), 'accepted': False}
    if len(x) < 2 * min_size:
        info['reason'] = 'too few members'
        return False, None, None, info
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-8
    z = _standardised(x, mean, std)
    pca = PCA(n_components=int(min(dim, z.shape[1], len(z) - 1)), random_state=seed).fit(z)
    p = pca.transform(z)
    fits = []
    for k in (1, 2):
        gmm = _gmm(k, options, seed, 1e-4)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', ConvergenceWarning)
            gmm.fit(p)
        fits.append(gmm)
    one, two = fits
    side = two.predict(p)
    pooled = np.einsum('k,kij->ij', two.weights_, two.covariances_)
    delta = two.means_[1] - two.means_[0]
    separation = float(np.sqrt(delta @ np.linalg.solve(pooled, delta)))
    sizes = np.bincount(side, minlength=2)
    info.update({'bic_one': float(one.bic(p)), 'bic_two': float(two.bic(p)), 'separation': separation,
                 'sizes': sizes.tolist()})
    if info['bic_two'] >= info['bic_one']:
        info['reason'] = 'one Gaussian explains the members as well (BIC)'
    elif separation < min_separation:
        info['reason'] = f'the two groups are not separated (Mahalanobis {separation:.2f} < {min_separation:g})'
    elif sizes.min() < min_size:
        info['reason'] = f'one side would hold fewer than {min_size} members'
    else:
        info['accepted'] = True
        state = _mixture_state(pca, two, np.array([0, 1]))
        state.update({'scale.mean': torch.from_numpy(mean), 'scale.std': torch.from_numpy(std)})
        return True, side, state, info
    return False, None, None, info


def _split_side(features, state):
    """Posterior (N, 2) of the two sides of a stored split for members' spectral features."""
    z = _standardised(features, state['scale.mean'].numpy(), state['scale.std'].numpy())
    x = (z - state['pca.mean'].numpy()) @ state['pca.components'].numpy().T
    return _posterior(x, state)


def split_crossing(stack, members, side, state, tilt_range, rng, copies=2):
    """Whether a split is one molecule seen in two ranges of orientations: the members of each side are
    rotated at random with the acquisition's missing wedge put back (`random_rotations`) and assigned
    to a side again; the same with identity rotations is the control. Returns the share of rotated copies
    that changed side, summed over the two sides, minus the same sum for the control. For one molecule
    split by orientation a rotated copy lands on a side in proportion to that side's range of
    orientations, so the shares sum to about 1; for two molecules they stay near 0 (measured 0.21–0.34
    for merged molecules at SNR 0.01–0.03, 0.57–0.83 for orientation splits — bench/README.md §2)."""
    stack = np.asarray(stack)
    members = np.asarray(members)
    side = np.asarray(side)

    def moved(matrices):
        q = _split_side(spectral_features(random_rotations(stack[members], rng, tilt_range=tilt_range,
                                                           matrices=matrices)), state)
        new_side = (q[:, 1] > q[:, 0]).astype(int)
        return sum(float(np.mean(new_side[side == s] != s)) for s in (0, 1))

    turned = np.mean([moved(None) for _ in range(int(copies))])
    control = moved(np.broadcast_to(np.eye(3), (len(members), 3, 3)))
    return float(turned - control)


def _split_mixed(best, stack, opts, k_max, seed, say):
    """Run `split_cluster` on every kept cluster, and again on the two sides of an accepted split (to
    `SPLIT_MAX_DEPTH` levels, K at most k_max). An accepted split gives the second side a new label; the
    node (parent label, child label, state) is stored in the model so that prediction replays the splits
    in the same order. With the acquisition's tilt range (option `wedge_tilt`) a split must also pass
    `split_crossing` (not one molecule split by its orientation to the wedge). Returns (updated best, one
    info dict per test)."""
    features = spectral_features(stack)
    tilt_range = opts.get('wedge_tilt')
    rng = np.random.default_rng(seed + 7919)
    labels = best['labels'].copy()
    prob = best['probabilities'].copy()
    state = dict(best['state'])
    k = int(best['k'])
    tests, nodes = [], 0
    queue = [(c, 0) for c in range(k)]
    while queue:
        c, depth = queue.pop(0)
        if depth >= SPLIT_MAX_DEPTH or k >= k_max:
            continue
        members = np.flatnonzero(labels == c)
        accepted, side, node_state, info = split_cluster(features[members], opts, seed,
                                                         min_size=int(opts['min_per_cluster']))
        info.update({'kind': 'split', 'cluster': int(c), 'depth': depth})
        tests.append(info)
        if accepted and tilt_range:
            info['crossing'] = split_crossing(stack, members, side, node_state, tilt_range, rng)
            if info['crossing'] >= SPLIT_MAX_CROSSING:
                accepted = info['accepted'] = False
                info['reason'] = (f"one molecule in two ranges of orientations (rotated members change side: "
                                  f"{info['crossing']:.2f} ≥ {SPLIT_MAX_CROSSING:g})")
        if not accepted:
            continue
        labels[members[side == 1]] = k
        q = _split_side(features, node_state)
        prob = np.concatenate([prob, prob[:, c:c + 1] * q[:, 1:2]], axis=1)
        prob[:, c] *= q[:, 0]
        state.update({f'split.{nodes}.{key}': v for key, v in node_state.items()})
        state[f'split.{nodes}.labels'] = torch.tensor([c, k], dtype=torch.int64)
        info['child'] = k
        say(f"split check: cluster {c} ({len(members)}) is two groups on spectral features "
            f"(separation {info['separation']:.2f}, sizes {info['sizes']}) → clusters {c} and {k}")
        queue += [(c, depth + 1), (k, depth + 1)]
        k += 1
        nodes += 1
    if nodes == 0:
        say('split check: no cluster is two groups on spectral features')
        return best, tests
    touched = sorted({t['cluster'] for t in tests if t['accepted']} | {t['child'] for t in tests if t['accepted']})
    final_of, rejoins = _rejoin(features, labels, touched, opts, seed, say)
    tests += rejoins
    state['splitmap.final_of'] = torch.from_numpy(final_of)
    labels, prob = _relabel(final_of, labels, prob)
    best = dict(best, labels=labels, k=prob.shape[1], state=state, probabilities=prob)
    return best, tests


def _rejoin(features, labels, touched, opts, seed, say):
    """Join again the pieces of one molecule that splits of different clusters left apart.

    When two clusters each held part of the same molecule (mixed with a different one), the splits leave
    that molecule in two clusters. Among the clusters the splits made or changed, a pair whose union
    `split_cluster` does not split is one group; the closest such pair (lowest separation) is joined, and
    the test repeated until no pair qualifies. Returns (final label of each label (int64 array, compact,
    in order of first appearance), one info dict per tested pair)."""
    groups = {c: [c] for c in touched}
    tests = []
    while True:
        candidates = []
        keys = sorted(groups)
        for i, a in enumerate(keys):
            for b in keys[i + 1:]:
                members = np.flatnonzero(np.isin(labels, groups[a] + groups[b]))
                split, _, _, info = split_cluster(features[members], opts, seed,
                                                  min_size=int(opts['min_per_cluster']))
                info = {'kind': 'rejoin', 'clusters': [int(a), int(b)], 'members': info['members'],
                        'separation': info.get('separation'), 'one_group': not split,
                        'joined': False}
                tests.append(info)
                if not split:
                    candidates.append((info['separation'] if info['separation'] is not None else 0.0, a, b, info))
        if not candidates:
            break
        _, a, b, info = min(candidates, key=lambda c: c[0])
        info['joined'] = True
        groups[a] += groups.pop(b)
        say(f"split check: clusters {a} and {b} are one group on spectral features → joined")
    n = int(labels.max()) + 1
    root = np.arange(n)
    for a, members in groups.items():
        root[members] = a
    _, final_of = np.unique(root, return_inverse=True)
    return final_of.astype(np.int64), tests


def _relabel(final_of, labels, prob):
    """Labels and probability columns mapped through `final_of` (joined clusters' columns summed)."""
    out = np.zeros((len(prob), int(final_of.max()) + 1))
    np.add.at(out.T, final_of, prob.T)
    return final_of[labels], out


def _apply_splits(stack, state, labels, prob):
    """Replay the stored splits (`_split_mixed`) on new subtomograms: labels follow the splits in order
    (a member of the parent goes to the side its spectral features fall on); probabilities of the parent
    are shared between the two sides by the split's posterior."""
    n_nodes = len({key.split('.')[1] for key in state if key.startswith('split.')})
    if n_nodes == 0:
        return labels, prob
    features = spectral_features(stack)
    for i in range(n_nodes):
        prefix = f'split.{i}.'
        node = {key[len(prefix):]: v for key, v in state.items() if key.startswith(prefix)}
        parent, child = (int(v) for v in node['labels'])
        q = _split_side(features, node)
        labels = np.where((labels == parent) & (q[:, 1] > q[:, 0]), child, labels)
        prob = np.concatenate([prob, prob[:, parent:parent + 1] * q[:, 1:2]], axis=1)
        prob[:, parent] *= q[:, 0]
    if 'splitmap.final_of' in state:
        labels, prob = _relabel(state['splitmap.final_of'].numpy(), labels, prob)
    return labels, prob


# ------------------------------------------------------------------------------------ save / predict

def _merge_orientations(best, data, arch, opts, rng, device, say):
    """Merge the kept clusters that `orientation_groups` finds to be one molecule in different
    orientations; returns (updated best, details for the model's meta)."""
    net = yopo.build_features(arch)
    net.load_state_dict({key[4:]: v for key, v in best['state'].items() if key.startswith('net.')})
    net.to(device)
    with _DeterministicTorch(device):
        transfer, control = orientation_transfer(data, net, best['state'], best['labels'], opts['wedge_tilt'],
                                                 rng, device, max(opts['batch_size'], 64))
    groups = orientation_groups(transfer, control, opts.get('orientation_min_share', ORIENTATION_MIN_SHARE))
    info = {'tilt_range': float(opts['wedge_tilt']), 'transfer': np.round(transfer, 4).tolist(),
            'control': np.round(control, 4).tolist(), 'groups': groups, 'k_before': int(best['k'])}
    if len(groups) == best['k']:
        say("orientation check: no two clusters are one molecule in different orientations")
        return best, info
    new_of_old = np.empty(best['k'], dtype=np.int64)
    for j, g in enumerate(groups):
        new_of_old[g] = j
    state = dict(best['state'])
    label_of = state['gmm.label_of_component'].numpy()
    state['gmm.label_of_component'] = torch.from_numpy(
        np.where(label_of >= 0, new_of_old[np.maximum(label_of, 0)], -1).astype(np.int64))
    labels = new_of_old[best['labels']]
    say(f"orientation check: merged {[g for g in groups if len(g) > 1]} (one molecule in different "
        f"orientations) → K={len(groups)}")
    best = dict(best, labels=labels, k=len(groups), state=state, probabilities=_posterior(best['x'], state))
    return best, info


def save_disca_model(path, result, meta=None):
    """Write the kept network + PCA + mixture of a DiscaResult as a cryopick model file; return the path."""
    info = dict(result.meta)
    info['options'] = result.options
    info['history'] = [{k: v for k, v in h.items() if k != 'bic_by_k'} for h in result.history]
    info.update(meta or {})
    return save_model(path, METHOD, result.arch, result.model_state, info)


def disca_features(stack, model_path, device='auto', batch_size=64):
    """Network features of subtomograms under a saved DISCA model: (features (N, F), their PCA projection
    (N, d) — the space the mixture lives in, state dict of the model file)."""
    arch, state, meta = load_model(model_path, METHOD)
    stack = np.asarray(stack)
    box = meta.get('input_box')
    if stack.ndim == 4 and box is not None and stack.shape[-1] != int(box):
        raise InputError(model_path, f"model was trained on {box}³ subtomograms, got {stack.shape[-1]}³")
    device = resolve_device(device)
    data = yopo.prepare_stack(stack, arch)
    net = yopo.build_features(arch)
    net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith('net.')})
    net.to(device)
    with _DeterministicTorch(device):
        features = yopo.extract_features(net, data, device, batch_size)
    x = (features.astype(np.float64) - state['pca.mean'].numpy()) @ state['pca.components'].numpy().T
    return features, x, state


def disca_predict(stack, model_path, device='auto', batch_size=64):
    """Assign subtomograms to the clusters of a saved DISCA model.

    Labels follow the model's mixture and then, in order, the splits its split check stored (a member of
    a split cluster goes to the side its spectral features fall on); a split cluster's probability is
    shared between its two sides by the split's posterior.
    stack: (N, b, b, b) with the box size the model was trained on. Returns (labels (N,) 0-based,
    probabilities (N, K) posterior of each cluster).
    """
    _, x, state = disca_features(stack, model_path, device, batch_size)
    prob = _posterior(x, state)
    labels, prob = _apply_splits(np.asarray(stack), state, prob.argmax(axis=1).astype(int), prob)
    return labels, prob


# ------------------------------------------------------------------------------------------ baseline

def spectral_features(stack, n_shells=None):
    """Rotation-invariant features: radial power spectrum and radial density profile of each subtomogram."""
    data = yopo.normalise_stack(stack)
    b = data.shape[-1]
    n_shells = n_shells or b // 2
    grid = np.indices((b, b, b)) - (b - 1) / 2.0
    radius = np.sqrt((grid ** 2).sum(axis=0))
    r_bin = np.minimum((radius / (b / 2.0) * n_shells).astype(int), n_shells)
    freq = np.sqrt(sum(np.square(np.fft.fftfreq(b))[tuple(s)] for s in
                       ([slice(None), None, None], [None, slice(None), None], [None, None, slice(None)])))
    f_bin = np.minimum((freq / 0.5 * n_shells).astype(int), n_shells)
    out = []
    for v in data:
        power = np.abs(np.fft.fftn(v)) ** 2
        spec = np.bincount(f_bin.ravel(), power.ravel(), n_shells + 1) / np.bincount(f_bin.ravel(), None, n_shells + 1)
        prof = np.bincount(r_bin.ravel(), v.ravel(), n_shells + 1) / np.bincount(r_bin.ravel(), None, n_shells + 1)
        out.append(np.concatenate([np.log(spec[1:n_shells] + 1e-12), prof[:n_shells]]))
    return np.array(out)


def spectral_embedding(stack, dim, seed=0):
    """Standardised `spectral_features` reduced by PCA to `dim` dimensions."""
    x = spectral_features(stack)
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-8)
    return PCA(n_components=int(min(dim, x.shape[1], len(x) - 1)), random_state=seed).fit_transform(x)


def baseline_cluster(stack, k_range=(2, 20), seed=0, features='raw', pca_dim=16, min_per_cluster=10):
    """Non-deep reference: PCA + full-covariance Gaussian mixtures with BIC over K on `features`.

    features: 'raw' (voxels) or 'spectral' (`spectral_features`). Returns (labels 0-based, K).
    """
    if features == 'raw':
        x = yopo.normalise_stack(stack).reshape(len(stack), -1)
    elif features == 'spectral':
        x = spectral_features(stack)
    else:
        raise InputError('features', f"unknown baseline features {features!r}")
    ks = candidate_ks(len(x), k_range, min_per_cluster)
    pca_dim = int(max(2, min(pca_dim, x.shape[1], len(x) // ks[-1] - 1, len(x) - 1, bic_dim(len(x)))))
    x = PCA(n_components=pca_dim, random_state=seed).fit_transform(
        (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-8))  # same as spectral_embedding for 'spectral'
    opts = dict(TRAINING['paper'])
    labels, _, _, _ = fit_mixtures(x, ks, opts, seed)
    return labels, int(labels.max()) + 1
