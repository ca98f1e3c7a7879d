"""Training the 3D picker: a tiny end-to-end run that must pick well (and beat DoG), files written, bad input."""
import argparse
import csv
import json

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from cryopick_plugin.commands import train3d as train3d_cmd
from cryopick_plugin.engine.disca import dog
from cryopick_plugin.engine.pick3d import labels, picking as pick3d, training as train3d
from cryopick_plugin.engine.io import model_io, mrc, star
from cryopick_plugin.engine.errors import InputError

SHAPE = (40, 64, 64)


def synthetic_tomogram(seed, shape=SHAPE, n_target=14, n_decoy=12, r_target=4, r_decoy=6, noise=0.5):
    """Dark balls of radius 4 (the particles) among larger dark balls of radius 6 (decoys) in Gaussian noise.

    Returns (volume, table of the particles only). A blob detector tuned to the particle size also fires
    on the decoys; a trained network can tell the sizes apart.
    """
    rng = np.random.default_rng(seed)
    placed, radii = [], []

    def place(r, n):
        out = []
        for _ in range(3000):
            if len(out) == n:
                break
            p = np.array([rng.integers(r + 1, s - r - 1) for s in shape])
            if all(np.linalg.norm(p - q) >= r + rq + 3 for q, rq in zip(placed, radii)):
                placed.append(p)
                radii.append(r)
                out.append(p)
        return np.array(out)

    targets = place(r_target, n_target)
    place(r_decoy, n_decoy)
    zz, yy, xx = np.indices(shape)
    vol = np.zeros(shape, np.float32)
    for p, r in zip(placed, radii):
        vol[(zz - p[0]) ** 2 + (yy - p[1]) ** 2 + (xx - p[2]) ** 2 <= r * r] = -1
    vol = gaussian_filter(vol, 1.0) + rng.normal(0, noise, shape)
    return vol.astype(np.float32), star.coordinates_frame(targets[:, ::-1].astype(float), f'tomo{seed}')


def write_item(folder, seed, diameter=5, voxel=10.0, **kw):
    vol, table = synthetic_tomogram(seed, **kw)
    tomo, lab = folder / f'tomo{seed}.mrc', folder / f'tomo{seed}_labels.mrc'
    mrc.write_mrc(tomo, vol, voxel)
    labels.write_label_map(lab, vol.shape, table, diameter, 'tball', voxel)
    return str(tomo), str(lab), table


@pytest.fixture
def one_thread():
    # two threads on a shared two-core machine spin against each other; one is faster and reproducible
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_match_points_and_scores():
    truth = np.array([[0, 0, 0], [10, 0, 0], [20, 0, 0]], float)
    pred = np.array([[1, 0, 0], [10.5, 0, 0], [11, 0, 0], [40, 0, 0]], float)
    pairs, dist = train3d.match_points(pred, truth, 2.0)
    assert sorted(map(tuple, pairs)) == [(0, 0), (1, 1)]   # one-to-one: pred 2 cannot reuse truth 1
    s = train3d.pick_scores(pred, truth, 2.0, alpha=3)
    assert s['precision'] == pytest.approx(0.5) and s['recall'] == pytest.approx(2 / 3)
    r3 = (2 / 3) ** 3
    assert s['score'] == pytest.approx(0.5 * r3 / (0.5 + r3))
    assert train3d.pick_scores(np.zeros((0, 3)), truth, 2.0)['f1'] == 0


def test_tiny_training_picks_well_and_beats_dog(tmp_path, one_thread, precision):
    # 96 steps on 24³ patches at a high learning rate: the network learns to tell the particles from the
    # larger decoys (F1 1.0) from every seed tried (0, 1, 2, 4, 5, 6; fp32 and bf16; fp32 with the CPU limited
    # to AVX2). Half as many steps on 32³ patches at 3e-3 did so from half of the seeds only, stopping at
    # F1 0.70 (every blob picked) or lower from the others: arithmetic differences between CPUs could
    # have moved this test from one outcome to the other.
    train_item, val_item, test_item = (write_item(tmp_path, s) for s in (1, 2, 3))
    out = tmp_path / 'deepet.pt'
    records = []
    meta = train3d.train([train_item], [val_item], out, preset='cpu', epochs=12, patch=24, pad=4,
                         widths=(4, 8, 12), batch_size=2, lr=1e-2, val_every=2, patience=6, device='cpu',
                         seed=0, log=records.append, precision=precision)
    # files: model + JSON description + learning curve
    arch, state, saved = model_io.load_model(out, 'deepetpicker')
    assert saved['diameters'] == {'1': 5} and saved['voxel_size'] == pytest.approx(10.0)
    assert saved['patch'] == 24 and saved['pad_infer'] == 4 and saved['label_kind'] == 'tball'
    assert saved['precision'] == precision
    assert set(saved['thresholds']) >= {'t_seg', 't_lm', 't_dist', 'kernel', 'iterations'}
    assert saved['epochs_run'] == 12 and 1 <= saved['best_epoch'] <= 12
    assert json.load(open(str(out) + '.json'))['meta']['best_epoch'] == saved['best_epoch']
    rows = list(csv.DictReader(open(str(out) + '.history.csv')))
    assert [int(r['epoch']) for r in rows] == list(range(1, 13))
    assert float(rows[-1]['train_loss']) < float(rows[0]['train_loss'])
    assert sum(1 for r in rows if r['val_f1']) == 6
    assert meta['best_epoch'] == saved['best_epoch'] and any('tuned_f1' in r for r in records)

    picks = pick3d.pick(test_item[0], out, device='cpu', precision=precision)
    truth = star.xyz_array(test_item[2])
    net = train3d.pick_scores(star.xyz_array(picks), truth, 3.0)
    assert net['f1'] >= 0.8, net

    # DoG baseline with its threshold chosen on the validation tomogram, like the network's thresholds
    # (F1 0.40: it prefers the larger decoys; picking every blob would give 0.70)
    val_vol = np.asarray(mrc.open_volume(val_item[0])[0])
    threshold = dog.choose_threshold(dog.dog_pick(val_vol, 9, 'dark'), val_item[2], 3.0)
    test_vol = np.asarray(mrc.open_volume(test_item[0])[0])
    base = train3d.pick_scores(star.xyz_array(dog.dog_pick(test_vol, 9, 'dark', threshold=threshold)), truth, 3.0)
    assert net['f1'] > base['f1'] + 0.1, (net, base)

    # thresholds chosen again on the validation tomogram, into a new file; the original is untouched
    retuned = tmp_path / 'retuned.pt'
    new = train3d.retune(out, [val_item], retuned)
    assert new['retuned_on'] == ['tomo2'] and new['thresholds']['t_dist'] is None
    assert new['thresholds']['t_seg'] in train3d.T_SEG_GRID and new['thresholds']['t_lm'] in train3d.T_LM_GRID
    assert model_io.load_model(retuned, 'deepetpicker')[2]['thresholds'] == new['thresholds']
    assert model_io.load_model(out, 'deepetpicker')[2]['thresholds'] == saved['thresholds']
    again = train3d.pick_scores(star.xyz_array(pick3d.pick(test_item[0], retuned, device='cpu', precision=precision)),
                                truth, 3.0)
    assert again['f1'] >= 0.8, again


def _run(argv):
    parser = argparse.ArgumentParser()
    train3d_cmd.add_args(parser)
    return train3d_cmd.main(parser.parse_args([str(a) for a in argv]))


def test_command_holds_out_part_of_the_tomogram_without_validation(tmp_path, one_thread, precision):
    tomo, lab, table = write_item(tmp_path, 4, shape=(24, 40, 32), n_target=8, n_decoy=0)
    coords = tmp_path / 'c.star'
    star.write_coordinates(coords, table)
    out = tmp_path / 'm.pt'
    assert _run(['--train', f'{tomo}:{lab}:{coords}', '--out', out, '--epochs', 1, '--patch', 16, '--pad', 3,
                 '--no-tune', '--device', 'cpu', '--precision', precision]) == 0
    _, _, meta = model_io.load_model(out, 'deepetpicker')
    assert meta['val_tomograms'] == ['tomo4'] and meta['preset'] == 'cpu' and meta['precision'] == precision
    assert meta['diameters'] == {'1': 5}            # measured on the label map
    assert meta['thresholds']['t_seg'] == 0.5        # not tuned
    with pytest.raises(InputError, match='TOMO.mrc:LABELS.mrc:COORDS.star'):
        _run(['--train', f'{tomo}:{lab}', '--out', out])


def test_bad_training_input_is_refused_before_training(tmp_path):
    tomo, lab, table = write_item(tmp_path, 5, shape=(24, 32, 32), n_target=6, n_decoy=0)
    out = tmp_path / 'never.pt'
    kw = dict(epochs=1, patch=16, pad=3, device='cpu')
    with pytest.raises(InputError, match='diameter'):
        train3d.train([(tomo, lab, table)], [], out, diameters=21, **kw)      # larger than the patch core
    gap = table.copy()
    gap[star.CLASS] = np.where(np.arange(len(gap)) % 2, 1, 3)               # no particle of class 2
    lab3 = tmp_path / 'lab3.mrc'
    labels.write_label_map(lab3, (24, 32, 32), gap, 5, 'tball', 10.0)
    with pytest.raises(InputError, match=r'\[2\]'):
        train3d.train([(tomo, str(lab3), gap)], [], out, **kw)
    other = write_item(tmp_path, 6, voxel=14.0, shape=(24, 32, 32), n_target=6, n_decoy=0)
    with pytest.raises(InputError, match='voxel size'):
        train3d.train([(tomo, lab, table)], [other], out, **kw)
    small = tmp_path / 'small.mrc'
    mrc.write_mrc(small, np.zeros((24, 32, 30), np.uint8), 10.0)
    with pytest.raises(InputError, match='shape'):
        train3d.train([(tomo, str(small), table)], [], out, **kw)
    with pytest.raises(InputError, match='coordinate'):
        train3d.train([(tomo, lab, table.iloc[:0])], [], out, **kw)
    assert not out.exists()


def test_two_classes_train_and_pick(tmp_path, one_thread, precision):
    tomo, _, table = write_item(tmp_path, 7, shape=(24, 32, 32), n_target=8, n_decoy=0)
    table[star.CLASS] = np.arange(len(table)) % 2 + 1
    lab = tmp_path / 'lab2.mrc'
    labels.write_label_map(lab, (24, 32, 32), table, {1: 5, 2: 3}, 'ball', 10.0)
    out = tmp_path / 'two.pt'
    meta = train3d.train([(tomo, str(lab), table)], [(tomo, str(lab), table)], out, epochs=1, patch=16, pad=3,
                         widths=(4, 8), device='cpu', label_kind='ball', precision=precision)
    assert meta['diameters'] == {'1': 5, '2': 3} and meta['classes'] == [1, 2]
    net, saved = pick3d.load_picker(out)
    assert net.out_channels == 3                     # background + two classes, softmax
    picks = pick3d.pick(tomo, out, device='cpu', t_seg=0.0, t_lm=0.0)   # precision from $CRYOPICK_PRECISION
    assert set(picks[star.CLASS]) <= {1, 2} and len(picks)


def test_class_balanced_epochs_draw_every_class_equally_often():
    """90 particles of class 1 and 10 of class 2: balanced epochs keep the epoch size (100 particle patches
    + 10 % background) but draw class 2 about as often as class 1; unbalanced ones draw each particle once."""
    # particles on a grid 8 voxels apart; patch 16 jitters by at most 3, so each centre has one source
    grid = np.stack(np.meshgrid(*[np.arange(4, 84, 8)] * 3, indexing='ij'), -1).reshape(-1, 3)
    zyx = np.random.default_rng(0).permutation(grid)[:100]
    classes = np.array([1] * 90 + [2] * 10)
    volume = np.zeros((88, 88, 88), np.float32)
    tomo = train3d.Tomo('t', volume, volume.astype(np.uint8), 1.0, 0.0, 1.0, zyx, classes)

    def class_counts(samples):
        counts = {1: 0, 2: 0}
        for _, c in samples:
            source = np.flatnonzero(np.all(np.abs(zyx - c) <= 3, axis=1))
            assert len(source) == 1
            counts[int(classes[source[0]])] += 1
        return counts

    plain = train3d.epoch_samples([tomo], 16, np.random.default_rng(1), 0.1, class_balance=False)
    balanced = train3d.epoch_samples([tomo], 16, np.random.default_rng(1), 0.1, class_balance=True)
    assert len(plain) == len(balanced) == 110
    assert class_counts(train3d.epoch_samples([tomo], 16, np.random.default_rng(2), 0.0, False)) == {1: 90, 2: 10}
    counts = [class_counts(train3d.epoch_samples([tomo], 16, np.random.default_rng(s), 0.0, True))
              for s in range(5)]
    assert all(sum(c.values()) == 100 for c in counts)
    assert 0.4 < np.mean([c[2] / 100 for c in counts]) < 0.6


def test_hard_negatives_are_unlabelled_blobs_and_get_background_patches(tmp_path):
    # synthetic_tomogram: the decoys (radius 6) are dark blobs with no label; DoG finds them, the hard
    # negatives are the blobs far from every annotated particle, and epochs draw patches there.
    tomo, lab, table = write_item(tmp_path, 7)
    t = train3d.load_item((tomo, lab, table))
    hard = train3d.find_hard_negatives(t, 10, 6, n_max=60)
    assert len(hard) >= 5
    dist = np.linalg.norm(hard[:, None, :] - t.zyx[None, :, :], axis=2).min(axis=1)
    assert np.all(dist >= 6)
    # most of them are the decoys: inside a dark ball (the smoothed volume is well below the mean)
    smooth = gaussian_filter(np.asarray(mrc.open_volume(tomo)[0]), 1.5)
    assert np.mean([smooth[tuple(p)] < smooth.mean() - 0.3 for p in hard]) >= 0.6
    t.hard = hard
    samples = train3d.epoch_samples([t], 32, np.random.default_rng(0), bg_fraction=1.0, hard_fraction=1.0)
    assert len(samples) == 2 * len(t.zyx)

    def near_hard(centres):
        return sum(np.min(np.abs(hard - c).max(axis=1)) <= 32 // 5 for c in centres)
    # every background centre is a jittered hard negative (particle centres are all ≥ 6 voxels away,
    # but their jitter may bring some within reach too)
    assert near_hard([c for _, c in samples]) >= len(t.zyx)
    none = train3d.epoch_samples([t], 32, np.random.default_rng(0), bg_fraction=1.0, hard_fraction=0.0)
    assert near_hard([c for _, c in none]) < near_hard([c for _, c in samples])


# ------------------------------------------------------------------ progress, time budget, resuming
TINY = dict(patch=16, pad=3, widths=(4, 8), batch_size=2, lr=3e-3, device='cpu', seed=0)


def _small_item(tmp_path, seed=8):
    return write_item(tmp_path, seed, shape=(24, 32, 32), n_target=6, n_decoy=0)


def test_progress_lines_and_device_precision_are_logged(tmp_path, one_thread, monkeypatch, caplog):
    monkeypatch.setenv('CRYOPICK_PROGRESS_SECONDS', '0')   # a line at every step
    item = _small_item(tmp_path)
    lines = []
    train3d.train([item], [item], tmp_path / 'p.pt', epochs=2, val_every=1, tune=False, precision='fp32',
                  log=lambda r: lines.append(r) if isinstance(r, str) else None, **TINY)
    assert any(line.startswith('train3d: device cpu (1 thread), precision fp32 (asked)') for line in lines), lines
    steps = [line for line in lines if line.startswith('epoch 2/2: ')]
    assert steps and all('ETA' in line and 'loss' in line and 'steps (' in line for line in steps), steps
    assert steps[-1].startswith('epoch 2/2: 4/4 steps (100%)')
    assert any(line.startswith('validation map tomo8: ') and 'tiles' in line for line in lines)
    # the command line gets them through the module logger
    with caplog.at_level('INFO'):
        train3d.train([item], [item], tmp_path / 'q.pt', epochs=1, tune=False, precision='fp32', **TINY)
    assert any('ETA' in r.getMessage() and r.name.endswith('training') for r in caplog.records)


def test_time_budget_stops_early_with_a_model_and_the_same_command_continues(tmp_path, one_thread, monkeypatch):
    monkeypatch.setenv('CRYOPICK_PROGRESS_SECONDS', '0')   # a progress line at every step
    item = _small_item(tmp_path)
    out = tmp_path / 'budget.pt'
    records = []
    # 4 steps per epoch, 500 epochs planned: the budget of 3 s stops it long before
    meta = train3d.train([item], [item], out, epochs=500, val_every=50, patience=1000, time_budget=0.05,
                         log=records.append, **TINY)
    assert meta['stop_reason'] == 'time budget' and meta['time_budget_min'] == 0.05
    assert 1 <= meta['steps_run'] < meta['steps_planned'] == 2000
    assert meta['epochs_run'] < 500 and meta['best_epoch'] == meta['epochs_run']   # last weights validated
    assert 1 <= meta['tuned_val']['grid_points'] <= 25                              # tuning ran after the stop
    net, saved = pick3d.load_picker(out)
    assert saved['stop_reason'] == 'time budget' and saved['steps_run'] == meta['steps_run']
    assert len(pick3d.pick(item[0], out, device='cpu', t_seg=0.0, t_lm=0.0)) > 0
    assert any(isinstance(r, str) and 'time budget of 3.0 s spent' in r for r in records)
    # the progress lines give the budget's end as the ETA, not the 500 planned epochs'
    etas = [r for r in records if isinstance(r, str) and 'run ETA' in r]
    assert etas and all('(time budget; all 500 epochs would take' in r for r in etas), etas[:3]
    ckpt = tmp_path / 'budget.pt.checkpoint.pt'
    assert ckpt.exists()                              # kept after a budget stop: the same call continues
    again = train3d.train([item], [item], out, epochs=500, val_every=50, patience=1000, time_budget=0.05,
                          log=records.append, **TINY)
    assert again['resumed_after_epoch'] == meta['epochs_run']
    assert again['steps_run'] > meta['steps_run'] and again['epochs_run'] > meta['epochs_run']
    # the command: --no-resume starts afresh; a budget not reached changes nothing; the finished run
    # removes the checkpoint, and --resume then has nothing to resume
    coords = tmp_path / 'c.star'
    star.write_coordinates(coords, item[2])
    spec = f'{item[0]}:{item[1]}:{coords}'
    cli = ['--train', spec, '--val', spec, '--out', out, '--epochs', 1, '--patch', 16, '--pad', 3, '--no-tune',
           '--device', 'cpu', '--time-budget', 30]
    assert _run(cli + ['--no-resume']) == 0
    _, _, other = model_io.load_model(out, 'deepetpicker')
    assert 'resumed_after_epoch' not in other and other['stop_reason'] == 'epochs' and not ckpt.exists()
    with pytest.raises(InputError, match='no checkpoint'):
        _run(cli + ['--resume'])
    with pytest.raises(InputError, match='time-budget'):
        train3d.train([item], [item], out, epochs=1, time_budget=0, **TINY)


class _Interrupt(Exception):
    pass


def test_interrupted_training_resumes_from_its_last_epoch_as_if_never_stopped(tmp_path, one_thread):
    item = _small_item(tmp_path)
    kw = dict(epochs=3, val_every=1, patience=10, tune=False, **TINY)
    whole = train3d.train([item], [item], tmp_path / 'whole.pt', resume=False, **kw)

    def stop_after_first_epoch(record):
        if isinstance(record, dict) and record.get('epoch') == 1:
            raise _Interrupt()        # as a kill right after epoch 1 was saved
    out = tmp_path / 'cut.pt'
    with pytest.raises(_Interrupt):
        train3d.train([item], [item], out, log=stop_after_first_epoch, **kw)
    ckpt = tmp_path / 'cut.pt.checkpoint.pt'
    assert ckpt.exists()
    records = []
    resumed = train3d.train([item], [item], out, resume=True, log=records.append, **kw)
    epochs_run = [r['epoch'] for r in records if isinstance(r, dict) and 'epoch' in r]
    assert epochs_run == [2, 3]                       # epoch 1 was not trained again
    assert any(isinstance(r, str) and r.startswith(f'train3d: resuming from {ckpt} after epoch 1') for r in records)
    assert resumed['resumed_after_epoch'] == 1 and resumed['steps_run'] == whole['steps_run'] == 12
    assert not ckpt.exists()                          # removed when training ends
    rows = list(csv.DictReader(open(str(out) + '.history.csv')))
    whole_rows = list(csv.DictReader(open(str(tmp_path / 'whole.pt') + '.history.csv')))
    assert [int(r['epoch']) for r in rows] == [1, 2, 3]
    # restored weights, optimiser, schedule and random states: the same steps as the uninterrupted run
    assert [float(r['train_loss']) for r in rows] == pytest.approx([float(r['train_loss']) for r in whole_rows],
                                                                    rel=1e-5)
    assert resumed['best_epoch'] == whole['best_epoch']
    _, a, _ = model_io.load_model(out, 'deepetpicker')
    _, b, _ = model_io.load_model(tmp_path / 'whole.pt', 'deepetpicker')
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


def test_validation_f1_stuck_at_zero_is_warned_about(tmp_path, one_thread, caplog):
    item = _small_item(tmp_path)
    with caplog.at_level('WARNING'):
        # t_seg above 1: nothing can ever be picked, as with thresholds far off or wrong labels
        meta = train3d.train([item], [item], tmp_path / 'z.pt', epochs=3, val_every=1, tune=False,
                             thresholds={'t_seg': 1.01}, log=lambda r: None, **TINY)
    warned = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
    assert any('validation F1 is 0 at the last 3 validations (epochs 1, 2, 3)' in w and 'no picks at all' in w
               and 'label diameter' in w for w in warned), warned
    assert any(w.startswith('validation F1 is 0') for w in meta['warnings'])
    assert any('lowest validation loss' in w for w in meta['warnings'])


def test_threshold_search_from_the_defaults_outwards_and_cut_at_a_deadline():
    import time
    rng = np.random.default_rng(3)
    truth = np.array([[8, 8, 8], [8, 24, 20], [20, 10, 24], [22, 26, 8], [14, 16, 14]])
    zz, yy, xx = np.indices((30, 34, 32))
    prob = rng.uniform(0, 0.45, (30, 34, 32)).astype(np.float32)
    for k, c in enumerate(truth):
        ball = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= 9
        prob[ball] = 0.35 + 0.1 * k                 # particles at levels 0.35 .. 0.75: the thresholds matter
    maps, vset = [prob[None]], [(None, (0, 0, 0), prob.shape, truth, np.ones(len(truth), int))]
    base = {'t_seg': 0.5, 't_lm': 0.1, 'kernel': 5, 'iterations': None, 't_dist': None}
    thr, s = train3d.tune_thresholds(maps, vset, {1: 7}, base, 3.0, 3.0, 'cpu')
    # the same choice as the plain search in grid order
    best = None
    for t_seg in train3d.T_SEG_GRID:
        for t_lm in train3d.T_LM_GRID:
            r = train3d._val_scores(maps, vset, {1: 7}, dict(base, t_seg=t_seg, t_lm=t_lm), 3.0, 3.0, 'cpu')
            key = (round(r['f1'], 6), r['score'], -abs(t_seg - 0.5), -abs(t_lm - 0.1))
            if best is None or key > best[0]:
                best = (key, (t_seg, t_lm))
    assert (thr['t_seg'], thr['t_lm']) == best[1] and s['grid_points'] == 25
    assert thr['t_seg'] < 0.5                          # lower than the default finds the weaker particles
    # a deadline already passed: the defaults only
    thr, s = train3d.tune_thresholds(maps, vset, {1: 7}, base, 3.0, 3.0, 'cpu', deadline=time.monotonic())
    assert (thr['t_seg'], thr['t_lm'], s['grid_points']) == (0.5, 0.1, 1)
