"""Engine I/O: memory-mapped MRC reading, atomic writes, STAR tables and their bad-input errors."""
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from cryopick_plugin.engine.io import mrc, star
from cryopick_plugin.engine.errors import InputError


def test_mrc_round_trip_is_memory_mapped(tmp_path):
    vol = np.random.default_rng(0).normal(size=(7, 9, 11)).astype(np.float32)
    path = tmp_path / 'v.mrc'
    mrc.write_mrc(path, vol, voxel_size=4.5)
    data, voxel = mrc.open_volume(path)
    assert isinstance(data, np.memmap)
    assert voxel == pytest.approx(4.5)
    np.testing.assert_array_equal(np.asarray(data), vol)
    assert mrc.read_header(path)[0] == (7, 9, 11)
    # no temporary file left beside the output
    assert sorted(os.listdir(tmp_path)) == ['v.mrc']


def test_slab_statistics_match_numpy():
    vol = np.random.default_rng(1).normal(3.0, 2.0, size=(40, 16, 16)).astype(np.float32)
    stats = mrc.volume_stats(vol, max_bytes=16 * 16 * 4 * 3)  # 3 planes per slab
    assert stats['mean'] == pytest.approx(float(vol.mean()), rel=1e-6)
    assert stats['std'] == pytest.approx(float(vol.std()), rel=1e-5)
    assert stats['min'] == pytest.approx(float(vol.min()))
    assert len(list(mrc.iter_slabs(vol.shape, max_bytes=16 * 16 * 4 * 3))) == 14


def test_new_volume_appears_only_when_complete(tmp_path):
    path = tmp_path / 'out.mrc'
    with pytest.raises(RuntimeError):
        with mrc.new_volume(path, (4, 5, 6)) as data:
            data[0] = 1
            raise RuntimeError('interrupted')
    assert os.listdir(tmp_path) == []
    with mrc.new_volume(path, (4, 5, 6), voxel_size=2.0) as data:
        for sl in mrc.iter_slabs(data.shape, max_bytes=5 * 6 * 4):
            data[sl] = sl.start
    arr, voxel = mrc.open_volume(path)
    assert voxel == pytest.approx(2.0)
    assert arr[3, 0, 0] == 3 and os.listdir(tmp_path) == ['out.mrc']


@pytest.mark.parametrize('case, expected', [
    ('missing', 'file not found'),
    ('not_mrc', 'not a readable MRC file'),
    ('image2d', 'expected a 3D volume'),
    ('nan', 'contains NaN'),
    ('constant', 'is constant'),
    ('truncated', 'not a readable MRC file'),
])
def test_bad_volumes_give_one_line_errors(tmp_path, case, expected):
    path = tmp_path / f'{case}.mrc'
    if case == 'not_mrc':
        path.write_text('hello, I am text\n' * 100)
    elif case == 'image2d':
        mrc.write_mrc(path, np.ones((8, 9), np.float32) + np.arange(9))
    elif case == 'nan':
        vol = np.random.default_rng(0).normal(size=(5, 5, 5)).astype(np.float32)
        vol[2, 2, 2] = np.nan
        mrc.write_mrc(path, vol)
    elif case == 'constant':
        mrc.write_mrc(path, np.full((5, 5, 5), 3.0, np.float32))
    elif case == 'truncated':
        mrc.write_mrc(path, np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32))
        with open(path, 'r+b') as fh:
            fh.truncate(1024 + 16 * 16 * 4 * 3)
    with pytest.raises(InputError) as info:
        mrc.open_checked(path)
    message = str(info.value)
    assert message.startswith(str(path) + ': ') and expected in message and '\n' not in message


def test_star_round_trip_and_columns(tmp_path):
    table = star.coordinates_frame([[1.5, 2, 3], [4, 5, 6.25]], 'TS_01', classes=[2, 3], scores=[0.5, 0.25],
                                   angles=[[1, 2, 3], [4, 5, 6]])
    path = tmp_path / 'c.star'
    star.write_coordinates(path, table)
    back = star.read_coordinates(path)
    assert list(back[star.TOMO]) == ['TS_01', 'TS_01']
    np.testing.assert_allclose(star.xyz_array(back), star.xyz_array(table))
    assert back[star.CLASS].tolist() == [2, 3]
    np.testing.assert_allclose(back[star.SCORE], [0.5, 0.25])
    # RELION 3.1 style file with an optics block before the particles
    star.write_star(tmp_path / 'r31.star', {'optics': pd.DataFrame({'rlnOpticsGroup': [1]}), 'particles': table})
    assert len(star.read_coordinates(tmp_path / 'r31.star')) == 2


def test_star_errors(tmp_path):
    path = tmp_path / 'nocoords.star'
    star.write_star(path, pd.DataFrame({'rlnTomoName': ['a'], 'rlnAngleRot': [1.0]}))
    with pytest.raises(InputError, match='no data block with columns rlnCoordinateX, rlnCoordinateY, rlnCoordinateZ'):
        star.read_coordinates(path)
    with pytest.raises(InputError, match='file not found'):
        star.read_coordinates(tmp_path / 'absent.star')
    table = star.coordinates_frame([[1, 2, 3], [50, 2, 3]], 'a')
    with pytest.raises(InputError, match=r'1 coordinate\(s\) outside the volume'):
        star.check_inside('c.star', table, (10, 20, 30))
    star.check_inside('c.star', table.iloc[:1], (10, 20, 30))


def test_cli_lists_commands_and_reports_bad_input(tmp_path):
    out = subprocess.run([sys.executable, '-m', 'cryopick_plugin', '--help'], capture_output=True, text=True)
    assert out.returncode == 0 and 'usage: cryopick' in out.stdout


def test_empty_coordinate_table_keeps_its_columns(tmp_path):
    for micrograph, cols in ((False, [star.TOMO, star.X, star.Y, star.Z]), (True, [star.MIC, star.X, star.Y])):
        table = star.coordinates_frame(np.zeros((0,)), 'v', scores=[], micrograph=micrograph)
        assert len(table) == 0 and all(c in table.columns for c in cols)


@pytest.mark.parametrize('umask', [0o022, 0o027, 0o002])
def test_atomic_writes_leave_the_permissions_a_plain_open_gives(tmp_path, umask):
    # mkstemp makes 0600 files; outputs shared in a Scipion project must be readable by the group.
    old = os.umask(umask)
    try:
        assert mrc.current_umask() == umask
        with open(tmp_path / 'plain.txt', 'w') as fh:
            fh.write('x')
        expected = os.stat(tmp_path / 'plain.txt').st_mode & 0o777
        assert expected == 0o666 & ~umask
        mrc.write_mrc(tmp_path / 'v.mrc', np.zeros((3, 4, 5), np.float32))
        star.write_coordinates(tmp_path / 'c.star', star.coordinates_frame(np.ones((2, 3))))
        with mrc.new_volume(tmp_path / 'n.mrc', (2, 3, 4)) as data:
            data[:] = 1
        for name in ('v.mrc', 'c.star', 'n.mrc'):
            assert os.stat(tmp_path / name).st_mode & 0o777 == expected, name
        # overwriting keeps the mode the file already had, as open(path, 'w') would
        os.chmod(tmp_path / 'c.star', 0o640)
        star.write_coordinates(tmp_path / 'c.star', star.coordinates_frame(np.ones((3, 3))))
        assert os.stat(tmp_path / 'c.star').st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
