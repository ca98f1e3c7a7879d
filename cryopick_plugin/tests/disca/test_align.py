"""DISCA's alignment refinement (`engine.disca.align`): wedge-compensated averages, references grown from
blobs by alignment, the held-out split test, and `cryopick disca`, which refines by alignment by default."""
import json

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from cryopick_plugin.engine import geometry
from cryopick_plugin.engine.disca import align
from cryopick_plugin.engine.sim.subtomograms import simulate_subtomograms


def _cc(a, b):
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def _through_wedge(volume, tilt):
    w = align.wedge_filter(volume.shape[-1], tilt)
    return np.real(np.fft.ifftn(np.fft.fftn(volume) * w)).astype(np.float32)


@pytest.fixture(scope='module')
def two_molecules():
    """Two small synthetic molecules (two lobes; a rod), 32 each, ±60° wedge, moderate noise."""
    return simulate_subtomograms(classes=['two_lobe', 'rod'], n_per_class=32, box=24, snr=1.0, tilt_range=60.0,
                                 seed=5, synthetic=True)


def test_wedge_compensated_average_restores_what_each_view_misses():
    """Ten copies of one asymmetric shape at known orientations, each missing a ±30° wedge: turned back and
    divided by their turned-back wedges they give the shape again; a plain aligned average keeps the
    wedges' blur."""
    box = 21
    z, y, x = np.indices((box,) * 3).astype(float) - box // 2
    shape = (((x - 3) / 5.0) ** 2 + (y / 2.5) ** 2 + (z / 2.5) ** 2 <= 1) | ((x + 4) ** 2 + (y - 3) ** 2 + z ** 2 <= 9)
    shape = shape.astype(np.float32)
    mats = np.stack([geometry.euler_to_matrix(*e) for e in geometry.random_eulers(10, np.random.default_rng(1))])
    stack = np.stack([_through_wedge(geometry.rotate_volume(shape, a.T), 30.0) for a in mats])
    compensated = align.aligned_averages(stack, np.zeros(len(stack), int), mats, tilt_range=30.0)[0]
    plain = align.aligned_averages(stack, np.zeros(len(stack), int), mats, tilt_range=None)[0]
    assert _cc(compensated, shape) > 0.85
    assert _cc(compensated, shape) > _cc(plain, shape) + 0.04
    # no wedge known, or one to be ignored (0): nothing is missing
    assert align.wedge_filter(9, None).min() == align.wedge_filter(9, 0).min() == 1.0
    assert 0.3 < align.wedge_filter(9, 30.0).mean() < 0.5


def test_references_grow_from_blobs_and_members_keep_their_classes(two_molecules):
    """From random orientations (every reference a blob) the annealed alignment finds each molecule: its
    reference correlates with the true shape turned to the best orientation, and with its members
    free to move, each class keeps its own molecule."""
    sim = two_molecules
    data = align.prepare(sim.stack, 16)
    assert data.shape[1:] == (17, 17, 17)
    res = align.refine(data, sim.labels, tilt_range=60.0, n_rotations=300, fixed_iterations=6, free_iterations=2,
                       anneal=10.0, top=5, lowpass_start=0.5, seed=0)
    assert np.mean(res['labels'] == sim.labels) > 0.95
    logliks = [row['loglik'] for row in res['history']]
    assert logliks[5] > logliks[0]                       # the fixed phase sharpened the references
    # Each reference is its molecule, turned: against the true shape (the clean subtomograms turned back
    # by their true orientations), the best turn of the grown reference correlates far better than the
    # blob it grew from.
    clean = align.prepare(simulate_subtomograms(classes=['two_lobe', 'rod'], n_per_class=32, box=24, snr=1.0,
                                                tilt_range=90.0, seed=5, synthetic=True, keep_clean=True).clean, 16)
    grid = align.rotation_grid(1500, seed=1)
    blobs = align.Refinement(data, tilt_range=60.0).maximisation_mats(
        np.eye(2)[sim.labels], np.broadcast_to(Rotation.random(len(data), random_state=0).as_matrix()[:, None],
                                               (len(data), 2, 3, 3)))
    for k in (0, 1):
        members = np.flatnonzero(sim.labels == k)
        truth = np.mean([geometry.reference_from_particle(clean[i], *sim.eulers[i]) for i in members], axis=0)

        def best_cc(ref):
            return max(_cc(geometry.particle_from_reference(ref, *e) * align.soft_sphere(17), truth * align.soft_sphere(17))
                       for e in grid)
        grown, blob = best_cc(res['references'][k]), best_cc(blobs[k])
        assert grown > 0.8 and grown > blob + 0.1, (k, grown, blob)


def test_split_test_finds_two_molecules_and_keeps_one_whole(two_molecules):
    """Two references made from half of a cluster explain its other half better than one only when the
    cluster holds two molecules; one molecule in all its orientations to the wedge stays whole."""
    sim = two_molecules
    data = align.prepare(sim.stack, 16)
    base = align.refine(data, np.zeros(len(data), int), tilt_range=60.0, n_rotations=300, fixed_iterations=4,
                        free_iterations=0, anneal=10.0, top=5, lowpass_start=0.5, seed=0)
    both = np.arange(len(data))
    mixed = align.split_test(data, both, base['orientations'][:, 0], tilt_range=60.0, n_rotations=300,
                             tau2=base['tau2'], seed=0, ab_initio_iterations=4, iterations=3)
    assert align.split_accepted(mixed) and mixed['cv_z'] > 2 * align.SPLIT_MIN_Z
    for molecule in (0, 1):
        _one_molecule_stays_whole(data, np.flatnonzero(sim.labels == molecule))


def _one_molecule_stays_whole(data, lobes):
    one = align.refine(data[lobes], np.zeros(len(lobes), int), tilt_range=60.0, n_rotations=300,
                       fixed_iterations=4, free_iterations=0, anneal=10.0, top=5, lowpass_start=0.5, seed=0)
    single = align.split_test(data[lobes], np.arange(len(lobes)), one['orientations'][:, 0], tilt_range=60.0,
                              n_rotations=300, tau2=one['tau2'], seed=0, ab_initio_iterations=4, iterations=3)
    assert not align.split_accepted(single) and single['cv_z'] < align.SPLIT_MIN_Z - 1, single['cv_z']


def test_disca_command_with_alignment_refinement(tmp_path, two_molecules):
    from cryopick_plugin.commands import main
    from cryopick_plugin.engine.io.star import read_star_blocks
    from cryopick_plugin.tests.disca.test_disca import _write_star
    sim = two_molecules
    star = _write_star(tmp_path, sim.stack, cpTiltAngleMin=-60.0, cpTiltAngleMax=60.0)
    out = tmp_path / 'run'
    # The network made to keep both molecules in one cluster (K = 1): the alignment refinement, on by
    # default, finds two.
    assert main(['disca', str(star), '--out', str(out), '--max-iter', '1', '--k-min', '1', '--k-max', '1',
                 '--device', 'cpu', '--no-split-check', '--align-orientations', '300']) == 0
    table = next(iter(read_star_blocks(out / 'labels.star').values()))
    history = json.loads((out / 'history.json').read_text())
    k = history['k']
    assert int(table['rlnClassNumber'].max()) == k and table['rlnClassNumber'].min() == 1
    assert ((table['rlnAutopickFigureOfMerit'] > 0) & (table['rlnAutopickFigureOfMerit'] <= 1)).all()
    record = history['alignment']
    assert record['k_before'] == history['network_k'] and record['tilt_range'] == 60.0
    assert record['k_before'] == 1 and [t['accepted'] for t in record['tests']] == [True] and k == 2
    found = table['rlnClassNumber'].to_numpy() - 1
    assert max(np.mean(found == sim.labels), np.mean(found != sim.labels)) > 0.9
    assert [a['aligned'] for a in history['class_averages']] == [True] * k
    assert sum(a['size'] for a in history['class_averages']) == len(sim.stack)
    # the saved model predicts the refinement's classes, not the network's single cluster
    assert main(['disca-predict', str(star), '--model', str(out / 'disca_model.pt'),
                 '--out', str(tmp_path / 'predicted.star')]) == 0
    predicted = next(iter(read_star_blocks(tmp_path / 'predicted.star').values()))
    assert np.mean(predicted['rlnClassNumber'].to_numpy() == table['rlnClassNumber'].to_numpy()) > 0.95


def test_disca_command_refuses_a_tiny_orientation_grid(tmp_path, capsys, two_molecules):
    from cryopick_plugin.commands import main
    from cryopick_plugin.tests.disca.test_disca import _write_star
    star = _write_star(tmp_path, two_molecules.stack[:20])
    assert main(['disca', str(star), '--out', str(tmp_path / 'o'), '--align-refine',
                 '--align-orientations', '10']) != 0
    err = capsys.readouterr().err
    assert '--align-orientations' in err and 'at least 50' in err
    assert not (tmp_path / 'o').exists()


def _blobs(box, matrix=np.eye(3)):
    """Four Gaussian blobs (an asymmetric shape) evaluated exactly after the turn out(p) = shape(matrix·p)
    about the centre voxel: the ground truth a turned volume is compared with."""
    z, y, x = np.indices((box,) * 3) - box // 2
    q = np.stack([x, y, z], axis=-1).astype(float) @ np.asarray(matrix).T
    centres = np.array([[3, 0, 0], [-2, 3, 1], [0, -3, -3], [1, 1, 4]], float)
    return sum(np.exp(-((q - c) ** 2).sum(axis=-1) / (2 * 1.3 ** 2)) for c in centres).astype(np.float32)


def test_fourier_scoring_and_averaging_match_the_exact_turn(monkeypatch):
    """Scores are taken in Fourier space (a reference turned by A is its oversampled spectrum sampled at
    Aᵀk): for a shape whose every turn is known exactly, the score of a subtomogram — the shape at
    orientation A through the wedge — against the reference turned by A equals ⟨x, W·(exact turn)⟩ −
    ‖W·(exact turn)‖²/2 to within 1 %, wrong orientations score lower, and the Fourier-space turned-back
    average of such subtomograms is the shape again."""
    box, tilt = 17, 40.0
    shape = _blobs(box)
    mats = np.stack([geometry.euler_to_matrix(*e) for e in geometry.random_eulers(12, np.random.default_rng(3))])
    wedge = align.wedge_filter(box, tilt)
    exact = np.stack([_blobs(box, a.T) for a in mats])              # the shape turned by A, exactly
    x = np.real(np.fft.ifftn(np.fft.fftn(exact, axes=(1, 2, 3)) * wedge, axes=(1, 2, 3))).astype(np.float32)
    ref = align.Refinement(x, tilt_range=tilt, n_rotations=50)
    projected = ref.project(shape, mats)
    score = np.einsum('ij,ij->i', ref.feat, projected) - 0.5 * ref.norms(projected)
    truth = 0.5 * np.square(x.reshape(len(x), -1)).sum(axis=1)    # ⟨x, Wm⟩ − ‖Wm‖²/2 with x = Wm
    assert np.allclose(score, truth, rtol=0.01), (score, truth)
    wrong = ref.loglik_rows(np.arange(len(x)), ref.project(shape, mats[::-1]))
    assert (wrong < ref.loglik_rows(np.arange(len(x)), projected)).all()
    # the grid's sparse operator turns references exactly as `project` does
    both = ref.project_grid([shape, 2 * shape])
    assert np.allclose(both[1], 2 * both[0], atol=1e-4)
    assert np.allclose(both[0][:5], ref.project(shape, ref.grid_mats[:5]), atol=1e-4)
    average = ref.turned_back(np.arange(len(x)), mats, np.ones(len(x)), ref.band)
    assert _cc(average, shape * ref.mask) > 0.97
    # too many subtomograms to keep their oversampled spectra: made again for each use, same average
    monkeypatch.setattr(align, 'PADDED_CACHE_BYTES', 0)
    uncached = align.Refinement(x, tilt_range=tilt, n_rotations=50)
    assert np.allclose(uncached.turned_back(np.arange(len(x)), mats, np.ones(len(x)), ref.band), average, atol=1e-5)
    assert getattr(uncached, '_padded', None) is None
