"""A non-deep reference for DISCA: PCA + Gaussian mixtures with BIC on voxels or rotation-invariant features."""
from . import yopo
from ..errors import InputError
from .em import TRAINING
from .features import INVARIANT_DIM, invariant_features, spectral_features, standardised_pca
from .mixtures import bic_dim, candidate_ks, fit_mixtures


def baseline_cluster(stack, k_range=(2, 20), seed=0, features='raw', pca_dim=None, min_per_cluster=10):
    """Non-deep reference: PCA + full-covariance Gaussian mixtures with BIC over K on `features`.

    features: 'raw' (voxels), 'spectral' (`spectral_features`) or 'invariants' (`invariant_features`, as
    DISCA's `init` 'invariants'); pca_dim: 16 by default, `INVARIANT_DIM` for 'invariants'. Returns
    (labels 0-based, K).
    """
    pca_dim = pca_dim or (INVARIANT_DIM if features == 'invariants' else 16)
    if features == 'raw':
        x = yopo.normalise_stack(stack).reshape(len(stack), -1)
    elif features == 'spectral':
        x = spectral_features(stack)
    elif features == 'invariants':
        x = invariant_features(stack)
    else:
        raise InputError('features', f"unknown baseline features {features!r}")
    ks = candidate_ks(len(x), k_range, min_per_cluster)
    pca_dim = int(max(2, min(pca_dim, x.shape[1], len(x) // ks[-1] - 1, len(x) - 1, bic_dim(len(x)))))
    x = standardised_pca(x, pca_dim, seed)  # as spectral_embedding for 'spectral'
    opts = dict(TRAINING['paper'])
    labels, _, _, _ = fit_mixtures(x, ks, opts, seed)
    return labels, int(labels.max()) + 1
