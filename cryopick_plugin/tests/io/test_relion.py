"""RELION 3.1 interoperability, checked with the real binaries (Debian's `relion`, 3.1.3).

3D: subtomograms cut by cryopick at the truth positions of a simulated tomogram, written as a RELION 3.1
particles STAR with the truth angles and averaged by `relion_reconstruct --3d_rot`, must give the
template back (40 Å), clearly better than averages at random positions or with the y axis flipped.
2D: RELION's own extraction (`relion_preprocess --extract`) at our coordinates must equal cryopick's
crops, pixel for pixel, and a y-flipped crop must not match. A flip, an off-by-one or a half-box shift on
either side fails these tests.
"""
import os
import shutil

import numpy as np
import pytest

from cryopick_plugin.engine.disca import extract
from cryopick_plugin.engine import geometry
from cryopick_plugin.engine.io import relion, star
from cryopick_plugin.engine.errors import InputError
from cryopick_plugin.engine.io.mrc import write_mrc
from cryopick_plugin.engine.sim.templates import load_templates

LOWPASS_A = 40.0


@pytest.fixture(autouse=True)
def _need_relion():
    if shutil.which('relion_reconstruct') is None or shutil.which('relion_preprocess') is None:
        if os.environ.get('CI') == 'true':
            pytest.fail('relion not installed (apt-get install relion): required under CI')
        pytest.skip('relion not installed (apt-get install relion)')


def _cc40(a, b, voxel_size):
    return relion.normalised_cc(relion.lowpass(a, voxel_size, LOWPASS_A), relion.lowpass(b, voxel_size, LOWPASS_A))


# ------------------------------------------------------------------------------------------------ 3D
BOX = 24
TEMPLATE = '2cg9'  # Hsp90-Sba1: elongated, only C2, so a wrong orientation shows at 40 Å


@pytest.fixture(scope='module')
def simulated(templates_dir):
    from cryopick_plugin.engine.sim.tomograms import simulate_tomogram
    sim = simulate_tomogram(shape=(56, 96, 96), classes=(TEMPLATE,), n_per_class=30, snr=0.5, seed=3,
                            templates_dir=templates_dir)
    reference = relion.centre_in_box(load_templates([sim.class_names[0]], folder=templates_dir,
                                                    voxel_size=sim.voxel_size)[sim.class_names[0]], BOX)
    return sim, reference


def _relion_average(sim, table, folder):
    """Extract with cryopick, average with relion_reconstruct --3d_rot; return (map, particles used)."""
    stack, kept, _ = extract.extract_subtomograms(sim.volume, star.xyz_array(table), BOX, invert=True)
    rows = table.iloc[kept].reset_index(drop=True)
    sub_star = extract.write_subtomograms(folder, stack, rows, sim.voxel_size)
    _, listed, _ = extract.read_subtomograms(sub_star)
    images = [os.path.join(folder, name) for name in listed[extract.IMAGE]]
    r31 = relion.write_relion31_subtomo_star(os.path.join(folder, 'relion31.star'), images, rows, sim.voxel_size)
    volume, voxel = relion.run_relion_reconstruct(r31, os.path.join(folder, 'average.mrc'), box=BOX)
    assert voxel == pytest.approx(sim.voxel_size)
    return volume, len(rows)


def test_relion31_star_layout(simulated, tmp_path):
    sim, _ = simulated
    table = sim.truth.iloc[:3].reset_index(drop=True)
    images = []
    for i in range(3):
        images.append(str(tmp_path / f'sub_{i}.mrc'))
        write_mrc(images[-1], np.random.default_rng(i).normal(size=(BOX,) * 3).astype(np.float32), 10.0)
    path = relion.write_relion31_subtomo_star(tmp_path / 'p.star', images, table, 10.0)
    text = open(path).read()
    assert text.startswith('# version 30001')
    blocks = star.read_star_blocks(path)
    optics, parts = blocks['optics'], blocks['particles']
    assert optics['rlnImageDimensionality'].tolist() == [3] and optics['rlnImageSize'].tolist() == [BOX]
    assert optics['rlnImagePixelSize'].tolist() == [10.0]
    assert parts['rlnImageName'].tolist() == [f'sub_{i}.mrc' for i in range(3)]  # relative to the STAR
    assert parts[star.MIC].tolist() == [sim.name] * 3
    np.testing.assert_allclose(parts[list(star.ANGLES)].to_numpy(), table[list(star.ANGLES)].to_numpy(), atol=1e-5)
    np.testing.assert_allclose(star.xyz_array(parts), star.xyz_array(table), atol=1e-5)
    # Mismatches are refused before anything is written.
    with pytest.raises(InputError, match='2 subtomogram files for 3 table rows'):
        relion.write_relion31_subtomo_star(tmp_path / 'q.star', images[:2], table, 10.0)
    write_mrc(str(tmp_path / 'odd.mrc'), np.zeros((BOX, BOX, BOX + 2), np.float32) + 1, 10.0)
    with pytest.raises(InputError, match='not a cubic'):
        relion.write_relion31_subtomo_star(tmp_path / 'q.star', images[:2] + [str(tmp_path / 'odd.mrc')], table, 10.0)
    assert not (tmp_path / 'q.star').exists()


def test_reconstruct_rotation_convention(tmp_path, templates_dir):
    """Pins RELION's meaning of the angles: particle(x) = reference(Aᵀ x), independent of any simulator."""
    # Sse1p-Hsp70 (3d2f), or the chiral synthetic L where the checkout has no maps: no symmetry and a
    # marked shape, so a reversed rotation cannot look right.
    name = '3d2f' if templates_dir else 'l_shape'
    reference = relion.centre_in_box(load_templates([name], folder=templates_dir or False)[name], 32)
    angles = geometry.random_eulers(12, np.random.default_rng(0))
    cc = {}
    for mode in ('AT', 'A'):
        images = []
        for i, a in enumerate(angles):
            a_mat = geometry.euler_to_matrix(*a)
            images.append(str(tmp_path / f'{mode}_{i}.mrc'))
            write_mrc(images[-1], geometry.rotate_volume(reference, a_mat.T if mode == 'AT' else a_mat), 10.0)
        table = star.coordinates_frame(np.full((len(angles), 3), 50.0), 'tomo', angles=angles)
        path = relion.write_relion31_subtomo_star(tmp_path / f'{mode}.star', images, table, 10.0)
        average, _ = relion.run_relion_reconstruct(path, tmp_path / f'{mode}.mrc', box=32)
        cc[mode] = relion.normalised_cc(average, reference)
    print(f"relion_reconstruct --3d_rot, CC with the reference: particles rotated by A^T {cc['AT']:.3f}, by A {cc['A']:.3f}")
    assert cc['AT'] > 0.9, cc
    assert cc['AT'] > cc['A'] + 0.1, cc


def test_subtomogram_average_matches_template(simulated, tmp_path):
    sim, reference = simulated
    truth = sim.truth
    average, n_used = _relion_average(sim, truth, tmp_path / 'truth')
    assert n_used >= 10
    cc_truth = _cc40(average, reference, sim.voxel_size)

    rng = np.random.default_rng(7)
    random_rows = truth.copy()
    nz, ny, nx = sim.volume.shape
    for col, n in ((star.X, nx), (star.Y, ny), (star.Z, nz)):
        random_rows[col] = rng.uniform(BOX / 2, n - BOX / 2, len(truth))
    cc_random = _cc40(_relion_average(sim, random_rows, tmp_path / 'random')[0], reference, sim.voxel_size)

    flipped = truth.copy()
    flipped[star.Y] = ny - 1 - flipped[star.Y]  # the classic row-order mistake
    cc_flipped = _cc40(_relion_average(sim, flipped, tmp_path / 'flipped')[0], reference, sim.voxel_size)

    print(f"CC at {LOWPASS_A:g} Å with the template: truth {cc_truth:.3f} ({n_used} subtomograms), "
          f"random positions {cc_random:.3f}, y flipped {cc_flipped:.3f}")
    assert cc_truth > 0.5
    assert cc_truth > cc_random + 0.3
    assert cc_truth > cc_flipped + 0.3


def test_reconstruct_errors_carry_relion_message(tmp_path):
    bad = tmp_path / 'bad.star'
    bad.write_text('data_particles\n\nloop_\n_rlnImageName #1\nmissing.mrc\n')
    with pytest.raises(relion.RelionError) as err:
        relion.run_relion_reconstruct(bad, tmp_path / 'out.mrc')
    assert 'relion_reconstruct failed' in str(err.value)
    assert len(str(err.value).splitlines()[0]) > len('relion_reconstruct failed (exit status 1): ')
    assert not (tmp_path / 'out.mrc').exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith('.out.mrc')] == []
    with pytest.raises(InputError, match='must end in .mrc'):
        relion.run_relion_reconstruct(bad, tmp_path / 'out.map')


# ------------------------------------------------------------------------------------------------ 2D
PBOX = 32


def _micrograph(seed=0):
    """A simulated micrograph when the simulator is there, else blobs on noise; (image, picks table)."""
    try:
        from cryopick_plugin.engine.sim.micrographs import simulate_micrograph
    except ImportError:
        simulate_micrograph = None
    if simulate_micrograph is not None:
        sim = simulate_micrograph(shape=(192, 256), template='1bxn', n_particles=12, snr=1.0, seed=seed,
                                  name='mic_a', carbon_edge=False, contamination=False)
        return sim.image, sim.truth
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(192, 256)).astype(np.float32)
    xy = rng.uniform(PBOX, [256 - PBOX, 192 - PBOX], size=(12, 2)).round()
    yy, xx = np.mgrid[:192, :256]
    for x, y in xy:
        image -= 3 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 30.0)
    return image, star.coordinates_frame(xy, 'mic_a', micrograph=True)


def test_relion_preprocess_equals_our_crops(tmp_path):
    image, truth = _micrograph()
    ny, nx = image.shape
    xy = star.xyz_array(truth)
    keep = np.all((xy >= PBOX // 2 + 1) & (xy <= np.array([nx, ny]) - PBOX // 2 - 2), axis=1)
    picks = truth[keep].reset_index(drop=True)
    assert len(picks) >= 5
    # Sub-pixel picks as a picker writes them (RELION truncates, cryopick rounds: the writer reconciles).
    picks[star.X] += np.resize([0.0, 0.5, 0.7, -0.3, 0.2], len(picks))
    picks[star.Y] += np.resize([0.4, -0.5, 0.0, 0.6, -0.2], len(picks))
    picks[star.MIC] = 'mic_a.mrc'
    os.makedirs(tmp_path / 'mics')
    mic_path = str(tmp_path / 'mics' / 'mic_a.mrc')
    write_mrc(mic_path, image, 10.0)
    files = relion.write_relion_coordinate_stars(tmp_path / 'relion', picks, 'cryopick', micrograph_paths=[mic_path])
    assert os.path.basename(files['coordinates']['mic_a.mrc']) == 'mic_a_cryopick.star'
    assert files['coord_suffix'] == '_cryopick.star'

    ours = relion.crop_particles_2d(image, star.xyz_array(picks), PBOX)
    stack, parts = relion.run_relion_preprocess(files, PBOX)
    assert stack.shape == (len(picks), PBOX, PBOX)
    # RELION keeps the coordinate order of the file; it lists the micrograph by its linked name.
    assert parts[star.MIC].tolist() == ['mic_a.mrc'] * len(picks)
    np.testing.assert_allclose(star.xyz_array(parts), np.floor(star.xyz_array(picks) + 0.5))
    ccs = [relion.normalised_cc(a, b) for a, b in zip(stack, ours)]
    assert min(ccs) >= 0.99, ccs
    np.testing.assert_allclose(stack, ours, atol=1e-5)  # raw extraction: the very same pixels
    # Our crops follow cryopick's own 3D centring rule (extract.box_centres) in 2D.
    centres = extract.box_centres(np.c_[star.xyz_array(picks), np.zeros(len(picks))])[:, 1:][:, ::-1]
    np.testing.assert_array_equal(centres, np.floor(star.xyz_array(picks) + 0.5).astype(int))

    # A y flip (row order) or a one-pixel shift must not pass the check.
    flipped = relion.crop_particles_2d(image[::-1], star.xyz_array(picks), PBOX)
    assert max(relion.normalised_cc(a, b) for a, b in zip(stack, flipped)) < 0.99
    shifted = relion.crop_particles_2d(image, star.xyz_array(picks) + [1, 0], PBOX)
    assert max(relion.normalised_cc(a, b) for a, b in zip(stack, shifted)) < 0.99

    # RELION's normalisation (--norm --no_ramp) is an affine change of each particle: CC stays 1.
    normed, _ = relion.run_relion_preprocess(files, PBOX, norm=True, no_ramp=True, part_dir='Norm',
                                             part_star='normed.star')
    assert min(relion.normalised_cc(a, b) for a, b in zip(normed, ours)) >= 0.999
    assert abs(float(np.mean([p.mean() for p in normed]))) < 0.5


def test_coordinate_star_errors(tmp_path):
    image = np.random.default_rng(1).normal(size=(64, 80)).astype(np.float32)
    mic = str(tmp_path / 'm.mrc')
    write_mrc(mic, image, 5.0)
    table = star.coordinates_frame([[10, 10], [85, 10]], 'm', micrograph=True)
    with pytest.raises(InputError, match='outside'):
        relion.write_relion_coordinate_stars(tmp_path / 'r', table, 'x', micrograph_paths=[mic])
    table = star.coordinates_frame([[10, 10]], 'other', micrograph=True)
    with pytest.raises(InputError, match='other: micrograph file not found'):
        relion.write_relion_coordinate_stars(tmp_path / 'r', table, 'x', micrograph_paths=[mic])
    table = star.coordinates_frame([[20, 20]], 'm', micrograph=True)
    files = relion.write_relion_coordinate_stars(tmp_path / 'r', table, 'x', micrograph_paths=[mic])
    with pytest.raises(InputError, match='even box sizes only'):
        relion.run_relion_preprocess(files, 15)
    # A micrograph with a single pick gives a one-image stack, which reads as a 2D MRC.
    one, _ = relion.run_relion_preprocess(files, 16)
    np.testing.assert_array_equal(one, relion.crop_particles_2d(image, [[20, 20]], 16))
    with pytest.raises(InputError, match='leave'):
        relion.crop_particles_2d(image, [[2, 30]], 16)
