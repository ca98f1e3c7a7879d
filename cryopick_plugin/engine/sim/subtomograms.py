"""Simulated subtomograms (one particle per box) with known classes and orientations.

Each subtomogram is a template copy at random RELION angles, centred on voxel ``box // 2`` of each axis
(the centre of a box extracted around an integer coordinate, RELION's convention), then:

- CTF of a phase-flipped tomogram: |CTF(|k|)| (300 kV, Cs 2.7 mm, 7 % amplitude contrast) at the
  subtomogram's defocus (one value, or drawn uniformly in a (lo, hi) range per subtomogram);
- missing wedge: Fourier components beyond ±tilt_range about the Y tilt axis (|kz| > |kx|·tan(range))
  are zeroed, which is what a tilt series over ±tilt_range leaves a subvolume with;
- dark contrast (negated), as in the tomograms of `simulate_tomo`;
- Gaussian noise filtered by the same wedge (the noise of a real subtomogram is also confined to the
  sampled region), scaled per subtomogram so that
  var(filtered signal) / var(filtered noise) = snr exactly, both over the whole box.

Templates whose bounding diameter does not fit in the box are resampled to a coarser voxel size, the
same factor for every class (meta 'binning', 'voxel_size').
"""
import dataclasses
import os

import numpy as np
import pandas as pd
from scipy import fft

from .. import geometry
from ..io import star
from .ctf import ctf_1d
from ..errors import InputError
from ..io.mrc import write_mrc
from .tomograms import AMPLITUDE_CONTRAST, CS_MM, VOLTAGE_KV, _paste, write_json
from .templates import load_templates


@dataclasses.dataclass
class SimulatedSubtomograms:
    stack: np.ndarray        # (N, box, box, box) float32, particles dark
    labels: np.ndarray       # (N,) int, 0-based index into class_names
    eulers: np.ndarray       # (N, 3) RELION rot, tilt, psi (degrees)
    class_names: list
    meta: dict
    clean: np.ndarray = None     # noise-free filtered signal (kept on request)
    defocus_um: np.ndarray = None


def simulate_subtomograms(classes=('4v4r', '3j9i', '4v94', '4cr2', '1qvr'), n_per_class=200, box=32, snr=0.1,
                          tilt_range=60.0, voxel_size=10.0, defocus_um=4.0, seed=0, templates_dir=None,
                          synthetic=False, keep_clean=False, chunk=64):
    """Simulate `n_per_class` subtomograms per class, shuffled; see the module docstring.

    voxel_size is the templates' sampling before any binning needed to fit the box.
    """
    classes = [classes] if isinstance(classes, str) else list(classes)
    if not classes:
        raise InputError('classes', "at least one class is needed")
    if int(box) != box or box < 8:
        raise InputError('box', f"must be an integer of at least 8 voxels, got {box}")
    if int(n_per_class) != n_per_class or n_per_class < 1:
        raise InputError('per-class count', f"must be a positive integer, got {n_per_class}")
    if not snr > 0:
        raise InputError('snr', f"must be positive, got {snr}")
    if not 0 < tilt_range <= 90:
        raise InputError('tilt range', f"must be in (0, 90] degrees, got {tilt_range}")
    d = np.atleast_1d(np.asarray(defocus_um, dtype=float))
    if not (d.size in (1, 2) and np.all(d > 0)):
        raise InputError('defocus', f"expected one underfocus value or a (lo, hi) range in µm, got {defocus_um}")
    box, n_per_class = int(box), int(n_per_class)

    temps = load_templates(classes, folder=templates_dir, voxel_size=voxel_size, synthetic=synthetic)
    names = [temps.substitutes.get(c, c) for c in classes]
    # Bin (resample) every class by the same factor until the largest molecule fits in the box.
    binning = max(1.0, max(temps.diameter(n) for n in names) / (box - 2))
    while binning > 1.0:
        temps = load_templates(classes, folder=templates_dir, voxel_size=voxel_size * binning,
                               synthetic=synthetic)
        if max(temps.diameter(n) for n in names) <= box - 2:
            break
        binning *= 1.05
    vox = float(voxel_size) * binning

    ss = np.random.SeedSequence(int(seed))
    rng_orient, rng_noise, rng_misc = [np.random.default_rng(s) for s in ss.spawn(3)]
    labels = rng_misc.permutation(np.repeat(np.arange(len(names)), n_per_class))
    n = len(labels)
    eulers = geometry.random_eulers(n, rng_orient)
    defoci = np.full(n, d[0]) if d.size == 1 else rng_misc.uniform(d.min(), d.max(), size=n)

    # Half-spectrum (rfftn) layout: the last axis holds only the non-negative frequencies.
    half = box // 2 + 1
    freq = np.sqrt(np.square(np.fft.fftfreq(box, d=vox)).reshape(-1, 1, 1)
                   + np.square(np.fft.fftfreq(box, d=vox)).reshape(1, -1, 1)
                   + np.square(np.fft.rfftfreq(box, d=vox)).reshape(1, 1, -1))
    wedge = geometry.wedge_mask((box,) * 3, tilt_range)[:, :, :half].astype(np.float32)
    stack = np.empty((n, box, box, box), np.float32)
    clean = np.empty_like(stack) if keep_clean else None
    centre = (box // 2,) * 3
    for start in range(0, n, chunk):
        idx = np.arange(start, min(n, start + chunk))
        raw = np.zeros((len(idx), box, box, box), np.float32)
        for j, i in enumerate(idx):
            piece = geometry.particle_from_reference(temps[names[labels[i]]], *eulers[i])
            _paste(raw[j], piece, centre)
        ctf = np.abs(np.stack([ctf_1d(freq, df, VOLTAGE_KV, CS_MM, AMPLITUDE_CONTRAST)
                               for df in defoci[idx]])).astype(np.float32)
        sig = -fft.irfftn(fft.rfftn(raw, axes=(1, 2, 3)) * (ctf * wedge), s=(box,) * 3, axes=(1, 2, 3))
        white = rng_noise.standard_normal(raw.shape, dtype=np.float32)
        noise = fft.irfftn(fft.rfftn(white, axes=(1, 2, 3)) * wedge, s=(box,) * 3, axes=(1, 2, 3))
        sig_var = sig.reshape(len(idx), -1).var(axis=1)
        noise_var = noise.reshape(len(idx), -1).var(axis=1)
        noise *= np.sqrt(sig_var / snr / noise_var)[:, None, None, None]
        stack[idx] = (sig + noise).astype(np.float32)
        if keep_clean:
            clean[idx] = sig.astype(np.float32)

    meta = {
        'n': int(n), 'n_per_class': n_per_class, 'box': box, 'snr': float(snr),
        'snr_definition': 'per subtomogram: variance of the CTF- and wedge-filtered signal / variance of '
                          'the wedge-filtered noise, over the whole box',
        'tilt_range': float(tilt_range), 'tilt_axis': 'Y', 'missing_wedge': 'zeroed beyond ±tilt_range',
        'voxel_size': vox, 'template_voxel_size': float(voxel_size), 'binning': float(binning),
        'defocus_um': [float(v) for v in np.unique(defoci)] if d.size == 1 else [float(d.min()), float(d.max())],
        'ctf': '|CTF| (phase-flipped)', 'voltage_kv': VOLTAGE_KV, 'cs_mm': CS_MM,
        'amplitude_contrast': AMPLITUDE_CONTRAST, 'contrast': 'dark', 'seed': int(seed),
        'particle_centre': 'voxel box//2 on each axis',
        'template_source': temps.source, 'template_substitutes': dict(temps.substitutes),
        'class_names': names, 'diameters_vox': {k: round(temps.diameter(k), 2) for k in names},
    }
    return SimulatedSubtomograms(stack=stack, labels=labels.astype(int), eulers=eulers, class_names=names,
                                 meta=meta, clean=clean, defocus_um=defoci)


def write_subtomograms(sim, out_dir, folder='subtomograms'):
    """Write one MRC per subtomogram (``<folder>/sub_000000.mrc``), ``subtomograms.star``
    (rlnImageName relative to out_dir, rlnClassNumber = label + 1, rlnAngleRot/Tilt/Psi,
    rlnDefocusU in Å) and ``subtomograms.json`` (meta). Returns {'star', 'meta', 'folder'} -> path."""
    os.makedirs(os.path.join(out_dir, folder), exist_ok=True)
    names = []
    for i, vol in enumerate(sim.stack):
        rel = f'{folder}/sub_{i:06d}.mrc'
        write_mrc(os.path.join(out_dir, rel), vol, voxel_size=sim.meta['voxel_size'])
        names.append(rel)
    table = pd.DataFrame({'rlnImageName': names, star.CLASS: sim.labels.astype(int) + 1})
    for j, col in enumerate(star.ANGLES):
        table[col] = sim.eulers[:, j]
    if sim.defocus_um is not None:
        table['rlnDefocusU'] = np.asarray(sim.defocus_um) * 1e4
    paths = {'star': os.path.join(out_dir, 'subtomograms.star'),
             'meta': os.path.join(out_dir, 'subtomograms.json'),
             'folder': os.path.join(out_dir, folder)}
    star.write_star(paths['star'], {'particles': table})
    write_json(paths['meta'], {**sim.meta, 'class_names': list(sim.class_names)})
    return paths
