"""Views of subtomograms that DISCA uses beside the network's features.

`random_rotations`: each subtomogram turned by a uniformly random rotation (optionally with the
acquisition's missing wedge put back), the training augmentation and the probe of the orientation checks.
`spectral_features`: rotation-invariant radial power spectrum and radial profile, the start of the 'cpu'
preset and the view the split check tests clusters on.
"""
import numpy as np
from scipy.spatial.transform import Rotation
from sklearn.decomposition import PCA

from .. import geometry
from ..errors import InputError
from ..geometry import rotate_volume
from . import yopo


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
