"""Evaluator: one-to-one matching, pick metrics with known answers, PR/AP, set comparison, clustering."""
import json
import time

import numpy as np
import pandas as pd
import pytest

from cryopick_plugin.commands import main as cli
from cryopick_plugin.engine import evaluate as ev
from cryopick_plugin.engine.io import star
from cryopick_plugin.engine.errors import InputError


def grid_truth(n=10, spacing=20.0, tomo='TS_01'):
    xyz = np.stack([np.arange(n) * spacing + 10, np.full(n, 30.0), np.full(n, 40.0)], axis=1)
    return star.coordinates_frame(xyz, tomo)


def shifted_picks(truth):
    """Known edit of the truth: 6 picks 1 voxel off, 2 picks 2 off, 1 pick 5 off, 1 deleted, 2 added."""
    xyz = star.xyz_array(truth).copy()
    xyz[:6, 0] += 1.0
    xyz[6:8, 1] += 2.0
    xyz[8, 2] += 5.0
    xyz = np.vstack([xyz[:9], [[500, 500, 500], [600, 10, 10]]])
    return star.coordinates_frame(xyz, truth[star.TOMO].iloc[0])


def test_truth_against_itself_is_perfect():
    truth = grid_truth()
    res = ev.evaluate_picks(truth, truth, radius=3)
    loc = res['localisation']
    assert (loc['tp'], loc['fp'], loc['fn']) == (10, 0, 0)
    assert loc['f1'] == 1.0 and loc['mean_distance'] == 0.0
    assert res['classification']['f1'] == 1.0


def test_known_shifts_deletions_and_additions():
    truth = grid_truth()
    picks = shifted_picks(truth)
    loc = ev.evaluate_picks(picks, truth, radius=3)['localisation']
    assert (loc['tp'], loc['fp'], loc['fn']) == (8, 3, 2)
    assert loc['precision'] == pytest.approx(8 / 11)
    assert loc['recall'] == pytest.approx(8 / 10)
    assert loc['f1'] == pytest.approx(2 * (8 / 11) * 0.8 / (8 / 11 + 0.8))
    assert loc['mean_distance'] == pytest.approx((6 * 1 + 2 * 2) / 8)
    # a wider radius takes the 5-voxel pick too
    wide = ev.evaluate_picks(picks, truth, radius=5.5)['localisation']
    assert (wide['tp'], wide['fp'], wide['fn']) == (9, 2, 1)
    assert wide['mean_distance'] == pytest.approx((6 + 4 + 5) / 9)


def test_matching_is_optimal_not_greedy():
    # Greedy nearest matching pairs pick 0 with truth 1 (0.5 away) and leaves pick 1 with nothing within
    # the radius; the optimal matching pairs 0-0 and 1-1 (1.5 each).
    truth = np.array([[0.0, 0, 0], [2.0, 0, 0]])
    pred = np.array([[1.5, 0, 0], [3.5, 0, 0]])
    pairs, dist = ev.match_points(pred, truth, radius=2.0)
    assert pairs.tolist() == [[0, 0], [1, 1]]
    np.testing.assert_allclose(dist, [1.5, 1.5])
    # one-to-one: two picks on the same particle give one match
    pairs, _ = ev.match_points(np.array([[0.0, 0, 0], [0.2, 0, 0]]), truth[:1], radius=1.0)
    assert len(pairs) == 1 and pairs[0].tolist() == [0, 0]


def test_dense_and_sparse_solvers_agree_and_scale():
    rng = np.random.default_rng(3)
    truth = rng.uniform(0, 300, size=(10000, 3))
    pred = np.vstack([truth + rng.normal(0, 2, truth.shape), rng.uniform(0, 300, size=(1000, 3))])
    start = time.perf_counter()
    p_dense, d_dense = ev.match_points(pred, truth, radius=5.0)
    elapsed = time.perf_counter() - start
    p_sparse, d_sparse = ev.match_points(pred, truth, radius=5.0, dense_limit=0)
    assert len(p_dense) == len(p_sparse)
    assert d_dense.sum() == pytest.approx(d_sparse.sum(), rel=1e-9)
    assert len(np.unique(p_dense[:, 0])) == len(p_dense) == len(np.unique(p_dense[:, 1]))
    assert np.all(d_dense <= 5.0)
    assert elapsed < 20


def test_per_class_classification_and_confusion():
    xyz = np.array([[10, 10, 10], [30, 10, 10], [50, 10, 10], [70, 10, 10]], dtype=float)
    truth = star.coordinates_frame(xyz, 'T', classes=[1, 1, 2, 2])
    picks = star.coordinates_frame(xyz + 0.5, 'T', classes=[1, 2, 2, 2])
    res = ev.evaluate_picks(picks, truth, radius=2)
    assert res['localisation']['tp'] == 4
    cls = res['classification']
    assert (cls['tp'], cls['fp'], cls['fn']) == (3, 1, 1)
    c1, c2 = res['per_class'][1], res['per_class'][2]
    assert (c1['tp'], c1['n_pred'], c1['n_true']) == (1, 1, 2)
    assert (c1['precision'], c1['recall']) == (1.0, 0.5)
    assert (c2['tp'], c2['n_pred'], c2['n_true']) == (2, 3, 2)
    assert c2['precision'] == pytest.approx(2 / 3) and c2['recall'] == 1.0
    assert res['confusion'] == {1: {1: 1, 2: 1}, 2: {2: 2}}


def test_average_precision_known_values():
    truth = grid_truth(n=4)
    xyz = star.xyz_array(truth)
    good = star.coordinates_frame(np.vstack([xyz, [[900, 9, 9], [800, 9, 9]]]), 'TS_01',
                                  scores=[0.9, 0.8, 0.7, 0.6, 0.2, 0.1])
    res = ev.evaluate_picks(good, truth, radius=2)
    assert res['average_precision'] == pytest.approx(1.0)
    assert res['best']['f1'] == 1.0 and res['best']['threshold'] == pytest.approx(0.6)
    assert res['pr_curve']['recall'][-1] == 1.0 and res['pr_curve']['precision'][-1] == pytest.approx(4 / 6)
    # a false pick ranked first: precision 0, 1/2, 2/3, 3/4, 4/5 at recall 0, .25, .5, .75, 1
    bad = star.coordinates_frame(np.vstack([[[900, 9, 9]], xyz]), 'TS_01', scores=[0.95, 0.9, 0.8, 0.7, 0.6])
    res = ev.evaluate_picks(bad, truth, radius=2)
    assert res['average_precision'] == pytest.approx(0.25 * (4 / 5) * 4)
    hung = ev.evaluate_picks(bad, truth, radius=2, pr_method='hungarian')
    assert hung['average_precision'] == pytest.approx(res['average_precision'])
    assert hung['pr_curve']['f1'][-1] == pytest.approx(hung['localisation']['f1'])


def test_same_coordinates_in_other_volumes_do_not_match():
    truth = grid_truth(tomo='TS_01')
    other = truth.copy()
    other[star.TOMO] = 'TS_02'
    loc = ev.evaluate_picks(other, truth, radius=3)['localisation']
    assert (loc['tp'], loc['fp'], loc['fn']) == (0, 10, 10)
    both = pd.concat([truth, other], ignore_index=True)
    loc = ev.evaluate_picks(both, pd.concat([other, truth], ignore_index=True), radius=3)['localisation']
    assert loc['tp'] == 20


def test_2d_micrographs_without_z():
    truth = star.coordinates_frame(np.array([[10.0, 20], [40, 50], [80, 20]]), 'mic1', micrograph=True)
    picks = star.coordinates_frame(np.array([[11.0, 20], [40, 58]]), 'mic1', micrograph=True)
    res = ev.evaluate_picks(picks, truth, radius=3)
    assert res['dims'] == 2 and res['volume_column'] == star.MIC
    assert (res['localisation']['tp'], res['localisation']['fp'], res['localisation']['fn']) == (1, 1, 2)


def test_compare_sets_splits_rows():
    truth = grid_truth()
    picks = shifted_picks(truth)
    inter, only_a, only_b, m = ev.compare_sets(picks, truth, radius=3)
    assert (len(inter), len(only_a), len(only_b)) == (8, 3, 2)
    assert m['jaccard'] == pytest.approx(8 / 13)
    np.testing.assert_allclose(np.sort(inter['matchDistance']), [1] * 6 + [2] * 2)
    # the rows left over in the truth are the deleted one and the one moved 5 voxels
    assert sorted(only_b[star.X].tolist()) == [170.0, 190.0]


def test_clustering_scores():
    true = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    permuted = np.array([7, 7, 7, 3, 3, 3, 5, 5])
    s = ev.clustering_scores(true, permuted)
    assert s['accuracy'] == 1.0 and s['v_measure'] == pytest.approx(1.0)
    assert s['adjusted_rand_index'] == pytest.approx(1.0)
    mapping, relabelled = ev.hungarian_align(true, permuted)
    assert mapping == {7: 0, 3: 1, 5: 2} and relabelled.tolist() == true.tolist()
    s = ev.clustering_scores([0, 0, 0, 1, 1, 1], [5, 5, 7, 7, 7, 7])
    assert s['accuracy'] == pytest.approx(5 / 6)
    assert s['homogeneity'] < 1 and s['completeness'] < 1
    # more clusters than classes: spare clusters get labels outside the reference, counted wrong
    s = ev.clustering_scores([1, 1, 2, 2], [1, 2, 3, 4])
    assert s['accuracy'] == 0.5 and s['homogeneity'] == pytest.approx(1.0)
    assert (s['n_true_classes'], s['n_pred_clusters']) == (2, 4)
    with pytest.raises(InputError):
        ev.clustering_scores([1, 2], [1])


def test_bad_radius_and_columns():
    truth = grid_truth()
    with pytest.raises(InputError):
        ev.evaluate_picks(truth, truth, radius=0)
    with pytest.raises(InputError):
        ev.evaluate_picks(truth.drop(columns=[star.Y]), truth, radius=2)


def test_command_line(tmp_path, capsys):
    truth = grid_truth()
    picks = shifted_picks(truth)
    picks[star.SCORE] = np.linspace(1, 0, len(picks))
    star.write_coordinates(tmp_path / 'truth.star', truth)
    star.write_coordinates(tmp_path / 'picks.star', picks)
    out = tmp_path / 'scores.json'
    rc = cli([ 'evaluate', str(tmp_path / 'picks.star'), str(tmp_path / 'truth.star'), '--diameter', '12',
               '--json', str(out), '--out-prefix', str(tmp_path / 'cmp')])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res['radius'] == 3.0  # D/4
    assert res['localisation']['tp'] == 8 and 0 < res['average_precision'] <= 1
    assert 'localisation' in capsys.readouterr().out
    assert len(star.read_coordinates(tmp_path / 'cmp_only_truth.star')) == 2
    assert len(star.read_coordinates(tmp_path / 'cmp_intersection.star')) == 8
    rc = cli(['evaluate', str(tmp_path / 'picks.star'), str(tmp_path / 'truth.star'), '--diameter', '12',
              '--radius-convention', 'full', '--json', str(out)])
    assert json.loads(out.read_text())['localisation']['tp'] == 9
    # clustering mode: same particles with permuted class numbers
    labelled = truth.copy()
    labelled[star.CLASS] = [1] * 5 + [2] * 5
    clustered = labelled.iloc[::-1].copy()
    clustered[star.CLASS] = 3 - clustered[star.CLASS]
    star.write_coordinates(tmp_path / 'l.star', labelled)
    star.write_coordinates(tmp_path / 'c.star', clustered)
    assert cli(['evaluate', str(tmp_path / 'c.star'), str(tmp_path / 'l.star'), '--clusters',
                '--json', str(out)]) == 0
    res = json.loads(out.read_text())
    assert res['accuracy'] == 1.0 and res['n_items'] == 10
    # bad input: one-line error, exit status 2
    assert cli(['evaluate', str(tmp_path / 'missing.star'), str(tmp_path / 'truth.star'), '--radius', '2']) == 2
    assert 'missing.star' in capsys.readouterr().err


def test_per_class_radius_follows_the_class_of_the_true_particle():
    truth = star.coordinates_frame([[10, 10, 10], [50, 10, 10], [90, 10, 10]], 'TS_01', classes=[1, 2, 2])
    picks = star.coordinates_frame([[13, 10, 10], [53, 10, 10], [90.5, 10, 10]], 'TS_01', classes=[1, 2, 2])
    picks[star.SCORE] = [0.9, 0.8, 0.7]
    # class 1 within 4, class 2 within 1: the pick 3 off the class-2 particle no longer counts
    res = ev.evaluate_picks(picks, truth, radius={1: 4.0, 2: 1.0})
    assert res['localisation']['tp'] == 2 and res['classification']['tp'] == 2
    assert res['per_class'][1]['tp'] == 1 and res['per_class'][2]['tp'] == 1
    assert res['best']['f1'] == pytest.approx(2 * 2 / 6)  # the ranking pass honours the same radii
    assert ev.evaluate_picks(picks, truth, radius=4.0)['localisation']['tp'] == 3
    assert ev.evaluate_picks(picks, truth, radius={2: 1.0, 'default': 4.0})['localisation']['tp'] == 2
    with pytest.raises(InputError, match='class'):
        ev.evaluate_picks(picks, truth, radius={1: 4.0})
    pairs, _ = ev.match_points([[0, 0], [10, 0]], [[2, 0], [12, 0]], [3.0, 1.0])
    assert pairs.tolist() == [[0, 0]]


def test_volume_names_are_compared_without_folder_and_extension():
    truth = grid_truth(tomo='TS_01')
    picks = shifted_picks(grid_truth(tomo='/data/tomos/TS_01.mrc'))
    assert ev.evaluate_picks(picks, truth, radius=3)['localisation']['tp'] == 8
    assert ev.volume_overlap(picks, truth)['common'] == ['TS_01']
    assert ev.volume_key('a/b/TS_01.rec.mrc') == 'TS_01' and ev.volume_key('Falcon_2012_06_12-15_07') \
        == 'Falcon_2012_06_12-15_07'


def _mic_frame(xy, classes=None):
    df = star.coordinates_frame(np.column_stack([np.asarray(xy, float), np.zeros(len(xy))]), classes=classes)
    return df.drop(columns=[star.Z] + ([] if classes is not None else [star.CLASS]))


def test_command_reads_folders_of_per_micrograph_files_with_the_2d_default(tmp_path, capsys, caplog):
    # Two micrographs with particles at the same places: matched across micrographs, a wrong pick in
    # micrograph b would pair with a's particle; per micrograph it must not.
    (tmp_path / 'picks').mkdir()
    (tmp_path / 'truth').mkdir()
    star.write_coordinates(tmp_path / 'truth' / 'mic_a.star', _mic_frame([[100, 100], [300, 100]]))
    star.write_coordinates(tmp_path / 'truth' / 'mic_b.star', _mic_frame([[500, 500]]))
    star.write_coordinates(tmp_path / 'picks' / 'mic_a_picks.star', _mic_frame([[120, 100], [300, 140]]))
    star.write_coordinates(tmp_path / 'picks' / 'mic_b_picks.star', _mic_frame([[300, 100], [500, 530]]))
    out = tmp_path / 's.json'
    assert cli(['evaluate', str(tmp_path / 'picks'), str(tmp_path / 'truth'), '--diameter', '100',
                '--json', str(out)]) == 0
    res = json.loads(out.read_text())
    # 2D default: half the diameter (50 px) — the picks 20, 40 and 30 px off count, mic_b's (300, 100) does not
    assert res['radius'] == 50.0 and 'D/2' in res['radius_used'] and '2D default' in res['radius_used']
    assert (res['localisation']['tp'], res['localisation']['fp'], res['localisation']['fn']) == (3, 1, 0)
    assert res['volume_column'] == star.MIC and len(res['picks']) == 2
    text = capsys.readouterr().out
    assert text.splitlines()[0].startswith('matching radius 50 pixels = D/2 (full convention, the 2D default)')
    # the truth has no rlnClassNumber: no classification row, none in the JSON
    assert not [line for line in text.splitlines() if line.startswith('classification')]
    assert 'no classification scores' in text and 'classification' not in res and 'per_class' not in res
    assert not res['warnings']
    # several pick files with --truth, and the strict convention on request
    assert cli(['evaluate', str(tmp_path / 'picks' / 'mic_a_picks.star'), str(tmp_path / 'picks' / 'mic_b_picks.star'),
                '--truth', str(tmp_path / 'truth' / '*.star'), '--diameter', '100', '--radius-convention', 'half',
                '--json', str(out)]) == 0
    res = json.loads(out.read_text())
    assert res['radius'] == 25.0 and res['localisation']['tp'] == 1  # only the pick 20 px off
    # three paths without --truth is ambiguous
    capsys.readouterr()
    assert cli(['evaluate', str(tmp_path / 'picks'), str(tmp_path / 'truth'), str(tmp_path / 'truth'),
                '--diameter', '100']) == 2
    assert '--truth' in capsys.readouterr().err


def test_command_warns_when_volume_names_do_not_overlap(tmp_path, caplog, capsys):
    truth = pd.concat([grid_truth(tomo='TS_01'), grid_truth(tomo='TS_02')], ignore_index=True)
    star.write_coordinates(tmp_path / 'truth.star', truth)
    star.write_coordinates(tmp_path / 'other.star', grid_truth(tomo='tomo1'))
    star.write_coordinates(tmp_path / 'part.star', grid_truth(tomo='TS_01.mrc'))
    with caplog.at_level('WARNING'):
        assert cli(['evaluate', str(tmp_path / 'other.star'), str(tmp_path / 'truth.star'), '--radius', '2']) == 0
    assert any('no tomogram name is shared' in r.getMessage() and 'tomo1' in r.getMessage() for r in caplog.records)
    caplog.clear()
    capsys.readouterr()
    with caplog.at_level('WARNING'):
        assert cli(['evaluate', str(tmp_path / 'part.star'), str(tmp_path / 'truth.star'), '--radius', '2',
                    '--radius-per-class', '1:3']) == 0
    messages = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
    assert len(messages) == 1 and 'TS_02' in messages[0] and 'missed' in messages[0]
    out = capsys.readouterr().out
    # the truth has classes here: classification is reported; radius per class in the first line
    assert 'classification' in out and 'class 1: 3' in out.splitlines()[0]
