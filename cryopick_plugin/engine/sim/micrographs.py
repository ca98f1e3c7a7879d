"""Simulated single-particle micrographs with ground truth.

Image model (particles DARK, as in a raw micrograph; meta 'contrast' = 'dark'):

    image = −CTF ⊛ (particle projections + carbon)  − ice gradient − contamination + noise

- particles: projections (sum along Z) of a template at random RELION angles, centred on their integer
  truth coordinate (rlnCoordinateX = column, rlnCoordinateY = row), non-overlapping (bounding circles),
  never on the carbon nor on contamination, kept fully inside the image;
- CTF: 300 kV, Cs 2.7 mm, 7 % amplitude contrast at `defocus_um` underfocus, not corrected (a raw
  micrograph);
- carbon edge: the edge of the holey-carbon film, an arc of a large circle, so the edge is gently
  curved; the carbon side carries extra, slightly textured density (its edge shows CTF fringes);
- ice gradient: a smooth thickness change (a linear ramp plus a very low-frequency random field) that
  darkens the thicker side, amplitude ~1.5 noise standard deviations across the image;
- contamination: 1-3 irregular, very dark blobs (ice crystals / ethane), several hundred Å across;
- noise: white Gaussian noise with σ² = var(CTF-filtered particle signal inside the particles'
  bounding discs) / snr.

The result is normalised to mean 0, standard deviation 1.
"""
import dataclasses
import os

import numpy as np
import pandas as pd
from scipy import ndimage

from .. import geometry
from ..io import star
from .ctf import ctf_2d
from ..errors import InputError
from ..io.mrc import write_mrc
from .tomograms import AMPLITUDE_CONTRAST, CS_MM, VOLTAGE_KV, truth_frame, write_json
from .templates import load_templates


@dataclasses.dataclass
class SimulatedMicrograph:
    name: str
    image: np.ndarray            # float32 (y, x), particles dark, mean 0 / std 1
    truth: pd.DataFrame          # rlnMicrographName, rlnCoordinateX (column), rlnCoordinateY (row), class, angles
    class_names: list
    meta: dict
    pixel_size: float = 10.0
    clean: np.ndarray = None     # noise-free projected particle density (positive), kept on request
    carbon_mask: np.ndarray = None
    contamination_mask: np.ndarray = None


def _smooth_field(shape, rng, sigma):
    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma, mode='wrap')
    return f / (f.std() + 1e-12)


def simulate_micrograph(shape=(1024, 1024), template='1bxn', n_particles=60, snr=0.1, pixel_size=10.0,
                        defocus_um=2.0, ice_gradient=True, carbon_edge=True, contamination=True, seed=0,
                        templates_dir=None, name='mic_000', synthetic=False, keep_clean=False):
    """Simulate one micrograph; see the module docstring. `template` is one name or a list (class i + 1
    = i-th name, drawn at random per particle). Raises InputError for bad options or when no particle
    fits."""
    shape = tuple(shape)
    if len(shape) != 2 or any(int(s) != s or s < 16 for s in shape):
        raise InputError('shape', f"expected two sizes Y X of at least 16 pixels, got {shape}")
    shape = tuple(int(s) for s in shape)
    if int(n_particles) != n_particles or n_particles < 0:
        raise InputError('particles', f"count must be a non-negative integer, got {n_particles}")
    if not snr > 0:
        raise InputError('snr', f"must be positive, got {snr}")
    if not pixel_size > 0:
        raise InputError('pixel size', f"must be positive, got {pixel_size}")
    if not defocus_um > 0:
        raise InputError('defocus', f"expected an underfocus > 0 µm, got {defocus_um}")
    names = [template] if isinstance(template, str) else list(template)
    temps = load_templates(names, folder=templates_dir, voxel_size=pixel_size, synthetic=synthetic)
    class_names = [temps.substitutes.get(n, n) for n in names]
    for n in class_names:
        if 2 * temps.radius[n] > min(shape) - 1:
            raise InputError('shape', f"Y X = {shape[0]} {shape[1]} is too small to hold one '{n}' particle "
                                      f"(diameter {2 * temps.radius[n]:.0f} pixels at {pixel_size:g} Å/pixel)")

    ss = np.random.SeedSequence(int(seed))
    rng_place, rng_orient, rng_noise, rng_misc = [np.random.default_rng(s) for s in ss.spawn(4)]
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)

    # --- carbon: the side of an arc (circle radius 1.5-4 image widths) covering 10-35 % of the image
    carbon = np.zeros(shape, bool)
    if carbon_edge:
        R = float(rng_misc.uniform(1.5, 4.0)) * max(shape)
        ang = float(rng_misc.uniform(0, 2 * np.pi))
        direction = np.array([np.sin(ang), np.cos(ang)])  # (dy, dx) towards the carbon
        depth = float(rng_misc.uniform(0.10, 0.35)) * max(shape)
        centre_img = np.array([(ny - 1) / 2, (nx - 1) / 2])
        # Point of the edge nearest the carbon side, then the circle's centre beyond it.
        edge_pt = centre_img + direction * (0.5 * max(shape) - depth)
        circle_c = edge_pt - direction * R
        carbon = np.hypot(yy - circle_c[0], xx - circle_c[1]) > R
    # --- contamination blobs
    contam = np.zeros(shape, np.float32)
    n_blobs = int(rng_misc.integers(1, 4)) if contamination else 0
    for _ in range(n_blobs):
        cy, cx = rng_misc.uniform(0, ny), rng_misc.uniform(0, nx)
        # Physical size 150-400 Å, but never so large that a small image is all contamination.
        size = min(float(rng_misc.uniform(150, 400)) / pixel_size, min(shape) / 12.0)
        for _ in range(int(rng_misc.integers(3, 7))):
            oy, ox = rng_misc.normal(0, 0.6 * size, 2)
            s = size * float(rng_misc.uniform(0.4, 0.9))
            contam = np.maximum(contam, np.exp(-((yy - cy - oy) ** 2 + (xx - cx - ox) ** 2) / (2 * s * s)))
    contam_mask = contam > 0.05

    # --- particles: bounding circles inside the image, off carbon and contamination, non-overlapping
    blocked = carbon | contam_mask
    labels = rng_misc.integers(0, len(class_names), size=int(n_particles))
    dist_free = ndimage.distance_transform_edt(~blocked) if blocked.any() else np.full(shape, np.inf)
    centres, radii = [], []
    taken_c, taken_r = [], []
    for lab in labels:
        r = temps.radius[class_names[lab]]
        lo = int(np.ceil(r))
        if ny - 1 - lo < lo or nx - 1 - lo < lo:
            continue
        for _ in range(12):
            cand = np.stack([rng_place.integers(lo, ny - lo, 256), rng_place.integers(lo, nx - lo, 256)], 1)
            ok = dist_free[cand[:, 0], cand[:, 1]] > r
            if taken_c:
                c = np.asarray(taken_c, float)
                d = np.sqrt(((cand[:, None, :] - c[None]) ** 2).sum(-1))
                ok &= np.all(d >= np.asarray(taken_r)[None] + r, axis=1)
            if ok.any():
                centres.append(tuple(int(v) for v in cand[int(np.argmax(ok))]))
                radii.append(r)
                taken_c.append(centres[-1])
                taken_r.append(r)
                break
        else:
            centres.append(None)
            radii.append(r)
    keep = [i for i, c in enumerate(centres) if c is not None]
    eulers = geometry.random_eulers(len(labels), rng_orient)
    proj = np.zeros(shape, np.float32)
    for i in keep:
        vol = geometry.particle_from_reference(temps[class_names[labels[i]]], *eulers[i])
        piece = vol.sum(axis=0)
        cy, cx = centres[i]
        h = (piece.shape[0] - 1) // 2
        y0, x0 = cy - h, cx - h
        ys, xs = slice(max(y0, 0), min(y0 + piece.shape[0], ny)), slice(max(x0, 0), min(x0 + piece.shape[1], nx))
        proj[ys, xs] += piece[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]

    # --- CTF (padded by reflection so the film's edge does not wrap around)
    pad = 64
    ctf = ctf_2d((ny + 2 * pad, nx + 2 * pad), pixel_size, defocus_um, VOLTAGE_KV, CS_MM,
                 AMPLITUDE_CONTRAST).astype(np.float32)

    def apply_ctf(img):
        big = np.pad(img, pad, mode='reflect')
        return -np.fft.ifft2(np.fft.fft2(big) * ctf).real[pad:-pad, pad:-pad].astype(np.float32)

    signal = apply_ctf(proj)
    inside = np.zeros(shape, bool)
    for i in keep:
        cy, cx = centres[i]
        inside |= (yy - cy) ** 2 + (xx - cx) ** 2 <= radii[i] ** 2
    sig_var = float(signal[inside].var()) if inside.sum() > 1 else float(signal.var())
    if not sig_var > 0:
        sig_var = 1.0  # no particle: noise at unit scale
    sigma = np.sqrt(sig_var / snr)
    image = signal.copy()
    if carbon.any():
        # 100-200 Å of carbon, ~2.5× the contrast of protein per unit thickness, with amorphous texture.
        thick = float(rng_misc.uniform(100, 200)) / pixel_size * 2.5
        texture = 1.0 + 0.1 * _smooth_field(shape, rng_misc, 1.0)
        carbon_dens = ndimage.gaussian_filter(carbon.astype(np.float32), 1.0) * thick * texture
        # Phase contrast through the CTF plus the amplitude loss of the thicker film.
        image += apply_ctf(carbon_dens.astype(np.float32)) - 0.5 * sigma * carbon_dens / thick
    if ice_gradient:
        ang = float(rng_misc.uniform(0, 2 * np.pi))
        ramp = (np.cos(ang) * (xx - nx / 2) + np.sin(ang) * (yy - ny / 2)) / max(shape)
        slow = _smooth_field(shape, rng_misc, max(shape) / 6.0)
        ice = ramp / (ramp.std() + 1e-12) + 0.5 * slow
        ice = (ice - ice.min()) / (ice.max() - ice.min() + 1e-12)  # 0 (thinnest) .. 1 (thickest)
        image -= 1.5 * sigma * ice
    if n_blobs:
        image -= 6.0 * sigma * contam
    noise = rng_noise.standard_normal(shape, dtype=np.float32) * np.float32(sigma)
    image = image + noise
    image = ((image - image.mean()) / image.std()).astype(np.float32)

    rows = [(centres[i][1], centres[i][0], labels[i] + 1, *eulers[i]) for i in keep]
    arr = np.array(rows, dtype=float).reshape(-1, 6)
    truth = truth_frame(arr[:, :2], name, arr[:, 2].astype(int), arr[:, 3:6], micrograph=True)
    meta = {
        'name': name, 'shape_yx': list(shape), 'pixel_size': float(pixel_size), 'seed': int(seed),
        'snr': float(snr),
        'snr_definition': 'variance of the CTF-filtered particle signal inside the particles\' bounding '
                          'discs / noise variance',
        'measured_snr': sig_var / float(noise.var()),
        'defocus_um': float(defocus_um), 'voltage_kv': VOLTAGE_KV, 'cs_mm': CS_MM,
        'amplitude_contrast': AMPLITUDE_CONTRAST, 'ctf_correction': 'none', 'contrast': 'dark',
        'template_source': temps.source, 'template_substitutes': dict(temps.substitutes),
        'class_names': class_names,
        'diameter_px': {n: round(temps.diameter(n), 2) for n in class_names},
        'particle_diameter_px': round(max(temps.diameter(n) for n in class_names), 2),
        'requested': int(n_particles), 'placed': len(keep),
        'carbon_edge': bool(carbon.any()), 'carbon_fraction': float(carbon.mean()),
        'contamination_blobs': n_blobs, 'ice_gradient': bool(ice_gradient),
        'particles_on_carbon': False,
        'coordinates': 'rlnCoordinateX = column, rlnCoordinateY = row of the image array, origin at the '
                       'first pixel',
    }
    return SimulatedMicrograph(name=name, image=image, truth=truth, class_names=class_names, meta=meta,
                               pixel_size=float(pixel_size), clean=proj if keep_clean else None,
                               carbon_mask=carbon, contamination_mask=contam_mask)


def write_simulated_micrograph(sim, out_dir):
    """Write `<name>.mrc` (2D, pixel size in the header), `<name>_truth.star` and `<name>.json`,
    atomically. Returns {'micrograph', 'truth', 'meta'} -> path."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {'micrograph': os.path.join(out_dir, f'{sim.name}.mrc'),
             'truth': os.path.join(out_dir, f'{sim.name}_truth.star'),
             'meta': os.path.join(out_dir, f'{sim.name}.json')}
    write_mrc(paths['micrograph'], sim.image, voxel_size=sim.pixel_size)
    star.write_coordinates(paths['truth'], sim.truth)
    write_json(paths['meta'], {**sim.meta, 'class_names': list(sim.class_names)})
    return paths
