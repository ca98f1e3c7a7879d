"""MP-NMS, overlap-tile inference and the `pick3d` command."""
import argparse

import numpy as np
import pytest
import torch

from cryopick_plugin.commands import pick3d as pick3d_cmd
from cryopick_plugin.engine.io import model_io, mrc, star
from cryopick_plugin.engine.pick3d import mpnms, picking as pick3d, resunet3d
from cryopick_plugin.engine.errors import InputError


def _balls(shape, centres_zyx, radius):
    zz, yy, xx = np.indices(shape)
    out = np.zeros(shape, np.float32)
    for c in centres_zyx:
        out[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= radius ** 2] = 1
    return out


def test_mp_nms_finds_blob_centres_exactly():
    rng = np.random.default_rng(0)
    centres = np.array([[6, 7, 8], [6, 20, 22], [14, 8, 25], [15, 22, 9], [10, 15, 15]])
    prob = _balls((21, 30, 33), centres, 3) * 0.9 + rng.uniform(0, 0.3, (21, 30, 33)).astype(np.float32)
    idx, scores = mpnms.mp_nms(prob, diameter=7)
    assert sorted(map(tuple, idx)) == sorted(map(tuple, centres))
    assert np.all(scores > 0.3) and np.all(np.diff(scores) <= 0)
    # t_lm drops weak peaks: a fragment of 2 voxels pools to a low value
    frag = prob.copy()
    frag[19, 27, 29:31] = 1.0
    idx2, sc2 = mpnms.mp_nms(frag, diameter=7, t_lm=0.1)
    assert len(idx2) == 5
    idx3, _ = mpnms.mp_nms(frag, diameter=7, t_lm=0.0)
    extra = [p for p in map(tuple, idx3) if p not in set(map(tuple, centres))]
    assert extra and all(np.linalg.norm(np.subtract(p, (19, 27, 29.5))) <= 2 for p in extra)
    # slab-wise with halo equals one pass
    idx4, sc4 = mpnms.mp_nms_slabs(prob, diameter=7, slab=4)
    assert np.array_equal(idx4, idx) and np.allclose(sc4, scores)


def _reference_mp_nms(prob, t_seg, t_lm, kernel, iterations):
    """The reference formulation: repeated k³ mean pooling, then k³ max pooling. Pooled as exact integer
    sums in float64 (divided once at the end) so that plateaus tie exactly, as the binary mask's do."""
    import torch.nn.functional as F
    h = torch.from_numpy((prob > t_seg).astype(np.float64))[None, None]
    for _ in range(iterations):
        h = F.avg_pool3d(h, kernel, stride=1, padding=kernel // 2, divisor_override=1)
    total = float(kernel) ** (3 * iterations)
    peak = (F.max_pool3d(h, kernel, stride=1, padding=kernel // 2) == h) & (h > t_lm * total)
    return {tuple(p) for p in torch.nonzero(peak[0, 0]).numpy()}, h[0, 0].numpy() / total


@pytest.mark.parametrize('kernel, iterations', [(3, 2), (5, 3)])
def test_separable_mp_nms_equals_the_cubic_pooling(kernel, iterations):
    # Foreground touching the volume border (zero padding there) and a sparse corner blob (the
    # foreground bounding-box crop must not change anything).
    rng = np.random.default_rng(kernel)
    shape = (23, 40, 37)
    prob = _balls(shape, [[0, 5, 5], [11, 20, 36], [20, 38, 2], [12, 21, 18]], 3)
    prob += rng.uniform(0, 0.6, shape).astype(np.float32) * (rng.random(shape) < 0.05)
    want, h_ref = _reference_mp_nms(prob, 0.5, 0.05, kernel, iterations)
    idx, scores = mpnms.mp_nms(prob, t_seg=0.5, t_lm=0.05, kernel=kernel, iterations=iterations)
    assert want and {tuple(p) for p in idx} == want
    assert np.allclose(scores, h_ref[tuple(idx.T)], atol=1e-6)
    lone = np.zeros(shape, np.float32)
    lone[20:23, 35:40, 30:37] = 1
    want, _ = _reference_mp_nms(lone, 0.5, 0.05, kernel, iterations)
    assert {tuple(p) for p in mpnms.mp_nms(lone, t_seg=0.5, t_lm=0.05, kernel=kernel,
                                           iterations=iterations)[0]} == want
    assert len(mpnms.mp_nms(np.zeros(shape, np.float32), diameter=7)[0]) == 0


def test_deduplicate_keeps_the_best_within_distance():
    pts = np.array([[0, 0, 0], [0, 0, 2], [0, 0, 3.5], [10, 10, 10]], float)
    keep = mpnms.deduplicate(pts, [0.5, 0.9, 0.4, 0.1], t_dist=3)
    # point 1 (best) removes 0 (2 away) and 2 (1.5 away); the far point stays
    assert list(keep) == [1, 3]
    assert list(mpnms.deduplicate(pts, [0.5, 0.9, 0.4, 0.1], t_dist=1.5)) == [1, 0, 2, 3]
    assert mpnms.default_iterations(23, 5) == 6 and mpnms.default_t_dist(11) == 6


def test_deduplicate_with_a_distance_per_point_uses_the_larger_of_a_pair():
    pts = np.array([[0, 0, 0], [0, 0, 7], [0, 20, 0], [0, 20, 7]], float)
    # 0 and 1: 7 apart, one of them allows 9 → duplicates; 2 and 3: both allow 5 → two particles
    keep = mpnms.deduplicate(pts, [0.9, 0.8, 0.7, 0.6], t_dist=[9, 5, 5, 5])
    assert list(keep) == [0, 2, 3]
    keep = mpnms.deduplicate(pts, [0.8, 0.9, 0.7, 0.6], t_dist=[9, 5, 5, 5])
    assert list(keep) == [1, 2, 3]
    with pytest.raises(ValueError):
        mpnms.deduplicate(pts, [0.9, 0.8, 0.7, 0.6], t_dist=[9, 5])


def test_one_particle_claimed_by_two_class_channels_gives_one_pick():
    # A large particle (label 13) whose channel-2 (small class, label 7) response peaks 6 voxels off its
    # centre: the small class's own distance (4) would keep both, the large class's (7) merges them.
    # Two small particles 8 voxels apart stay two.
    shape = (24, 44, 44)
    prob = np.zeros((2,) + shape, np.float32)
    prob[0] = _balls(shape, [[12, 12, 12]], 6) * 0.9
    prob[1] = _balls(shape, [[12, 12, 18]], 3) * 0.95 + _balls(shape, [[12, 32, 12], [12, 32, 20]], 3) * 0.9
    zyx, cls, _ = pick3d.find_peaks(prob, {1: 13, 2: 7})
    found = sorted((int(c), tuple(p)) for c, p in zip(cls, zyx))
    assert [c for c, p in found if p[1] == 32] == [2, 2]
    assert len([c for c, p in found if p[1] == 12]) == 1 and len(found) == 3
    zyx, cls, _ = pick3d.find_peaks(prob, {1: 13, 2: 7}, t_dist=4)   # one distance for all: both kept
    assert len(zyx) == 4


@pytest.mark.parametrize('padding', ['inside', 'zero', 'mirror'])
def test_tiled_picking_equals_single_pass(padding):
    rng = np.random.default_rng(1)
    shape = (23, 37, 41)
    centres = np.array([[5, 5, 5], [11, 18, 20], [17, 30, 6], [4, 33, 36], [18, 9, 33], [11, 6, 20]])
    vol = -_balls(shape, centres, 3) + rng.normal(0, 0.15, shape).astype(np.float32)
    # a voxel-wise "network": tiling must then reproduce the single-pass map exactly
    conv = torch.nn.Conv3d(1, 1, 1)
    with torch.no_grad():
        conv.weight.fill_(-4.0)
        conv.bias.fill_(-2.0)

    def predictor(batch):
        with torch.no_grad():
            return torch.sigmoid(conv(torch.from_numpy(batch))).numpy()

    whole = pick3d.probability_map(vol, predictor, 1, patch=48, pad=0, padding=padding)
    tiled = pick3d.probability_map(vol, predictor, 1, patch=16, pad=4, batch_size=3, padding=padding)
    assert np.array_equal(whole, tiled)
    counted = np.zeros(shape, int)
    for _, c, n in pick3d.tiles(shape, 16, 4):
        counted[c[0]:c[0] + n[0], c[1]:c[1] + n[1], c[2]:c[2] + n[2]] += 1
    assert counted.min() >= 1  # every voxel covered by a kept core
    a = pick3d.find_peaks(whole, {1: 7})
    b = pick3d.find_peaks(tiled, {1: 7})
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert sorted(map(tuple, a[0])) == sorted(map(tuple, centres))


def test_inside_tiles_keep_windows_in_the_volume_and_cores_where_they_were():
    shape, patch, pad = (23, 37, 41), 16, 4
    outside = list(pick3d.tiles(shape, patch, pad))
    inside = list(pick3d.tiles(shape, patch, pad, inside=True))
    assert [(c, n) for _, c, n in inside] == [(c, n) for _, c, n in outside]   # same cores
    moved = 0
    for (w, c, n), (w0, _, _) in zip(inside, outside):
        for i in range(3):
            assert 0 <= w[i] <= shape[i] - patch                 # the window lies inside the volume
            assert w[i] <= c[i] and c[i] + n[i] <= w[i] + patch  # and still holds its core
            # away from the faces nothing moves; at a face the window moves by less than the margin
            assert w[i] == w0[i] or (w0[i] < 0 or w0[i] + patch > shape[i]) and abs(w[i] - w0[i]) <= pad
        moved += w != w0
    assert moved > 0
    # along an axis shorter than the patch the window has to stick out (zero padding) as before
    short = list(pick3d.tiles((10, 37, 41), patch, pad, inside=True))
    assert all(w[0] == c[0] - pad for w, c, _ in short) and min(w[0] for w, _, _ in short) < 0
    with pytest.raises(InputError, match='padding'):
        pick3d.probability_map(np.zeros((8, 8, 8), np.float32), None, 1, 8, 1, padding='reflect')


def test_flip_averaging_is_the_mean_over_the_eight_flipped_predictions():
    torch.manual_seed(0)
    net = resunet3d.ResUNet3D(n_classes=2, widths=(4, 8)).eval()
    x = np.random.default_rng(0).normal(size=(2, 1, 16, 16, 16)).astype(np.float32)
    plain = pick3d.model_predictor(net, precision='fp32')(x)
    mirrored = pick3d.model_predictor(net, precision='fp32', flip_average=True)(x)
    with torch.no_grad():
        expected = np.mean([np.flip(net.foreground(torch.from_numpy(np.ascontiguousarray(np.flip(x, d))))
                                    .numpy(), d) for d in pick3d.FLIPS], axis=0)
    assert mirrored.shape == plain.shape == (2, 2, 16, 16, 16)
    assert np.allclose(mirrored, expected, atol=1e-5)
    assert not np.allclose(mirrored, plain, atol=1e-3)  # a random network is not mirror-symmetric
    # a mirror-symmetric input gets a mirror-symmetric map, which a single pass does not guarantee
    sym = x[:1] + np.flip(x[:1], (2, 3, 4))
    for d in pick3d.FLIPS[1:]:
        sym = sym + np.flip(sym, d)
    m = pick3d.model_predictor(net, precision='fp32', flip_average=True)(np.ascontiguousarray(sym))
    assert np.allclose(m, np.flip(m, (2, 3, 4)), atol=1e-5)


def _tiny_model(path, voxel=10.0, n_classes=1):
    torch.manual_seed(0)
    net = resunet3d.ResUNet3D(n_classes=n_classes, widths=(4, 8))
    meta = {'voxel_size': voxel, 'diameters': {str(c): 5 for c in range(1, n_classes + 1)}, 'patch': 16,
            'pad_infer': 4, 'thresholds': {'t_seg': 0.5, 't_lm': 0.1}}
    model_io.save_model(path, 'deepetpicker', net.arch(), net.state_dict(), meta)
    return net


def test_pick_checks_voxel_size_and_rescales(tmp_path):
    _tiny_model(tmp_path / 'm.pt', voxel=10.0)
    vol = np.random.default_rng(2).normal(size=(12, 20, 18)).astype(np.float32)
    mrc.write_mrc(tmp_path / 't.mrc', vol, 10.05)   # within 1%
    mrc.write_mrc(tmp_path / 'b.mrc', vol, 20.0)
    df = pick3d.pick(tmp_path / 't.mrc', tmp_path / 'm.pt', device='cpu', t_seg=0.0, t_lm=0.0)
    assert list(df.columns) == [star.TOMO, star.X, star.Y, star.Z, star.CLASS, star.SCORE]
    assert (df[star.TOMO] == 't').all() and len(df) > 0
    with pytest.raises(InputError, match='voxel size'):
        pick3d.pick(tmp_path / 'b.mrc', tmp_path / 'm.pt', device='cpu')
    big = pick3d.pick(tmp_path / 'b.mrc', tmp_path / 'm.pt', device='cpu', rescale=True, t_seg=0.0, t_lm=0.0)
    xyz = star.xyz_array(big)
    assert len(big) and np.all(xyz >= -0.5) and np.all(xyz <= np.array([18, 20, 12]) - 0.5)
    # the working volume was twice as large: picks land on half-voxel positions of the original
    assert np.any(np.abs(xyz - np.round(xyz)) > 0.25)
    mrc.write_mrc(tmp_path / 'flat.mrc', np.ones((8, 8, 8), np.float32), 10.0)
    with pytest.raises(InputError, match='constant'):
        pick3d.pick(tmp_path / 'flat.mrc', tmp_path / 'm.pt', device='cpu')


def test_rescaled_volume_samples_the_original_grid():
    vol = np.arange(6 * 8 * 10, dtype=np.float32).reshape(6, 8, 10)
    out = pick3d.rescaled(vol, 2.0, np.zeros((12, 16, 20), np.float32))
    assert np.allclose(out[::2, ::2, ::2], vol)
    assert out[1, 0, 0] == pytest.approx((vol[0, 0, 0] + vol[1, 0, 0]) / 2)


def _run(argv):
    parser = argparse.ArgumentParser()
    pick3d_cmd.add_args(parser)
    return pick3d_cmd.main(parser.parse_args([str(a) for a in argv]))


def test_pick3d_command_writes_one_star_for_several_tomograms(tmp_path):
    _tiny_model(tmp_path / 'm.pt', n_classes=2)
    rng = np.random.default_rng(3)
    for name in ('TS_1', 'TS_2'):
        mrc.write_mrc(tmp_path / f'{name}.mrc', rng.normal(size=(10, 14, 12)).astype(np.float32), 10.0)
    out = tmp_path / 'picks.star'
    assert _run([tmp_path / 'TS_1.mrc', tmp_path / 'TS_2.mrc', '--model', tmp_path / 'm.pt', '--out', out,
                 '--t-seg', 0.0, '--t-lm', 0.0, '--pad', 2, '--device', 'cpu']) == 0
    df = star.read_coordinates(out)
    assert set(df[star.TOMO]) == {'TS_1', 'TS_2'}
    assert _run([tmp_path / 'TS_1.mrc', '--model', tmp_path / 'm.pt', '--out', out, '--tomo-name', 'ts_a',
                 '--t-seg', 0.0, '--t-lm', 0.0]) == 0
    assert set(star.read_coordinates(out)[star.TOMO]) == {'ts_a'}
    assert set(df[star.CLASS]) <= {1, 2}
    assert df[star.SCORE].between(0, 1).all()
    flipped = tmp_path / 'flipped.star'
    assert _run([tmp_path / 'TS_1.mrc', '--model', tmp_path / 'm.pt', '--out', flipped, '--flip-average',
                 '--t-seg', 0.0, '--t-lm', 0.0, '--pad', 2, '--device', 'cpu']) == 0
    averaged = star.read_coordinates(flipped)
    assert len(averaged) > 0 and averaged[star.SCORE].between(0, 1).all()
    with pytest.raises(InputError):
        _run([tmp_path / 'TS_1.mrc', '--model', tmp_path / 'm.pt', '--out', out, '--pad', 8])
    model_io.save_model(tmp_path / 'x.pt', 'cryosegnet', {}, {}, {})
    with pytest.raises(InputError, match='cryosegnet'):
        _run([tmp_path / 'TS_1.mrc', '--model', tmp_path / 'x.pt', '--out', out])


def test_no_picks_gives_an_empty_table_with_the_columns(tmp_path):
    _tiny_model(tmp_path / 'm.pt')
    mrc.write_mrc(tmp_path / 't.mrc', np.random.default_rng(4).normal(size=(10, 12, 14)).astype(np.float32), 10.0)
    df = pick3d.pick(tmp_path / 't.mrc', tmp_path / 'm.pt', device='cpu', t_seg=1.0)
    assert len(df) == 0 and list(df.columns) == [star.TOMO, star.X, star.Y, star.Z, star.CLASS, star.SCORE]
    out = tmp_path / 'p.star'
    assert _run([tmp_path / 't.mrc', '--model', tmp_path / 'm.pt', '--out', out, '--t-seg', 1.0]) == 0
    assert out.exists()


def test_memory_mapped_probability_map_gives_the_same_picks(tmp_path, monkeypatch):
    _tiny_model(tmp_path / 'm.pt')
    mrc.write_mrc(tmp_path / 't.mrc', np.random.default_rng(5).normal(size=(14, 18, 20)).astype(np.float32), 10.0)
    in_memory = pick3d.pick(tmp_path / 't.mrc', tmp_path / 'm.pt', device='cpu', t_seg=0.0, t_lm=0.0)
    monkeypatch.setattr(pick3d, 'IN_MEMORY_BYTES', 0)
    work = tmp_path / 'work'
    work.mkdir()
    mapped = pick3d.pick(tmp_path / 't.mrc', tmp_path / 'm.pt', device='cpu', t_seg=0.0, t_lm=0.0, work_dir=work)
    assert len(in_memory) > 0
    assert np.array_equal(star.xyz_array(in_memory), star.xyz_array(mapped))
    assert list(work.iterdir()) == []       # the temporary map is removed
