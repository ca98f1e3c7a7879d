"""Simulated cryo-electron tomograms with ground truth, made the way real ones are.

1. Phantom: copies of template densities (`templates.load_templates`) in random orientations, placed
   without overlap (bounding spheres, each kept fully inside the volume), plus optional distractors (other
   molecules, NOT in the truth), gold beads (small, very dense balls) and vesicles (spherical lipid
   bilayers: two dense head-group shells around a slightly less dense tail layer). Placement order:
   vesicles, then the classes in turn, then distractors, then beads; what does not fit is left out and
   the shortfall recorded in ``meta['placed']`` / ``meta['requested']``.
   A particle at RELION angles (rot, tilt, psi) is ``geometry.particle_from_reference(template, rot,
   tilt, psi)`` (RELION's convention, checked against relion_reconstruct) centred on its integer truth
   coordinate (x, y, z) = voxel index (column, row, section).
2. Tilt series: parallel projections along Z at tilts −tilt_range..+tilt_range in tilt_step steps, tilt
   axis Y. Every y-slice is an independent (z, x) problem, so projection and back-projection are a
   single sparse matrix (linear-interpolation splatting, every tilt stacked) applied to all y-slices at
   once.
3. Each projection gets a CTF (300 kV, Cs 2.7 mm, 7 % amplitude contrast). The tilt series' defocus is
   drawn uniformly in ``defocus_um`` and each tilt varies around it by N(0, 0.1 µm), clipped to the range
   (meta 'defocus_um' lists the value per tilt). Images have the contrast of real data: particles DARK
   (the CTF-filtered projection is negated), meta 'contrast' = 'dark'.
4. Gaussian noise per projection with σ² = var(noise-free CTF-filtered projection) / snr, the variance
   taken over the whole projection image of that tilt.
5. CTF correction by phase flipping (as IMOD ctfphaseflip; without it a WBP of CTF-modulated data mixes
   contrast signs), then weighted back-projection: ramp filter with an IMOD-like Gaussian roll-off
   (cutoff 0.35, fall-off 0.035 cycles/pixel) and back-projection to the full `shape`. The result is
   normalised to mean 0, standard deviation 1.

The phantom (``.phantom``) stays positive density (particles bright); the tomogram (``.volume``) has dark
particles. Random streams for placement, orientations and noise are separate children of `seed`, so
changing the SNR of a run changes only its noise.
"""
import dataclasses
import json
import logging
import os

import numpy as np
import pandas as pd
from scipy import fft, sparse

from .. import geometry
from ..io import star
from .ctf import ctf_2d
from ..errors import InputError
from ..io.mrc import atomic_path, write_mrc
from .templates import load_templates

log = logging.getLogger(__name__)

VOLTAGE_KV = 300.0
CS_MM = 2.7
AMPLITUDE_CONTRAST = 0.07
DEFOCUS_JITTER_UM = 0.1
# Fraction of the volume the truth particles' bounding spheres fill when no count is given.
DEFAULT_OCCUPANCY = 0.25
BEAD_RADIUS_A = 50.0          # 10 nm gold
BEAD_DENSITY = 8.0            # × protein interior density: gold scatters far more strongly
VESICLE_RADIUS_A = (120.0, 450.0)
PLACEMENT_TRIES = 3000


@dataclasses.dataclass
class SimulatedTomogram:
    name: str
    volume: np.ndarray           # float32 (z, y, x) reconstruction, particles dark, mean 0 / std 1
    truth: pd.DataFrame          # rlnTomoName, rlnCoordinateX/Y/Z, rlnClassNumber, rlnAngleRot/Tilt/Psi
    class_names: list            # index i -> class i + 1
    phantom: np.ndarray          # float32 (z, y, x) noise-free density before projection (positive)
    meta: dict
    voxel_size: float = 10.0
    projections: np.ndarray = None        # (tilts, y, detector) noisy CTF-modulated tilt series (kept on request)
    projections_clean: np.ndarray = None  # the same without noise (kept on request)


# ---------------------------------------------------------------------------------------------------
# Tilt geometry


def tilt_angles(tilt_range=60.0, tilt_step=3.0):
    """Tilt angles in degrees from −tilt_range to +tilt_range (inclusive where the step lands on it)."""
    n = int(np.floor(2 * tilt_range / tilt_step + 1e-6))
    return -tilt_range + tilt_step * np.arange(n + 1)


def detector_width(nz, nx):
    """Detector pixels wide enough to catch the whole (z, x) box at any tilt, same parity as nx."""
    nu = int(np.ceil(np.hypot(nz, nx))) + 2
    return nu + ((nu - nx) % 2)


def projection_matrix(nz, nx, angles_deg, nu=None):
    """Sparse (tilts·nu, nz·nx) matrix projecting a (z, x) slice along the tilted beam.

    Each voxel's value is split by linear interpolation between the two detector pixels nearest to where
    its centre projects, u = x·cosθ + z·sinθ about the box and detector centres. The transpose is the
    matching (linear-interpolation) back-projector.
    """
    nu = nu or detector_width(nz, nx)
    zc = np.arange(nz) - (nz - 1) / 2.0
    xc = np.arange(nx) - (nx - 1) / 2.0
    zz, xx = np.meshgrid(zc, xc, indexing='ij')
    zz, xx = zz.ravel(), xx.ravel()
    cols = np.arange(nz * nx)
    rows, cs, vals = [], [], []
    for t, theta in enumerate(np.deg2rad(np.asarray(angles_deg, dtype=float))):
        u = xx * np.cos(theta) + zz * np.sin(theta) + (nu - 1) / 2.0
        b0 = np.floor(u).astype(np.int64)
        w1 = u - b0
        for b, w in ((b0, 1.0 - w1), (b0 + 1, w1)):
            ok = (b >= 0) & (b < nu) & (w > 1e-9)
            rows.append(t * nu + b[ok])
            cs.append(cols[ok])
            vals.append(w[ok])
    mat = sparse.csr_matrix((np.concatenate(vals).astype(np.float32),
                             (np.concatenate(rows), np.concatenate(cs))),
                            shape=(len(angles_deg) * nu, nz * nx))
    return mat, nu


def project(volume, angles_deg, matrix=None):
    """Tilt series (tilts, y, nu) of a (z, y, x) volume; tilt axis Y."""
    nz, ny, nx = volume.shape
    if matrix is None:
        matrix, nu = projection_matrix(nz, nx, angles_deg)
    nu = matrix.shape[0] // len(angles_deg)
    cols = np.ascontiguousarray(np.transpose(volume, (0, 2, 1)).reshape(nz * nx, ny), dtype=np.float32)
    proj = matrix @ cols  # (tilts·nu, ny)
    return np.ascontiguousarray(proj.reshape(len(angles_deg), nu, ny).transpose(0, 2, 1))


def back_project(projections, shape, angles_deg, matrix=None):
    """(z, y, x) volume of `shape` from (tilts, y, nu) (already filtered) projections."""
    nz, ny, nx = shape
    if matrix is None:
        matrix, _ = projection_matrix(nz, nx, angles_deg, nu=projections.shape[2])
    rows = np.ascontiguousarray(projections.transpose(0, 2, 1).reshape(-1, ny), dtype=np.float32)
    vol = matrix.T @ rows  # (nz·nx, ny)
    return np.ascontiguousarray(vol.reshape(nz, nx, ny).transpose(0, 2, 1))


def radial_weight(n, cutoff=0.35, falloff=0.035):
    """Ramp |k| (cycles/pixel) with a Gaussian roll-off beyond `cutoff`, on an n-point FFT grid."""
    k = np.abs(np.fft.fftfreq(n))
    w = k.copy()
    w[0] = 0.25 / n  # a little DC so the mean of the reconstruction is not lost entirely
    beyond = k > cutoff
    w[beyond] *= np.exp(-np.square(k[beyond] - cutoff) / (2 * falloff ** 2))
    return w


# ---------------------------------------------------------------------------------------------------
# Phantom


def _paste(volume, piece, centre_zyx):
    """Add `piece` (odd-sized box) into `volume` centred on the integer voxel `centre_zyx`, clipped."""
    dst, src = [], []
    for c, n, N in zip(centre_zyx, piece.shape, volume.shape):
        lo = int(c) - (n - 1) // 2
        a, b = max(lo, 0), min(lo + n, N)
        dst.append(slice(a, b))
        src.append(slice(a - lo, b - lo))
    volume[tuple(dst)] += piece[tuple(src)]


def bead_density(radius_vox):
    half = int(np.ceil(radius_vox)) + 2
    ax = np.arange(-half, half + 1)
    z, y, x = np.meshgrid(ax, ax, ax, indexing='ij')
    d = np.sqrt(x * x + y * y + z * z)
    # Smooth-edged solid ball (logistic edge half a voxel wide).
    return (BEAD_DENSITY / (1.0 + np.exp((d - radius_vox) / 0.35))).astype(np.float32)


def vesicle_density(radius_vox, voxel_size):
    """Spherical bilayer: head-group shells ~38 Å apart (outer one at `radius_vox`), lower-density tails."""
    sep = 38.0 / voxel_size
    sigma = _leaflet_sigma(voxel_size)
    half = int(np.ceil(radius_vox + 3 * sigma)) + 1
    ax = np.arange(-half, half + 1)
    z, y, x = np.meshgrid(ax, ax, ax, indexing='ij')
    d = np.sqrt(x * x + y * y + z * z)
    outer, inner = radius_vox, radius_vox - sep
    g = lambda c, s: np.exp(-np.square(d - c) / (2 * s * s))
    dens = 1.1 * g(outer, sigma) + 1.1 * g(inner, sigma) - 0.35 * g(0.5 * (outer + inner), sep / 3.0)
    return dens.astype(np.float32), radius_vox + 3 * sigma


def _leaflet_sigma(voxel_size):
    return max(0.6, 7.0 / voxel_size)


class SphereSet:
    """Placed spheres with a fast "is this spot free?" test for batches of candidate centres.

    Older spheres sit in a k-d tree (rebuilt every `rebuild` insertions); the few added since are
    checked directly. Keeps placement near-linear for thousands of particles.
    """

    def __init__(self, centres=(), radii=(), rebuild=128, k=32):
        self.centres = [np.asarray(c, float) for c in centres]
        self.radii = [float(r) for r in radii]
        self.rebuild, self.k = rebuild, k
        self._tree, self._n_tree, self._r_tree = None, 0, None
        self._build()

    def _build(self):
        from scipy.spatial import cKDTree
        self._n_tree = len(self.centres)
        if self._n_tree:
            self._tree = cKDTree(np.asarray(self.centres))
            self._r_tree = np.asarray(self.radii[:self._n_tree])

    def free(self, cand, r):
        """Boolean per candidate centre (rows of `cand`): a sphere of radius r there overlaps nothing."""
        cand = np.asarray(cand, float)
        ok = np.ones(len(cand), bool)
        n = self._n_tree
        if n:
            reach = r + float(self._r_tree.max())
            k = min(self.k, n)
            d, idx = self._tree.query(cand, k=k, distance_upper_bound=reach)
            d, idx = d.reshape(len(cand), k), idx.reshape(len(cand), k)
            valid = idx < n
            need = r + self._r_tree[np.minimum(idx, n - 1)]
            ok &= np.all(~valid | (d >= need), axis=1)
            # All k neighbours within reach: a farther one could still overlap, check exactly.
            for i in np.flatnonzero(ok & valid[:, -1]):
                near = np.asarray(self._tree.query_ball_point(cand[i], reach), int)
                dist = np.sqrt(((np.asarray(self.centres)[near] - cand[i]) ** 2).sum(-1))
                ok[i] = np.all(dist >= r + self._r_tree[near])
        if len(self.centres) > n:
            c = np.asarray(self.centres[n:])
            dist = np.sqrt(((cand[:, None, :] - c[None, :, :]) ** 2).sum(-1))
            ok &= np.all(dist >= np.asarray(self.radii[n:])[None, :] + r, axis=1)
        return ok

    def add(self, centre, r):
        self.centres.append(np.asarray(centre, float))
        self.radii.append(float(r))
        if len(self.centres) - self._n_tree >= self.rebuild:
            self._build()


def place_spheres(shape, radii, rng, placed_centres=(), placed_radii=(), tries=PLACEMENT_TRIES):
    """Random non-overlapping integer centres, one per radius, each sphere fully inside `shape`.

    Already-placed spheres are respected. Returns a list of (z, y, x) centres, None where no free spot was
    found within `tries` random candidates. Free space only shrinks, so once a radius has failed, larger
    ones are not tried again.
    """
    spheres = SphereSet(placed_centres, placed_radii)
    out = []
    shape = np.asarray(shape)
    failed = np.inf
    for r in radii:
        lo = np.ceil(r - 1e-9).astype(int) * np.ones(3, int)
        hi = shape - 1 - lo
        if np.any(hi < lo) or r >= failed:
            out.append(None)
            continue
        found = None
        for start in range(0, tries, 256):
            cand = rng.integers(lo, hi + 1, size=(min(256, tries - start), 3))
            ok = spheres.free(cand, r)
            if ok.any():
                found = cand[int(np.argmax(ok))]
                break
        out.append(None if found is None else tuple(int(v) for v in found))
        if found is not None:
            spheres.add(found, r)
        else:
            failed = min(failed, r)
    return out


def _counts(spec, names, default, what):
    if spec is None:
        return {n: default for n in names}
    if isinstance(spec, dict):
        unknown = set(spec) - set(names)
        if unknown:
            raise InputError(what, f"counts given for names not in the list: {sorted(unknown)}")
        counts = {n: spec.get(n, 0) for n in names}
    else:
        counts = {n: spec for n in names}
    for n, c in counts.items():
        if int(c) != c or c < 0:
            raise InputError(what, f"count for '{n}' must be a non-negative integer, got {c}")
    return {n: int(c) for n, c in counts.items()}


def _check_options(shape, snr, tilt_range, tilt_step, defocus_um, voxel_size, n_beads, n_vesicles):
    if len(shape) != 3 or any(int(s) != s or s < 8 for s in shape):
        raise InputError('shape', f"expected three sizes Z Y X of at least 8 voxels, got {tuple(shape)}")
    if not snr > 0:
        raise InputError('snr', f"must be positive, got {snr}")
    if not 0 < tilt_range < 90:
        raise InputError('tilt range', f"must be in (0, 90) degrees, got {tilt_range}")
    if not 0 < tilt_step <= tilt_range:
        raise InputError('tilt step', f"must be in (0, tilt range], got {tilt_step}")
    if not voxel_size > 0:
        raise InputError('voxel size', f"must be positive, got {voxel_size}")
    lo, hi = _defocus_range(defocus_um)
    if not 0 < lo <= hi:
        raise InputError('defocus', f"expected underfocus values > 0 µm, got {defocus_um}")
    for what, n in (('beads', n_beads), ('vesicles', n_vesicles)):
        if int(n) != n or n < 0:
            raise InputError(what, f"count must be a non-negative integer, got {n}")


def _defocus_range(defocus_um):
    d = np.atleast_1d(np.asarray(defocus_um, dtype=float))
    return float(d.min()), float(d.max())


def simulate_tomogram(shape=(64, 128, 128), classes=('4v4r', '3j9i', '4v94', '1bxn'), n_per_class=None,
                      distractors=(), n_beads=0, n_vesicles=0, snr=0.05, tilt_range=60.0, tilt_step=3.0,
                      defocus_um=(3.0, 5.0), voxel_size=10.0, seed=0, templates_dir=None, name='tomo_000',
                      n_per_distractor=None, keep_projections=False, synthetic=False,
                      radial_cutoff=0.35, radial_falloff=0.035):
    """Simulate one tomogram; see the module docstring for the model.

    shape: (z, y, x) voxels. classes: template names, class i + 1 = classes[i]. n_per_class: None (bounding spheres
    fill about 25 % of the volume, an equal share per class), an int, or a dict name -> count.
    distractors: template names placed like particles but left out of the truth (n_per_distractor
    copies each, default as n_per_class). snr: projection SNR (see module docstring). defocus_um: (lo,
    hi) or one value, underfocus in µm. templates_dir: map folder (None: default; False or
    ``synthetic=True``: synthetic shapes). keep_projections: also keep the tilt series. Raises
    InputError for bad options, unknown template names or a shape that cannot hold one particle of a
    class.
    """
    shape = tuple(shape)
    _check_options(shape, snr, tilt_range, tilt_step, defocus_um, voxel_size, n_beads, n_vesicles)
    shape = tuple(int(s) for s in shape)
    classes = [classes] if isinstance(classes, str) else list(classes)
    distractors = [distractors] if isinstance(distractors, str) else list(distractors)
    if not classes:
        raise InputError('classes', "at least one class is needed")
    if set(classes) & set(distractors):
        raise InputError('distractors', f"{sorted(set(classes) & set(distractors))} are also classes")
    temps = load_templates(classes + distractors, folder=templates_dir, voxel_size=voxel_size,
                           synthetic=synthetic)
    class_names = [temps.substitutes.get(c, c) for c in classes]
    distractor_names = [temps.substitutes.get(d, d) for d in distractors]
    for n in class_names + distractor_names:
        if 2 * temps.radius[n] > min(shape) - 1:
            raise InputError('shape', f"Z Y X = {' '.join(map(str, shape))} is too small to hold one "
                                      f"'{n}' particle (diameter {2 * temps.radius[n]:.0f} voxels at "
                                      f"{voxel_size:g} Å/voxel)")

    # Default counts: every class (and distractor) gets an equal share of the occupied volume, so small
    # molecules are more numerous than large ones, as in a cell.
    share = DEFAULT_OCCUPANCY * float(np.prod(shape)) / len(class_names)
    defaults = {n: max(1, int(share / (4 / 3 * np.pi * temps.radius[n] ** 3) + 0.5))
                for n in class_names + distractor_names}
    counts = _counts(n_per_class, classes, None, 'per-class count')
    counts = {temps.substitutes.get(k, k): v for k, v in counts.items()}
    counts = {k: defaults[k] if v is None else v for k, v in counts.items()}
    if n_per_distractor is None and isinstance(n_per_class, (int, np.integer)):
        n_per_distractor = n_per_class
    dcounts = _counts(n_per_distractor, distractors, None, 'distractor count')
    dcounts = {temps.substitutes.get(k, k): v for k, v in dcounts.items()}
    dcounts = {k: defaults[k] if v is None else v for k, v in dcounts.items()}

    ss = np.random.SeedSequence(int(seed))
    rng_place, rng_orient, rng_noise, rng_misc = [np.random.default_rng(s) for s in ss.spawn(4)]

    # --- placement (vesicles, particles round-robin over classes, distractors, beads)
    items = []  # (kind, name, radius)
    ves_radii = []
    for _ in range(int(n_vesicles)):
        r_lo = VESICLE_RADIUS_A[0] / voxel_size
        r_hi = min(VESICLE_RADIUS_A[1] / voxel_size, (min(shape) - 1) / 2.0 - 3 * _leaflet_sigma(voxel_size) - 1)
        if r_hi >= r_lo:
            r = float(rng_misc.uniform(r_lo, r_hi))
            ves_radii.append(r)
    ves_dens = [vesicle_density(r, voxel_size) for r in ves_radii]
    items += [('vesicle', 'vesicle', d[1]) for d in ves_dens]

    def round_robin(count_map, kind):
        order = []
        for k in range(max(count_map.values(), default=0)):
            order += [(kind, n, temps.radius[n]) for n in count_map if count_map[n] > k]
        return order

    items += round_robin(counts, 'particle') + round_robin(dcounts, 'distractor')
    bead_r = max(1.0, BEAD_RADIUS_A / voxel_size)
    items += [('bead', 'bead', bead_r + 0.5)] * int(n_beads)
    centres = place_spheres(shape, [it[2] for it in items], rng_place)

    phantom = np.zeros(shape, dtype=np.float32)
    truth_rows, extras = [], []
    placed = {'vesicles': 0, 'beads': 0, **{n: 0 for n in class_names}, **{n: 0 for n in distractor_names}}
    eulers = geometry.random_eulers(len(items), rng_orient)
    bead = bead_density(bead_r)
    ves_iter = iter(ves_dens)
    for (kind, name_i, radius), centre, angles in zip(items, centres, eulers):
        dens = next(ves_iter)[0] if kind == 'vesicle' else None
        if centre is None:
            continue
        if kind in ('particle', 'distractor'):
            piece = geometry.particle_from_reference(temps[name_i], *angles)
            placed[name_i] += 1
        elif kind == 'bead':
            piece = bead
            placed['beads'] += 1
        else:
            piece = dens
            placed['vesicles'] += 1
        _paste(phantom, piece, centre)
        z, y, x = centre
        if kind == 'particle':
            truth_rows.append((x, y, z, class_names.index(name_i) + 1, *angles))
        else:
            extras.append({'kind': kind, 'name': name_i, 'x': x, 'y': y, 'z': z, 'radius': float(radius)})
    for n in class_names:
        if placed[n] < counts[n]:
            log.warning("%s: only %d of %d '%s' particles fit", name, placed[n], counts[n], n)

    truth_arr = np.array(truth_rows, dtype=float).reshape(-1, 7)
    truth = truth_frame(truth_arr[:, :3], name, truth_arr[:, 3].astype(int), truth_arr[:, 4:7])

    # --- tilt series, CTF, noise, phase flip, weighted back-projection
    angles_deg = tilt_angles(tilt_range, tilt_step)
    lo, hi = _defocus_range(defocus_um)
    base = float(rng_misc.uniform(lo, hi))
    defoci = np.clip(base + rng_misc.normal(0.0, DEFOCUS_JITTER_UM, size=len(angles_deg)), lo, hi) \
        if hi > lo else np.full(len(angles_deg), lo)
    volume, proj_noisy, proj_clean, measured = _reconstruct(
        phantom, angles_deg, defoci, snr, voxel_size, rng_noise, radial_cutoff, radial_falloff)

    meta = {
        'name': name, 'shape_zyx': list(shape), 'voxel_size': float(voxel_size), 'seed': int(seed),
        'snr': float(snr),
        'snr_definition': 'per tilt: variance of the noise-free CTF-filtered projection / noise variance',
        'measured_projection_snr': [float(v) for v in measured],
        'tilt_range': float(tilt_range), 'tilt_step': float(tilt_step),
        'tilt_angles': [float(a) for a in angles_deg], 'tilt_axis': 'Y',
        'defocus_um': [float(d) for d in defoci], 'voltage_kv': VOLTAGE_KV, 'cs_mm': CS_MM,
        'amplitude_contrast': AMPLITUDE_CONTRAST, 'ctf_correction': 'phase flip',
        'reconstruction': f'weighted back-projection (ramp, cutoff {radial_cutoff}, falloff {radial_falloff} '
                          f'cycles/pixel), normalised to mean 0 / std 1',
        'contrast': 'dark',
        'template_source': temps.source, 'template_folder': temps.folder,
        'template_substitutes': dict(temps.substitutes),
        'class_names': class_names,
        'diameters_vox': {n: round(temps.diameter(n), 2) for n in class_names + distractor_names},
        'distractors': distractor_names,
        'requested': {**counts, **dcounts, 'vesicles': int(n_vesicles), 'beads': int(n_beads)},
        'placed': placed,
        'n_particles': int(len(truth)),
        'extras': extras,
        'coordinates': 'x, y, z in voxels of this volume, origin at the first voxel; angles RELION ZYZ, '
                       'particle(x) = template(A^T x), A = RELION matrix of (rot, tilt, psi)',
    }
    return SimulatedTomogram(name=name, volume=volume, truth=truth, class_names=class_names, phantom=phantom,
                             meta=meta, voxel_size=float(voxel_size),
                             projections=proj_noisy if keep_projections else None,
                             projections_clean=proj_clean if keep_projections else None)


def truth_frame(xyz, name, classes, angles, micrograph=False):
    """RELION coordinate table; an empty one (with all columns) when nothing was placed."""
    if len(xyz):
        return star.coordinates_frame(xyz, volume_name=name, classes=classes, angles=angles,
                                      micrograph=micrograph)
    cols = [star.MIC if micrograph else star.TOMO, star.X, star.Y] + ([] if micrograph else [star.Z]) \
        + [star.CLASS, *star.ANGLES]
    frame = pd.DataFrame({c: pd.Series(dtype=float) for c in cols})
    return frame.astype({cols[0]: str, star.CLASS: int})


def _reconstruct(phantom, angles_deg, defoci, snr, voxel_size, rng, cutoff, falloff):
    nz, ny, nx = phantom.shape
    matrix, nu = projection_matrix(nz, nx, angles_deg)
    clean = project(phantom, angles_deg, matrix)  # (tilts, ny, nu)
    # Zero padding keeps the CTF and ramp filters from wrapping around the image edges.
    py, pu = _fft_size(ny + 32), _fft_size(2 * nu)
    ctfs = np.stack([ctf_2d((py, pu), voxel_size, d, VOLTAGE_KV, CS_MM, AMPLITUDE_CONTRAST)
                     for d in defoci]).astype(np.float32)
    spec = fft.rfft2(clean, s=(py, pu))
    half = ctfs[:, :, :pu // 2 + 1]
    ctf_proj = -fft.irfft2(spec * half, s=(py, pu))[:, :ny, :nu].astype(np.float32)  # dark contrast
    sig_var = ctf_proj.reshape(len(angles_deg), -1).var(axis=1)
    sigma = np.sqrt(sig_var / snr).astype(np.float32)
    noise = rng.standard_normal(ctf_proj.shape, dtype=np.float32) * sigma[:, None, None]
    noisy = ctf_proj + noise
    measured = sig_var / noise.reshape(len(angles_deg), -1).var(axis=1)
    # Phase flip (sign of the CTF) and the WBP ramp in one pass; Δθ makes the scale that of a full WBP.
    weight = radial_weight(pu, cutoff, falloff)[:pu // 2 + 1].astype(np.float32)
    dtheta = np.deg2rad(np.mean(np.diff(angles_deg))) if len(angles_deg) > 1 else 1.0
    filt = fft.irfft2(fft.rfft2(noisy, s=(py, pu)) * np.sign(half) * weight[None, None, :] * dtheta,
                         s=(py, pu))[:, :ny, :nu].astype(np.float32)
    vol = back_project(filt, (nz, ny, nx), angles_deg, matrix)
    vol = vol - vol.mean()
    std = float(vol.std())
    vol = (vol / std if std > 0 else vol).astype(np.float32)
    return vol, noisy, ctf_proj, measured


def _fft_size(n):
    """Smallest 2^a·3^b·5^c ≥ n (fast FFT length)."""
    n = int(n)
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def write_simulated_tomogram(sim, out_dir):
    """Write `<name>.mrc` (voxel size in the header), `<name>_truth.star` and `<name>.json` (meta and
    class names), each atomically. Returns {'tomogram', 'truth', 'meta'} -> path."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {'tomogram': os.path.join(out_dir, f'{sim.name}.mrc'),
             'truth': os.path.join(out_dir, f'{sim.name}_truth.star'),
             'meta': os.path.join(out_dir, f'{sim.name}.json')}
    write_mrc(paths['tomogram'], sim.volume, voxel_size=sim.voxel_size)
    star.write_coordinates(paths['truth'], sim.truth)
    write_json(paths['meta'], {**sim.meta, 'class_names': list(sim.class_names)})
    return paths


def write_json(path, data):
    with atomic_path(path, suffix='.json') as tmp:
        with open(tmp, 'w') as fh:
            json.dump(data, fh, indent=1, default=_json_default)
    return path


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
