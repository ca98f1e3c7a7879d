"""Simulators: determinism, the physics they claim (missing wedge, CTF zeros, SNR definitions, dark
contrast), ground truth that matches the data (orientations, positions, no overlaps), the synthetic
fallback and the `cryopick simulate` command."""
import json
import logging
import os

import numpy as np
import pytest
from scipy import ndimage

from cryopick_plugin.engine import geometry, settings
from cryopick_plugin.engine.io import mrc, star
from cryopick_plugin.engine.sim.ctf import ctf_2d, ctf_zeros
from cryopick_plugin.engine.errors import InputError
from cryopick_plugin.engine.sim.micrographs import simulate_micrograph, write_simulated_micrograph
from cryopick_plugin.engine.sim.subtomograms import simulate_subtomograms, write_subtomograms
from cryopick_plugin.engine.sim.tomograms import (place_spheres, project, simulate_tomogram, tilt_angles, write_simulated_tomogram)
from cryopick_plugin.engine.sim.templates import load_templates

SMALL = dict(shape=(32, 48, 64), classes=('3j9i', '1bxn'), n_per_class=3)


@pytest.fixture(scope='module')
def clean_tomo():
    """A high-SNR tomogram with beads, a vesicle and a distractor, and its tilt series."""
    return simulate_tomogram(shape=(40, 56, 72), classes=('3j9i', '1bxn'), n_per_class=4, snr=100.0,
                             distractors=('3gl1',), n_per_distractor=2, n_beads=2, n_vesicles=1, seed=1,
                             keep_projections=True)


def _sphere_mask(half, radius):
    ax = np.arange(-half, half + 1)
    z, y, x = np.meshgrid(ax, ax, ax, indexing='ij')
    return z * z + y * y + x * x <= radius * radius


def _average_back(phantom, truth, class_number, half, correct=True):
    """Average of the subvolumes at the class's truth positions, rotated back to the template frame."""
    padded = np.pad(phantom, half)
    acc = np.zeros((2 * half + 1,) * 3, np.float32)
    for _, row in truth[truth[star.CLASS] == class_number].iterrows():
        x, y, z = (int(row[c]) for c in (star.X, star.Y, star.Z))
        sub = padded[z:z + 2 * half + 1, y:y + 2 * half + 1, x:x + 2 * half + 1]
        angles = row[star.ROT], row[star.TILT], row[star.PSI]
        if correct:
            acc += geometry.reference_from_particle(sub, *angles)
        else:  # the opposite rotation: what a convention mix-up would do
            acc += geometry.rotate_volume(sub, geometry.euler_to_matrix(*angles).T)
    return acc


def _centre_crop(vol, half):
    c = (vol.shape[0] - 1) // 2
    return vol[c - half:c + half + 1, c - half:c + half + 1, c - half:c + half + 1]


# --- (a) determinism ---------------------------------------------------------------------------------

def test_tomogram_is_deterministic_for_a_seed():
    a = simulate_tomogram(seed=3, **SMALL)
    b = simulate_tomogram(seed=3, **SMALL)
    c = simulate_tomogram(seed=4, **SMALL)
    np.testing.assert_array_equal(a.volume, b.volume)
    assert a.truth.equals(b.truth)
    assert not np.allclose(a.volume, c.volume)
    assert not a.truth[[star.X, star.Y, star.Z]].equals(c.truth[[star.X, star.Y, star.Z]])
    # the noise stream is separate: another SNR keeps the particles where they were
    d = simulate_tomogram(seed=3, snr=1.0, **SMALL)
    assert a.truth.equals(d.truth)
    np.testing.assert_array_equal(a.phantom, d.phantom)
    assert a.volume.dtype == np.float32 and a.volume.shape == SMALL['shape']
    assert abs(float(a.volume.mean())) < 1e-3 and float(a.volume.std()) == pytest.approx(1.0, rel=1e-3)


def test_subtomograms_and_micrographs_are_deterministic():
    kw = dict(classes=('3j9i', '1bxn'), n_per_class=3, box=24)
    a, b = simulate_subtomograms(seed=5, **kw), simulate_subtomograms(seed=5, **kw)
    np.testing.assert_array_equal(a.stack, b.stack)
    assert not np.allclose(a.stack, simulate_subtomograms(seed=6, **kw).stack)
    kw = dict(shape=(96, 128), n_particles=4)
    m1, m2 = simulate_micrograph(seed=2, **kw), simulate_micrograph(seed=2, **kw)
    np.testing.assert_array_equal(m1.image, m2.image)
    assert not np.allclose(m1.image, simulate_micrograph(seed=3, **kw).image)


# --- (b) missing wedge ---------------------------------------------------------------------------------

def test_missing_wedge_is_empty_in_the_tomogram_spectrum():
    tilt = 50.0
    sim = simulate_tomogram(shape=(40, 32, 64), classes=('1bxn',), n_per_class=6, snr=0.5, tilt_range=tilt,
                            tilt_step=5.0, seed=2)
    power = np.abs(np.fft.fftn(sim.volume)) ** 2
    nz, ny, nx = sim.volume.shape
    kz = np.abs(np.fft.fftfreq(nz)).reshape(-1, 1, 1)
    kx = np.abs(np.fft.fftfreq(nx)).reshape(1, 1, -1)
    angle = np.broadcast_to(np.degrees(np.arctan2(kz, kx)), power.shape)  # 0 = along x, 90 = along z
    band = np.broadcast_to((np.hypot(kz, kx) > 0.06) & (np.hypot(kz, kx) < 0.3), power.shape)
    missing = power[band & (angle > tilt + 12)].mean()
    sampled = power[band & (angle < tilt - 12)].mean()
    assert missing < 0.05 * sampled
    assert sim.meta['tilt_angles'][0] == -tilt and sim.meta['tilt_angles'][-1] == tilt
    assert len(sim.meta['defocus_um']) == len(tilt_angles(tilt, 5.0)) == 21


# --- (c) CTF zeros ------------------------------------------------------------------------------------

@pytest.mark.parametrize('defocus', [1.2, 2.5])
def test_ctf_zero_rings_fall_where_the_defocus_predicts(defocus):
    n, pix = 384, 1.5
    noise = np.random.default_rng(0).standard_normal((n, n))
    image = np.fft.ifft2(np.fft.fft2(noise) * ctf_2d((n, n), pix, defocus)).real
    power = np.abs(np.fft.fft2(image)) ** 2
    ky, kx = np.meshgrid(np.fft.fftfreq(n, pix), np.fft.fftfreq(n, pix), indexing='ij')
    k = np.hypot(ky, kx)
    width = 1.0 / (n * pix)
    bins = np.round(k / width).astype(int)
    radial = np.bincount(bins.ravel(), power.ravel()) / np.bincount(bins.ravel())
    zeros = ctf_zeros(defocus, pix, 300.0, 2.7, n=4)
    assert len(zeros) == 4 and np.all(np.diff(zeros) > 0)
    for z in zeros:
        b = int(round(z / width))
        window = radial[b - 4:b + 5]
        # the radial minimum near each predicted zero is within one bin of it and deep
        assert abs(int(np.argmin(window)) - 4) <= 1
        assert window.min() < 0.1 * radial[b - 20:b + 20].max()
    # more underfocus pulls the first zero to lower frequency
    assert ctf_zeros(defocus + 1.0, pix, n=1)[0] < zeros[0]


def test_ctf_is_positive_amplitude_contrast_at_the_origin():
    c = ctf_2d((8, 8), 2.0, 3.0, amplitude_contrast=0.1)
    assert c[0, 0] == pytest.approx(0.1)
    assert c.shape == (8, 8) and np.all(np.abs(c) <= 1.0 + 1e-9)


# --- (d) orientations and positions reproduce the template ---------------------------------------------

def test_truth_orientations_rotate_particles_back_onto_the_template(clean_tomo):
    temps = load_templates(clean_tomo.class_names)
    for number, name in enumerate(clean_tomo.class_names, start=1):
        radius = temps.radius[name]
        half = int(np.ceil(radius)) + 1
        mask = _sphere_mask(half, radius)
        ref = _centre_crop(temps[name], half)
        avg = _average_back(clean_tomo.phantom, clean_tomo.truth, number, half)
        assert (clean_tomo.truth[star.CLASS] == number).sum() >= 2
        assert np.corrcoef(avg[mask], ref[mask])[0, 1] >= 0.8


def test_orientation_convention_is_relion_with_an_asymmetric_shape():
    # A chiral synthetic shape: only the exact RELION convention gives a near-perfect average.
    sim = simulate_tomogram(shape=(48, 48, 64), classes=('l_shape',), n_per_class=3, snr=10.0, seed=7,
                            synthetic=True)
    temps = load_templates(['l_shape'], synthetic=True)
    radius = temps.radius['l_shape']
    half = int(np.ceil(radius)) + 1
    mask = _sphere_mask(half, radius)
    ref = _centre_crop(temps['l_shape'], half)
    good = np.corrcoef(_average_back(sim.phantom, sim.truth, 1, half)[mask], ref[mask])[0, 1]
    wrong = np.corrcoef(_average_back(sim.phantom, sim.truth, 1, half, correct=False)[mask], ref[mask])[0, 1]
    assert len(sim.truth) >= 2
    assert good >= 0.95 and wrong < good - 0.2


def test_tomogram_contrast_is_dark_and_matches_the_phantom(clean_tomo):
    vol = ndimage.gaussian_filter(clean_tomo.volume, 1.5)
    ph = ndimage.gaussian_filter(clean_tomo.phantom, 1.5)
    assert clean_tomo.meta['contrast'] == 'dark'
    assert np.corrcoef(vol.ravel(), ph.ravel())[0, 1] < -0.5
    # locally too: around every particle the tomogram is the negative of the density
    for x, y, z in star.xyz_array(clean_tomo.truth).astype(int):
        box = (slice(z - 5, z + 6), slice(y - 5, y + 6), slice(x - 5, x + 6))
        assert np.corrcoef(vol[box].ravel(), ph[box].ravel())[0, 1] < -0.3


# --- (e) placement ------------------------------------------------------------------------------------

def test_particles_and_extras_do_not_overlap_and_stay_inside(clean_tomo):
    meta = clean_tomo.meta
    radii = [meta['diameters_vox'][clean_tomo.class_names[c - 1]] / 2 for c in clean_tomo.truth[star.CLASS]]
    centres = [tuple(v) for v in star.xyz_array(clean_tomo.truth)]
    for e in meta['extras']:
        centres.append((e['x'], e['y'], e['z']))
        radii.append(e['radius'])
    kinds = {e['kind'] for e in meta['extras']}
    assert kinds == {'bead', 'vesicle', 'distractor'}
    assert meta['placed']['beads'] == 2 and meta['placed']['vesicles'] == 1
    assert set(clean_tomo.truth[star.CLASS]) == {1, 2}  # distractors are not in the truth
    c = np.asarray(centres, float)
    r = np.asarray(radii)
    d = np.sqrt(((c[:, None] - c[None]) ** 2).sum(-1))
    i, j = np.triu_indices(len(c), 1)
    assert np.all(d[i, j] >= r[i] + r[j] - 1e-6)
    size_xyz = np.array(clean_tomo.volume.shape[::-1])
    assert np.all(c - r[:, None] >= -1e-6) and np.all(c + r[:, None] <= size_xyz - 1 + 1e-6)


def test_crowded_placement_never_overlaps():
    # enough spheres that the k-d tree path (rebuilt every 128) is exercised, mixed radii
    rng = np.random.default_rng(0)
    radii = rng.choice([1.5, 2.5, 6.0], size=400)
    centres = place_spheres((30, 60, 60), radii, rng)
    got = np.array([c for c in centres if c is not None], float)
    r = np.array([ri for ri, c in zip(radii, centres) if c is not None])
    assert len(got) > 250
    d = np.sqrt(((got[:, None] - got[None]) ** 2).sum(-1))
    i, j = np.triu_indices(len(got), 1)
    assert np.all(d[i, j] >= r[i] + r[j] - 1e-9)
    assert np.all(got - r[:, None] >= 0) and np.all(got + r[:, None] <= np.array([29, 59, 59]))


def test_requests_that_do_not_fit_are_recorded():
    sim = simulate_tomogram(shape=(32, 40, 40), classes=('3j9i',), n_per_class=50, snr=1.0, seed=0)
    name, = sim.class_names  # '3j9i', or its synthetic stand-in where the checkout has no maps
    assert sim.meta['requested'][name] == 50
    assert 1 <= sim.meta['placed'][name] == len(sim.truth) < 50


# --- (f) projection SNR -------------------------------------------------------------------------------

def test_projection_snr_is_the_requested_one():
    sim = simulate_tomogram(snr=0.2, seed=0, keep_projections=True, **SMALL)
    clean, noisy = sim.projections_clean, sim.projections
    n = len(clean)
    measured = clean.reshape(n, -1).var(axis=1) / (noisy - clean).reshape(n, -1).var(axis=1)
    assert np.allclose(measured, 0.2, rtol=0.1)
    # dark contrast in the tilt series too: the zero-tilt view correlates negatively with the plain projection
    plain = project(sim.phantom, [0.0])[0]
    zero = n // 2
    assert sim.meta['tilt_angles'][zero] == 0.0
    assert np.corrcoef(ndimage.gaussian_filter(clean[zero], 2).ravel(),
                       ndimage.gaussian_filter(plain, 2).ravel())[0, 1] < -0.3


# --- (g) subtomograms -----------------------------------------------------------------------------------

def test_subtomogram_snr_definition_and_wedge():
    sim = simulate_subtomograms(classes=('4v4r', '3j9i', '1bxn'), n_per_class=4, box=24, snr=0.3,
                                keep_clean=True, seed=1)
    assert sim.stack.shape == (12, 24, 24, 24) and sim.stack.dtype == np.float32
    assert sorted(np.bincount(sim.labels)) == [4, 4, 4] and sim.eulers.shape == (12, 3)
    # 4v4r (~34 voxels across at 10 Å) does not fit a 24 box: every class is binned by the same factor
    assert sim.meta['binning'] > 1.3 and max(sim.meta['diameters_vox'].values()) <= 22
    noise = sim.stack - sim.clean
    ratio = sim.clean.reshape(12, -1).var(1) / noise.reshape(12, -1).var(1)
    assert np.allclose(ratio, 0.3, rtol=0.2)
    k = np.abs(np.fft.fftfreq(24))
    outside = np.broadcast_to(k.reshape(-1, 1, 1) > k.reshape(1, 1, -1) * np.tan(np.radians(60)) + 0.02,
                              (24,) * 3)
    for vol in (sim.clean[0], noise[0]):
        p = np.abs(np.fft.fftn(vol)) ** 2
        assert p[outside].sum() < 1e-6 * p.sum()
    # dark particles: every clean subtomogram anti-correlates with the rotated density it was made from
    temps = load_templates(sim.class_names, voxel_size=sim.meta['voxel_size'])
    for i in range(len(sim.labels)):
        piece = geometry.particle_from_reference(temps[sim.class_names[sim.labels[i]]], *sim.eulers[i])
        raw = np.zeros((24,) * 3, np.float32)
        h = (piece.shape[0] - 1) // 2
        lo = 12 - h  # the particle's centre is voxel box // 2
        src = slice(max(-lo, 0), min(piece.shape[0], 24 - lo))
        raw[max(lo, 0):lo + src.stop, max(lo, 0):lo + src.stop, max(lo, 0):lo + src.stop] = piece[src, src, src]
        assert np.corrcoef(sim.clean[i].ravel(), raw.ravel())[0, 1] < -0.3


def test_write_subtomograms(tmp_path):
    sim = simulate_subtomograms(classes=('3j9i', '1bxn'), n_per_class=2, box=24, seed=0)
    paths = write_subtomograms(sim, tmp_path)
    table = star.read_star_blocks(paths['star'])['particles']
    assert len(table) == 4 and list(table[star.CLASS]) == list(sim.labels + 1)
    first, voxel = mrc.open_volume(os.path.join(tmp_path, table['rlnImageName'][0]))
    np.testing.assert_array_equal(np.asarray(first), sim.stack[0])
    assert voxel == pytest.approx(sim.meta['voxel_size'])
    assert json.load(open(paths['meta']))['class_names'] == sim.class_names and len(sim.class_names) == 2


# --- (h) micrographs ------------------------------------------------------------------------------------

def test_micrograph_truth_lands_on_the_particles():
    sim = simulate_micrograph(shape=(120, 200), template=['1bxn', '3j9i'], n_particles=8, snr=0.5,
                              carbon_edge=False, contamination=False, seed=4, keep_clean=True)
    assert sim.image.shape == (120, 200) and len(sim.truth) >= 5
    assert set(sim.truth[star.CLASS]) <= {1, 2} and star.MIC in sim.truth.columns
    clean = sim.clean
    for _, row in sim.truth.iterrows():
        x, y = int(row[star.X]), int(row[star.Y])  # x = column, y = row
        win = clean[max(y - 6, 0):y + 7, max(x - 6, 0):x + 7]
        # the window, not the centre pixel: a ring seen down its axis is empty in the middle
        assert win.max() > 0.3 * clean.max()
        cy, cx = ndimage.center_of_mass(win)
        assert abs(cy + max(y - 6, 0) - y) < 1.5 and abs(cx + max(x - 6, 0) - x) < 1.5
    assert sim.meta['measured_snr'] == pytest.approx(0.5, rel=0.1)
    assert sim.meta['contrast'] == 'dark'
    # particles are dark in the image: the blurred image at the truth positions is below its mean
    blurred = ndimage.gaussian_filter(sim.image, 2)
    ys, xs = sim.truth[star.Y].to_numpy(int), sim.truth[star.X].to_numpy(int)
    assert blurred[ys, xs].mean() < blurred.mean()


def test_micrograph_keeps_particles_off_carbon_and_contamination(tmp_path):
    sim = simulate_micrograph(shape=(256, 256), n_particles=30, seed=1)
    blocked = sim.carbon_mask | sim.contamination_mask
    assert sim.meta['carbon_edge'] and 0.05 < sim.meta['carbon_fraction'] < 0.6
    ys, xs = sim.truth[star.Y].to_numpy(int), sim.truth[star.X].to_numpy(int)
    assert not blocked[ys, xs].any()
    paths = write_simulated_micrograph(sim, tmp_path)
    img, pix = mrc.open_volume(paths['micrograph'], ndim=2)
    assert img.shape == (256, 256) and pix == pytest.approx(10.0)
    back = star.read_coordinates(paths['truth'], dims=2)
    np.testing.assert_allclose(star.xyz_array(back), star.xyz_array(sim.truth))


# --- (i) synthetic fallback --------------------------------------------------------------------------------

def test_synthetic_fallback_without_a_template_folder(monkeypatch, caplog):
    monkeypatch.setattr(settings, 'default_templates_dir', lambda: None)
    with caplog.at_level(logging.WARNING):
        temps = load_templates(['4v4r', '1bxn'])
    assert temps.source == 'synthetic' and set(temps.substitutes) == {'4v4r', '1bxn'}
    assert len(set(temps)) == 2 and 'synthetic' in caplog.text
    for name, vol in temps.items():
        assert vol.ndim == 3 and vol.shape[0] % 2 == 1 and vol.min() >= 0 and vol.max() > 0.5
        assert 2 * temps.radius[name] < vol.shape[0]
    # the large molecule gets the larger stand-in
    assert temps.radius[temps.substitutes['4v4r']] > temps.radius[temps.substitutes['1bxn']]
    sim = simulate_tomogram(shape=(40, 48, 48), classes=('3j9i', '1bxn'), n_per_class=1, seed=0)
    assert sim.meta['template_source'] == 'synthetic' and sim.class_names == [
        sim.meta['template_substitutes']['3j9i'], sim.meta['template_substitutes']['1bxn']]
    with pytest.raises(InputError, match='unknown template'):
        load_templates(['not_a_map'])


def test_templates_are_rescaled_to_the_voxel_size(templates_dir):
    # real maps where the checkout has them, the synthetic stand-in otherwise
    at10 = load_templates(['4v4r'], folder=templates_dir or False, voxel_size=10.0)
    at20 = load_templates(['4v4r'], folder=templates_dir or False, voxel_size=20.0)
    assert at10.source == ('maps' if templates_dir else 'synthetic')
    name = at10.substitutes.get('4v4r', '4v4r')
    assert at20.radius[name] == pytest.approx(at10.radius[name] / 2, rel=0.15)
    # total mass per Å³ is preserved: 8× fewer voxels carry the same density. A map is resampled (5 %);
    # a synthetic shape is drawn anew on each grid, its outline and interior level set by that grid (15 %).
    assert at20[name].sum() * 8 == pytest.approx(at10[name].sum(), rel=0.05 if templates_dir else 0.15)


# --- (j) command line ------------------------------------------------------------------------------------

def test_cli_writes_tomograms_and_truth(tmp_path, capsys, templates_dir):
    from cryopick_plugin.commands import main
    out = tmp_path / 'sim'
    rc = main(['simulate', 'tomograms', '--out', str(out), '--count', '2', '--shape', '32', '48', '48',
               '--classes', '3j9i', '1bxn', '--per-class', '2', '--beads', '1', '--seed', '10'])
    assert rc == 0
    assert sorted(os.listdir(out)) == ['tomo_000.json', 'tomo_000.mrc', 'tomo_000_truth.star',
                                       'tomo_001.json', 'tomo_001.mrc', 'tomo_001_truth.star']
    printed = capsys.readouterr().out
    source = 'maps' if templates_dir else 'synthetic'
    assert 'tomo_001_truth.star' in printed and f'templates: {source}' in printed
    vol, voxel = mrc.open_volume(out / 'tomo_001.mrc')
    assert vol.shape == (32, 48, 48) and voxel == pytest.approx(10.0)
    truth = star.read_coordinates(out / 'tomo_001_truth.star')
    star.check_inside('truth', truth, vol.shape)
    assert set(truth[star.TOMO]) == {'tomo_001'}
    meta = json.load(open(out / 'tomo_001.json'))
    names = [meta['template_substitutes'].get(n, n) for n in ('3j9i', '1bxn')]
    assert meta['seed'] == 11 and meta['class_names'] == names and meta['contrast'] == 'dark'
    assert meta['template_source'] == source


@pytest.mark.parametrize('argv, message', [
    (['tomograms', '--classes', '3j9i', 'nonexistent'], "unknown template 'nonexistent'"),
    (['tomograms', '--shape', '16', '64', '64'], 'too small to hold one'),
    (['tomograms', '--snr', '0'], 'snr: must be positive'),
    (['tomograms', '--templates', '/no/such/folder'], 'template folder not found'),
    (['micrographs', '--template', 'nope'], "unknown template 'nope'"),
    (['subtomograms', '--box', '4'], 'box'),
])
def test_cli_bad_options_give_one_line_errors(tmp_path, capsys, argv, message):
    from cryopick_plugin.commands import main
    rc = main(['simulate', argv[0], '--out', str(tmp_path / 'o')] + argv[1:])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert message in err and len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / 'o') or not os.listdir(tmp_path / 'o')


def test_written_tomogram_round_trips(tmp_path):
    sim = simulate_tomogram(seed=0, **SMALL)
    paths = write_simulated_tomogram(sim, tmp_path)
    vol, voxel = mrc.open_volume(paths['tomogram'])
    np.testing.assert_array_equal(np.asarray(vol), sim.volume)
    back = star.read_coordinates(paths['truth'])
    np.testing.assert_allclose(star.xyz_array(back), star.xyz_array(sim.truth))
    np.testing.assert_allclose(back[list(star.ANGLES)].to_numpy(), sim.truth[list(star.ANGLES)].to_numpy(),
                               atol=1e-4)
