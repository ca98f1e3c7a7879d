"""Gaussian mixtures for DISCA: fitting with BIC over K, label bookkeeping, cluster scores.

Used by the EM loop (`em.py`), the post-hoc checks (`checks.py`) and prediction (`model.py`). The mixture
that produced a clustering is stored as float64 tensors (`mixture_state`) so that `posterior` gives the
same labels again on the training data and assigns new subtomograms to the same clusters.
"""
import logging
import warnings

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import homogeneity_completeness_v_measure
from sklearn.mixture import GaussianMixture

from ..errors import InputError

logger = logging.getLogger(__name__)


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
    """Fit a Gaussian mixture for the candidate Ks, in increasing order, and keep the lowest BIC.

    Returns (labels compacted to 0..K-1, the chosen GaussianMixture, component number of each label,
    {k: BIC} of the Ks fitted). For `current_k` a mixture started from `current_labels` competes with the
    random one. With options['k_patience'] = p, the scan stops once p Ks in a row have not beaten the
    lowest BIC so far (and `current_k` has been fitted).
    """
    # Past the data's K the BIC rises by about ln(N) per extra parameter of each further component (153
    # in 16 dimensions) while the fitting cost grows with K: at K = 5 among 2..20, the Ks beyond 10 were
    # ~75 % of the mixtures' time of an iteration (bench/README.md §2, time per iteration).
    patience = options.get('k_patience')
    bics, fits = {}, {}
    since_best = 0
    for k in candidate_ks:
        if patience and since_best >= patience and (current_k is None or k > current_k):
            break
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
            improved = not bics or best[0] < min(bics.values())
            bics[int(k)], fits[int(k)] = best
            since_best = 0 if improved else since_best + 1
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



class JointProjection:
    """A linear projection of two views of the same subtomograms side by side: each view whitened in its
    own PCA (`view_dims` dimensions each; the second view standardised first), then the PCA of both to
    `n_components`.

    Whitening gives each view the same weight whatever its scale or width, and the last PCA then ranks the
    directions in which the two views vary together — a structure both see (two molecules) has up to twice
    the variance of one that only one view holds (the network's training noise, an orientation the
    rotation-invariant features do not see, or the reverse). Same attributes as sklearn's PCA
    (`mean_`, `components_`, `transform`), so `mixture_state` stores it and `project` applies it as one
    affine map of the concatenated features [first view, second view].
    """

    def __init__(self, n_components, split, view_dims=None, seed=0):
        self.n_components, self.split = int(n_components), int(split)
        self.view_dims = int(view_dims or n_components)
        self.seed = seed

    def fit(self, features):
        from scipy.linalg import block_diag
        from sklearn.decomposition import PCA
        features = np.asarray(features, dtype=np.float64)
        first, second = features[:, :self.split], features[:, self.split:]
        maps = []
        for view, standardise in ((first, False), (second, True)):
            scale = view.std(axis=0) + 1e-8 if standardise else np.ones(view.shape[1])
            dims = int(min(self.view_dims, view.shape[1], len(view) - 1))
            pca = PCA(n_components=dims, random_state=self.seed).fit(view / scale)
            maps.append(pca.components_ / scale[None, :] / np.sqrt(pca.explained_variance_ + 1e-12)[:, None])
        whiten = block_diag(*maps)
        self.mean_ = features.mean(axis=0)
        white = (features - self.mean_) @ whiten.T
        last = PCA(n_components=int(min(self.n_components, white.shape[1])), random_state=self.seed).fit(white)
        # `white` has zero mean, so the last PCA's own mean (rounding only) is dropped from the affine map.
        self.components_ = last.components_ @ whiten
        return self

    def transform(self, features):
        return (np.asarray(features, dtype=np.float64) - self.mean_) @ self.components_.T


def project(state, features):
    """Features (N, F) in the stored PCA's space: the space the mixture of `state` lives in."""
    return (np.asarray(features, dtype=np.float64) - state['pca.mean'].numpy()) @ state['pca.components'].numpy().T


def mixture_state(pca, gmm, components):
    """PCA and Gaussian-mixture parameters as float64 tensors (for the model file)."""
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))
    return {'pca.mean': t(pca.mean_), 'pca.components': t(pca.components_),
            'gmm.weights': t(gmm.weights_), 'gmm.means': t(gmm.means_),
            'gmm.precisions_cholesky': t(gmm.precisions_cholesky_),
            'gmm.covariances': t(gmm.covariances_),
            'gmm.label_of_component': torch.from_numpy(components.astype(np.int64))}


def posterior(x_pca, state):
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
