"""Views of subtomograms that DISCA uses beside the network's features.

`random_rotations`: each subtomogram turned by a uniformly random rotation (optionally with the
acquisition's missing wedge put back), the training augmentation and the probe of the orientation checks.
`spectral_features`: rotation-invariant radial power spectrum and radial profile, the start of the 'cpu'
preset and the view the split check tests clusters on. `harmonic_features`: rotation-invariant
spherical-harmonic energies on concentric shells; with the spectral ones (`invariant_features`) the opt-in
start `init` 'invariants' (`invariant_embedding`).
`known_tilt_range`: the missing wedge a run works with — given, from a STAR file's tilt-angle columns
(`tilt_range_from_star`) or read from the subtomograms' mean power spectrum (`estimate_tilt_range`).
"""
import numpy as np
from scipy import ndimage, special
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



# ------------------------------------------------------------------------------------ missing wedge

# A wedge is reported only when the power the data lack there is at least this factor below the power
# they hold at the same frequencies elsewhere (log scale): a reconstructed tomogram's wedge is a few
# times to orders of magnitude darker, a set without one (or wedge-compensated) differs by noise only.
WEDGE_MIN_CONTRAST = np.log(2.0)


def estimate_tilt_range(stack, band=(0.08, 0.42), max_count=2000):
    """The missing wedge the subtomograms carry, read from their mean power spectrum (tilt axis Y).

    Every subtomogram cut from a tomogram of a ±θ tilt series lacks the Fourier components with
    |kz| > |kx|·tan θ (`geometry.wedge_mask`), in the same place for all of them. The log power, relative
    to its mean over each frequency shell (so that CTF and molecule spectra cancel), is averaged in 1°
    bins of the angle atan(|kz| / |kx|) over a band of mid frequencies; a step from "sampled" to
    "missing" is fitted, and its position is θ. Returns (θ in degrees or None, info dict): None when the
    step is weaker than `WEDGE_MIN_CONTRAST` (no wedge, a wedge-compensated set, or subtomograms that were
    rotated after extraction, whose wedges no longer coincide) or sits at the ends of the range.
    """
    data = np.asarray(stack)
    if data.ndim != 4 or len(set(data.shape[1:])) != 1:
        raise InputError('subtomograms', f"expected a stack of cubes (N, b, b, b), got shape {data.shape}")
    if len(data) > max_count:
        data = data[np.linspace(0, len(data) - 1, max_count).astype(int)]
    b = data.shape[-1]
    power = np.zeros((b, b, b // 2 + 1))
    for v in data:
        v = v.astype(np.float64)
        v = (v - v.mean()) / (v.std() + 1e-12)
        power += np.abs(np.fft.rfftn(v)) ** 2
    log_power = np.log(power / len(data) + 1e-12 * power.max() + 1e-30)
    kz = np.fft.fftfreq(b).reshape(-1, 1, 1)
    ky = np.fft.fftfreq(b).reshape(1, -1, 1)
    kx = np.fft.rfftfreq(b).reshape(1, 1, -1)
    radius = np.sqrt(kz ** 2 + ky ** 2 + kx ** 2)
    shell = np.minimum((radius * b).round().astype(int), b)
    in_band = (radius >= band[0]) & (radius <= band[1]) & (np.hypot(kz, kx) > 0.5 / b)
    shell_mean = np.bincount(shell[in_band], log_power[in_band], b + 1) / \
        np.maximum(np.bincount(shell[in_band], None, b + 1), 1)
    relative = (log_power - shell_mean[shell])[in_band]
    angle = np.degrees(np.arctan2(np.abs(np.broadcast_to(kz, in_band.shape)[in_band]),
                                  np.broadcast_to(kx, in_band.shape)[in_band]))
    bins = np.minimum(angle.astype(int), 89)
    count = np.bincount(bins, None, 90)
    total = np.bincount(bins, relative, 90)
    best = None
    # Step fit: θ splits the angles into sampled (below) and missing (above); least squares over voxels.
    for theta in range(10, 89):
        lo_n, hi_n = count[:theta].sum(), count[theta:].sum()
        if lo_n == 0 or hi_n == 0:
            continue
        lo, hi = total[:theta].sum() / lo_n, total[theta:].sum() / hi_n
        gain = lo_n * hi_n / (lo_n + hi_n) * (lo - hi) ** 2   # between-group sum of squares
        if best is None or gain > best[0]:
            best = (gain, theta, lo - hi)
    info = {'method': 'step in the mean log power spectrum against atan(|kz|/|kx|), tilt axis Y',
            'subtomograms_used': int(len(data))}
    if best is None:
        info['reason'] = 'box too small to measure'
        return None, info
    _, theta, contrast = best
    info.update({'step_deg': int(theta), 'contrast': round(float(contrast), 3)})
    if contrast < WEDGE_MIN_CONTRAST:
        info['reason'] = (f'no missing wedge: the power beyond {theta}° is only {np.exp(contrast):.2f}× lower '
                          f'(at least {np.exp(WEDGE_MIN_CONTRAST):.1f}× expected)')
        return None, info
    if theta >= 85:
        info['reason'] = f'the step sits at {theta}°: no wedge worth handling'
        return None, info
    return float(theta), info


# The acquisition's tilt angles in a subtomogram STAR file (degrees), in the particle table or in any other
# table of the file (an optics-like block): what the protocol writes from Scipion's TomoAcquisition.
TILT_MIN_COLUMN, TILT_MAX_COLUMN = 'cpTiltAngleMin', 'cpTiltAngleMax'


def tilt_range_from_star(star_path):
    """(θ in degrees or None, note) from the tilt-angle columns of a STAR file.

    θ is half the width of the tilt range, (max − min) / 2: the engine's wedge is symmetric about the
    beam, so an asymmetric range (−54…+62) is taken as one of the same width (±58), and the note says so.
    Rows with different ranges (tomograms acquired differently) use the range most rows have. Raises
    InputError naming the file for values that are not numbers, or a range that is not min < max within
    ±90°."""
    import pandas as pd
    from ..io import star
    blocks = star.read_star_blocks(star_path)
    for block in blocks.values():
        if isinstance(block, dict):      # a one-row table written as key-value pairs
            block = pd.DataFrame([block])
        if not isinstance(block, pd.DataFrame) or not {TILT_MIN_COLUMN, TILT_MAX_COLUMN} <= set(block.columns):
            continue
        lo = pd.to_numeric(block[TILT_MIN_COLUMN], errors='coerce').to_numpy(dtype=float)
        hi = pd.to_numeric(block[TILT_MAX_COLUMN], errors='coerce').to_numpy(dtype=float)
        if len(lo) == 0:
            continue
        if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
            raise InputError(star_path, f"{TILT_MIN_COLUMN}/{TILT_MAX_COLUMN} hold values that are not numbers")
        pairs, counts = np.unique(np.stack([lo, hi], axis=1), axis=0, return_counts=True)
        a, b = pairs[int(np.argmax(counts))]
        if not -90 <= a < b <= 90:
            raise InputError(star_path, f"tilt range {a:g}…{b:g}° is not min < max within ±90°")
        theta = (b - a) / 2.0
        notes = [f"tilt range {a:g}…{b:g}° from {star_path}"]
        if abs(a + b) > 1.0:
            notes.append(f"not symmetric: taken as ±{theta:g}° (same width)")
        if len(pairs) > 1:
            notes.append(f"{len(pairs)} different ranges in the file; the one of {int(counts.max())} of "
                         f"{len(lo)} rows used for all")
        return (theta if theta < 90 else 0.0), '; '.join(notes)
    return None, f"no {TILT_MIN_COLUMN}/{TILT_MAX_COLUMN} in {star_path}"


def known_tilt_range(stack, tilt_range=None, say=None, estimate=True):
    """The tilt range DISCA works with, and where it came from: (θ in degrees or None, info dict).

    tilt_range: the acquisition's largest tilt when known (the CLI's --wedge-tilt or the STAR file, the
    protocol's acquisition); 0 turns the wedge handling off. None: read from the data
    (`estimate_tilt_range`) unless `estimate` is False. One line goes to `say` either way, so a log always
    tells which wedge the checks used, or that none was known.
    """
    say = say or (lambda line: None)
    if tilt_range is not None:
        theta = float(tilt_range)
        if theta == 0:
            say('missing wedge: off (tilt range 0): no orientation checks')
            return None, {'source': 'off', 'tilt_range': None}
        if not 0 < theta < 90:
            raise InputError('wedge tilt range', f"must be between 0 and 90 degrees, got {theta:g}")
        say(f'missing wedge: ±{theta:g}° about Y (given)')
        return theta, {'source': 'given', 'tilt_range': theta}
    if not estimate:
        say('missing wedge: none given: no orientation checks')
        return None, {'source': 'none', 'tilt_range': None}
    theta, info = estimate_tilt_range(stack)
    info.update({'source': 'estimated', 'tilt_range': theta})
    if theta is None:
        say(f"missing wedge: none given, none found in the subtomograms ({info['reason']}): no orientation "
            f"checks")
    else:
        say(f"missing wedge: none given; the subtomograms' mean power spectrum shows ±{theta:g}° about Y "
            f"(power {np.exp(info['contrast']):.3g}× lower beyond it), used by the orientation checks")
    return theta, info


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
    return standardised_pca(spectral_features(stack), dim, seed)


def standardised_pca(x, dim, seed=0):
    """Features standardised over the rows and reduced by PCA to `dim` dimensions (fewer when the data
    cannot hold that many)."""
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-8)
    return PCA(n_components=int(min(dim, x.shape[1], len(x) - 1)), random_state=seed).fit_transform(x)


# Spherical-harmonic degrees of `harmonic_features`: up to 8 resolves features about a tenth of a shell's
# circumference apart, the scale of a subunit on the molecule's outer shells in a box that holds it.
HARMONIC_DEGREE = 8
# PCA dimensions of the start on these features (`init_dim`): chosen on simulated sets (bench/README.md §2).
INVARIANT_DIM = 6


def _sphere_quadrature(degree):
    """Directions and weights on the unit sphere that integrate spherical harmonics up to twice `degree`
    exactly (Gauss-Legendre in cos θ, uniform in φ), and the conjugate harmonics times the weights:
    (directions (3, M) as (z, y, x), basis (n_lm, M), degree of each basis row (n_lm,))."""
    n_theta, n_phi = degree + 2, 2 * degree + 4
    cos_theta, w = np.polynomial.legendre.leggauss(n_theta)
    theta, phi = np.meshgrid(np.arccos(cos_theta), np.arange(n_phi) * 2 * np.pi / n_phi, indexing='ij')
    weights = (w[:, None] * np.full(n_phi, 2 * np.pi / n_phi)).ravel()
    rows, degrees = [], []
    for l in range(degree + 1):
        for m in range(-l, l + 1):
            # scipy's argument order: order m, degree l, azimuth, polar angle
            rows.append(np.conj(special.sph_harm(m, l, phi, theta)).ravel() * weights)
            degrees.append(l)
    directions = np.stack([np.cos(theta), np.sin(theta) * np.sin(phi), np.sin(theta) * np.cos(phi)]).reshape(3, -1)
    return directions, np.array(rows), np.array(degrees)


def harmonic_features(stack, degree=HARMONIC_DEGREE, sigma=None):
    """Rotation-invariant shape features: spherical-harmonic energies of each subtomogram on concentric shells.

    The density, smoothed (Gaussian, `sigma` voxels; default box / 32, at least 1) so that each shell
    sample averages noise over a few voxels, is sampled on shells of radius 1 .. box/2 − 2 voxels about the
    box centre and expanded in spherical harmonics up to `degree`. Per shell and degree l the energy
    Σ_m |c_lm|² does not change when the molecule turns, nor does the correlation Σ_m c_lm(r) c_lm(r+1)*
    of neighbouring shells. The radial profile and power spectrum (`spectral_features`) hold only the
    l = 0 part of this (how much density lies at each radius), so molecules of similar size and mass
    — the ribosome and the 26S proteasome, TRiC and the 20S — look alike there; the higher degrees see how
    the density is arranged on each shell. Measured at SNR 0.01 ±40° (bench/README.md §2), a logistic
    regression on these features with the spectral ones separates five molecules nearly as well as the
    network trained on the truth (V-measure 0.78–0.85 against 0.85–0.86; spectral features alone 0.65).

    Returns (N, F) float64: log energies of degrees 1..`degree` per shell, the square root of the degree-0
    energy per shell, and the normalised neighbouring-shell correlations per degree.
    """
    data = yopo.normalise_stack(stack)
    b = data.shape[-1]
    sigma = max(1.0, b / 32.0) if sigma is None else float(sigma)
    radii = np.arange(1.0, b // 2 - 1)
    directions, basis, degrees = _sphere_quadrature(int(degree))
    centre = (b - 1) / 2.0
    coords = (centre + radii[:, None, None] * directions[None]).transpose(1, 0, 2).reshape(3, -1)
    # sums over m of each degree, as one matrix product
    by_degree = (degrees[None, :] == np.arange(int(degree) + 1)[:, None]).astype(np.float64)
    out = np.empty((len(data), len(radii) * int(degree) + len(radii) + (len(radii) - 1) * (int(degree) + 1)))
    for i, v in enumerate(data):
        smooth = ndimage.gaussian_filter(v.astype(np.float64), sigma) if sigma > 0 else v.astype(np.float64)
        samples = ndimage.map_coordinates(smooth, coords, order=1).reshape(len(radii), -1)
        coef = samples @ basis.T                                     # (shells, n_lm)
        energy = (np.abs(coef) ** 2) @ by_degree.T                   # (shells, degree + 1)
        cross = np.real(coef[:-1] * np.conj(coef[1:])) @ by_degree.T  # (shells − 1, degree + 1)
        # The floor keeps shells where the density is nearly constant (a degree's energy only interpolation
        # error) from dominating through the logarithm and the correlations' normalisation.
        floor = 1e-3 * energy.sum(axis=1, keepdims=True) + 1e-12
        cross /= np.sqrt((energy[:-1] + floor[:-1]) * (energy[1:] + floor[1:]))
        out[i] = np.concatenate([np.log(energy[:, 1:] + floor).ravel(), np.sqrt(energy[:, 0]), cross.ravel()])
    return out


def invariant_features(stack):
    """`harmonic_features` and `spectral_features` side by side, (N, F)."""
    return np.concatenate([harmonic_features(stack), spectral_features(stack)], axis=1)


# Marks a mixture state (`mixtures.mixture_state`) whose PCA projects the network's features and the raw
# subtomograms' `invariant_features` side by side (option `mixture_view` 'joint').
JOINT_VIEW_KEY = 'pca.joint_invariants'


def mixture_inputs(state, network_features, stack):
    """What the PCA of a mixture state projects for these subtomograms: the network's features, with the
    `invariant_features` of the raw subtomograms `stack` beside them when the state is a joint view."""
    if JOINT_VIEW_KEY not in state:
        return network_features
    return np.concatenate([np.asarray(network_features, dtype=np.float64), invariant_features(stack)], axis=1)


def invariant_embedding(stack, dim, seed=0):
    """`invariant_features` standardised and reduced by PCA to `dim` dimensions: the opt-in start
    (option `init` 'invariants')."""
    return standardised_pca(invariant_features(stack), dim, seed)
