"""Subtomogram extraction: centring, border skipping, binning, normalisation, file round trip."""
import os

import numpy as np
import pandas as pd
import pytest

from cryopick_plugin.commands import main as cli
from cryopick_plugin.engine.disca import extract as ex
from cryopick_plugin.engine.io import mrc, star
from cryopick_plugin.engine.errors import InputError

SHAPE = (30, 32, 34)


def random_volume(seed=0):
    return np.random.default_rng(seed).normal(size=SHAPE).astype(np.float32)


@pytest.mark.parametrize('box', [8, 7])
def test_box_is_the_numpy_slice_around_the_rounded_centre(box):
    vol = random_volume()
    xyz = np.array([[10.4, 12.5, 8.6], [20.0, 15.0, 14.49]])
    stack, kept, skipped = ex.extract_subtomograms(vol, xyz, box, normalise=False)
    assert kept.tolist() == [0, 1] and skipped == 0 and stack.shape == (2, box, box, box)
    h = box // 2
    # (x, y, z) = (10.4, 12.5, 8.6) -> voxel (z, y, x) = (9, 13, 10); halves round up
    np.testing.assert_array_equal(stack[0], vol[9 - h:9 - h + box, 13 - h:13 - h + box, 10 - h:10 - h + box])
    np.testing.assert_array_equal(stack[1], vol[14 - h:14 - h + box, 15 - h:15 - h + box, 20 - h:20 - h + box])


def test_particle_centre_is_voxel_box_half():
    vol = np.zeros(SHAPE, np.float32)
    vol[12, 15, 17] = 1.0
    stack, _, _ = ex.extract_subtomograms(vol, [[17, 15, 12]], 8, normalise=False)
    assert np.unravel_index(np.argmax(stack[0]), stack[0].shape) == (4, 4, 4)


def test_border_boxes_are_skipped_and_counted():
    vol = random_volume()
    xyz = np.array([[2.0, 16, 15], [17, 16, 15], [17, 28.6, 15], [17, 16, 26], [30, 28, 26]])
    stack, kept, skipped = ex.extract_subtomograms(vol, xyz, 8)
    # box 8 needs 4 voxels below and 3 above the centre: x=2 and y=29 fail; z=26 (shape 30) fits exactly
    assert kept.tolist() == [1, 3, 4] and skipped == 2 and len(stack) == 3


def test_binning_shapes_and_centre():
    vol = np.zeros(SHAPE, np.float32)
    zz, yy, xx = np.indices(SHAPE)
    vol += np.exp(-((zz - 14) ** 2 + (yy - 16) ** 2 + (xx - 17) ** 2) / (2 * 2.0 ** 2)).astype(np.float32)
    raw, _, _ = ex.extract_subtomograms(vol, [[17, 16, 14]], 16, normalise=False)
    four, _, _ = ex.extract_subtomograms(vol, [[17, 16, 14]], 16, binning=2, normalise=False)
    block, _, _ = ex.extract_subtomograms(vol, [[17, 16, 14]], 16, binning=2, normalise=False,
                                          bin_method='block')
    assert four.shape == block.shape == (1, 8, 8, 8)
    assert np.unravel_index(np.argmax(four[0]), (8, 8, 8)) == (4, 4, 4)
    assert four[0].mean() == pytest.approx(raw[0].mean(), rel=1e-5)
    np.testing.assert_allclose(block[0], raw[0].reshape(8, 2, 8, 2, 8, 2).mean(axis=(1, 3, 5)), rtol=1e-6)
    # no binning is the identity for Fourier cropping
    np.testing.assert_allclose(ex.fourier_crop(raw[0], 16), raw[0])
    with pytest.raises(InputError):
        ex.extract_subtomograms(vol, [[17, 16, 14]], 16, binning=3)


def test_normalise_and_invert():
    vol = random_volume() * 5 + 3
    norm, _, _ = ex.extract_subtomograms(vol, [[17, 16, 15]], 10)
    assert abs(norm[0].mean()) < 1e-5 and norm[0].std() == pytest.approx(1, rel=1e-4)
    inv, _, _ = ex.extract_subtomograms(vol, [[17, 16, 15]], 10, invert=True)
    np.testing.assert_allclose(inv, -norm)


def test_write_read_round_trip(tmp_path):
    vol = random_volume()
    table = star.coordinates_frame([[10, 12, 9], [20, 15, 14], [1, 1, 1]], 'TS_01', classes=[2, 1, 3],
                                   scores=[0.9, 0.5, 0.1])
    stack, kept, skipped = ex.extract_subtomograms(vol, star.xyz_array(table), 8)
    assert skipped == 1
    path = ex.write_subtomograms(tmp_path / 'out', stack, table.iloc[kept], voxel_size=20.0)
    assert os.path.basename(path) == 'subtomograms.star'
    back, back_table, voxel = ex.read_subtomograms(path)
    np.testing.assert_array_equal(back, stack)
    assert voxel == 20.0
    assert back_table[ex.IMAGE].tolist() == ['subtomo_000001.mrc', 'subtomo_000002.mrc']
    assert back_table[star.CLASS].tolist() == [2, 1]
    np.testing.assert_allclose(back_table[[star.X, star.Y, star.Z]].to_numpy(float), [[10, 12, 9], [20, 15, 14]])
    assert mrc.read_header(tmp_path / 'out' / 'subtomo_000002.mrc')[1] == pytest.approx(20.0)


def test_mixed_box_sizes_rejected(tmp_path):
    vol = random_volume()
    stack, kept, _ = ex.extract_subtomograms(vol, [[10, 12, 9], [20, 15, 14]], 8)
    table = star.coordinates_frame([[10, 12, 9], [20, 15, 14]], 'TS_01')
    path = ex.write_subtomograms(tmp_path, stack, table, voxel_size=10.0)
    mrc.write_mrc(tmp_path / 'subtomo_000002.mrc', np.zeros((6, 6, 6), np.float32), voxel_size=10.0)
    with pytest.raises(InputError, match='subtomograms.star'):
        ex.read_subtomograms(path)
    os.remove(tmp_path / 'subtomo_000002.mrc')
    with pytest.raises(InputError, match='not found'):
        ex.read_subtomograms(path)


def test_command_line(tmp_path, capsys):
    vol = random_volume()
    mrc.write_mrc(tmp_path / 'TS_01.mrc', vol, voxel_size=10.0)
    rows = pd.concat([star.coordinates_frame([[10, 12, 9], [20, 15, 14], [1, 1, 1]], 'TS_01', classes=[1, 2, 1]),
                      star.coordinates_frame([[17, 16, 15]], 'TS_02')], ignore_index=True)
    star.write_coordinates(tmp_path / 'coords.star', rows)
    out = tmp_path / 'subs'
    assert cli(['extract', str(tmp_path / 'TS_01.mrc'), str(tmp_path / 'coords.star'), '--box', '8',
                '--binning', '2', '--out', str(out)]) == 0
    stack, table, voxel = ex.read_subtomograms(out / 'subtomograms.star')
    assert stack.shape == (2, 4, 4, 4) and voxel == 20.0
    assert set(table[star.TOMO]) == {'TS_01'} and table[star.CLASS].tolist() == [1, 2]
    assert table[ex.IMAGE].tolist()[0] == 'TS_01_000001.mrc'
    assert cli(['extract', str(tmp_path / 'TS_01.mrc'), str(tmp_path / 'coords.star'), '--box', '40',
                '--out', str(tmp_path / 'big')]) == 2
    assert '--box' in capsys.readouterr().err
