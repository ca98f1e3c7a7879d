"""Progress lines (steps, rate, ETA, throttling), the device/precision line, checkpoints, and the progress
that `pick3d` and `disca` report while they run."""
import argparse
import logging

import numpy as np
import pytest
import torch

from cryopick_plugin.engine import checkpoint, progress
from cryopick_plugin.engine.errors import InputError


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_is_throttled_and_gives_rate_and_eta():
    clock, lines = FakeClock(), []
    p = progress.Progress('epoch 3/30', 220, say=lines.append, every=10, clock=clock)
    for _ in range(7):            # 1.3 s per step: the first line after 10 s, i.e. at step 8
        clock.now += 1.3
        p.update(note='loss 0.5')
    assert lines == []
    clock.now += 1.3
    p.update(note=lambda: 'loss 0.412')
    assert lines == ['epoch 3/30: 8/220 steps (4%), 1.30 s/step, ETA 4m36s; loss 0.412']
    clock.now += 1.3
    p.update()
    assert len(lines) == 1        # throttled: the next line 10 s after the last
    for _ in range(7):
        clock.now += 1.3
        p.update()
    assert len(lines) == 2 and lines[-1].startswith('epoch 3/30: 16/220 steps (7%), 1.30 s/step, ETA 4m25s')
    p.finish()
    assert lines[-1] == 'epoch 3/30: 16 steps in 21 s (1.30 s/step)'
    # fast loops give a rate per second, unknown totals no percentage nor ETA
    q = progress.Progress('tiles', 0, unit='tile', say=lines.append, every=0, clock=clock)
    clock.now += 0.5
    q.update(10)
    assert lines[-1] == 'tiles: 10 tiles, 20.0 tiles/s'


def test_short_loops_stay_silent():
    clock, lines = FakeClock(), []
    with progress.Progress('validation', 5, unit='tile', say=lines.append, every=10, clock=clock) as p:
        for _ in range(5):
            clock.now += 0.1
            p.update()
    assert lines == [] and p.eta == 0


def test_durations_and_interval(monkeypatch):
    assert [progress.duration(s) for s in (3.14, 45, 192, 3840, float('nan'))] == \
        ['3.1 s', '45 s', '3m12s', '1h04m', '?']
    monkeypatch.setenv(progress.EVERY_VAR, '2.5')
    assert progress.interval() == 2.5
    monkeypatch.setenv(progress.EVERY_VAR, 'often')
    assert progress.interval() == progress.DEFAULT_EVERY


def test_compute_summary_names_device_threads_and_why_this_precision(monkeypatch):
    monkeypatch.delenv('CRYOPICK_PRECISION', raising=False)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert progress.compute_summary('cpu', 'fp32', 'fp32') == 'device cpu (2 threads), precision fp32 (asked)'
        assert progress.compute_summary('cpu', 'fp32') == \
            'device cpu (2 threads), precision fp32 (auto: no native bf16 on this CPU)'
        assert progress.compute_summary('cpu', 'bf16', 'auto').endswith('precision bf16 (auto: native bf16 on this CPU)')
        monkeypatch.setenv('CRYOPICK_PRECISION', 'bf16')
        assert progress.compute_summary('cpu', 'bf16').endswith('(asked)')
        assert progress.compute_summary('cpu', None) == 'device cpu (2 threads), precision fp32'
    finally:
        torch.set_num_threads(previous)


# ------------------------------------------------------------------------------------------ checkpoints

def test_checkpoint_resumes_only_the_same_settings(tmp_path, caplog):
    path = checkpoint.path_for(tmp_path / 'model.pt')
    assert path == str(tmp_path / 'model.pt.checkpoint.pt')
    settings = {'epochs': 3, 'widths': (4, 8), 'lr': np.float64(1e-3)}
    assert checkpoint.load(path, settings) is None                   # nothing yet: start afresh
    with pytest.raises(InputError, match='no checkpoint to resume'):
        checkpoint.check(path, True)
    rng = np.random.default_rng(7)
    rng.random(3)
    checkpoint.save(path, settings, {'epoch': 2, 'rng': checkpoint.rng_state(rng),
                                     'weights': torch.arange(3.0)})
    expected = rng.random(4)
    # tuples and numpy scalars compare as JSON sees them
    state = checkpoint.load(path, {'epochs': 3, 'widths': [4, 8], 'lr': 1e-3}, resume=True)
    assert state['epoch'] == 2 and torch.equal(state['weights'], torch.arange(3.0))
    fresh = np.random.default_rng(0)
    checkpoint.restore_rng(state['rng'], fresh)
    assert np.array_equal(fresh.random(4), expected)
    with caplog.at_level(logging.WARNING):
        assert checkpoint.load(path, dict(settings, epochs=5)) is None
    assert 'other settings (epochs)' in caplog.text
    with pytest.raises(InputError, match=r'other settings \(epochs, lr\)'):
        checkpoint.load(path, dict(settings, epochs=5, lr=1.0), resume=True)
    assert checkpoint.load(path, settings, resume=False) is None
    with open(path, 'wb') as fh:
        fh.write(b'half a checkpoint')
    assert checkpoint.load(path, settings) is None
    with pytest.raises(InputError, match='not a readable cryopick checkpoint'):
        checkpoint.load(path, settings, resume=True)
    checkpoint.remove(path)
    checkpoint.remove(path)
    assert not (tmp_path / 'model.pt.checkpoint.pt').exists()


# ------------------------------------------------------------------------------ progress of the commands

def test_pick3d_reports_device_tiles_and_tomograms(tmp_path, monkeypatch, caplog):
    from cryopick_plugin.commands import pick3d as pick3d_cmd
    from cryopick_plugin.engine.io import model_io, mrc
    from cryopick_plugin.engine.pick3d import resunet3d
    monkeypatch.setenv(progress.EVERY_VAR, '0')
    torch.manual_seed(0)
    net = resunet3d.ResUNet3D(n_classes=1, widths=(4, 8))
    model_io.save_model(tmp_path / 'm.pt', 'deepetpicker', net.arch(), net.state_dict(),
                        {'voxel_size': 10.0, 'diameters': {'1': 5}, 'patch': 16, 'pad_infer': 4})
    rng = np.random.default_rng(3)
    for name in ('TS_1', 'TS_2'):
        mrc.write_mrc(tmp_path / f'{name}.mrc', rng.normal(size=(10, 14, 12)).astype(np.float32), 10.0)
    parser = argparse.ArgumentParser()
    pick3d_cmd.add_args(parser)
    args = parser.parse_args([str(tmp_path / 'TS_1.mrc'), str(tmp_path / 'TS_2.mrc'), '--model',
                              str(tmp_path / 'm.pt'), '--out', str(tmp_path / 'p.star'), '--pad', '2',
                              '--batch-size', '1', '--device', 'cpu', '--precision', 'fp32', '--t-seg', '0'])
    with caplog.at_level(logging.INFO):
        assert pick3d_cmd.main(args) == 0
    lines = [r.getMessage() for r in caplog.records]
    # 10×14×12 voxels with cores of 12: 1 × 2 × 1 tiles
    assert any(line.startswith('TS_1: 10×14×12 voxels, 2 tiles of 16³ (pad 2); device cpu (')
               and line.endswith('precision fp32 (asked)') for line in lines), lines
    assert any(line.startswith('TS_2: network: 1/2 tiles (50%)') and 'ETA' in line for line in lines), lines
    assert any(line.startswith('pick3d: 2/2 tomograms (100%)') and 'TS_2.mrc' in line and 'picks' in line
               for line in lines), lines


def test_disca_reports_device_and_progress_within_iterations(monkeypatch):
    from cryopick_plugin.engine.disca import em
    monkeypatch.setenv(progress.EVERY_VAR, '0')
    rng = np.random.default_rng(0)
    stack = rng.normal(size=(24, 21, 21, 21)).astype(np.float32)
    tiny = {'widths': [4, 4, 6, 6, 8, 8, 10, 10, 12, 12], 'feature_dim': 16, 'box': None, 'dropout': 0.5,
            'bn_momentum': 0.1, 'bn_eps': 1e-3}
    lines = []
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        em.disca_cluster(stack, k_range=(2, 2), max_iter=2, seed=0, device='cpu', log=lines.append, arch=tiny,
                         options={'pca_dim': 4, 'batch_size': 8, 'min_per_cluster': 5, 'split_check': False,
                                  'min_iter': 1})
    finally:
        torch.set_num_threads(previous)
    assert lines[0] == 'DISCA: 24 subtomograms (network box 21³, preset cpu), at most 2 iterations; ' \
                       'device cpu (1 thread), precision fp32'
    # 48 training copies (the data and one rotation of each) in batches of 8
    assert any(line.startswith('iteration 0: training: 6/6 batches (100%)') and 'loss' in line for line in lines)
    assert any(line.startswith('iteration 1: features: 24/24 subtomograms (100%)') for line in lines)
    first = next(line for line in lines if line.startswith('iteration 0: K='))
    assert 'features' in first and 'mixtures' in first and 'ETA ≤' in first
