"""Weak labels: exact shapes and sizes, the overlap rule, slab-wise writing and the `labels` command."""
import argparse
import itertools

import numpy as np
import pandas as pd
import pytest

from cryopick_plugin.commands import labels as labels_cmd
from cryopick_plugin.engine.pick3d import labels
from cryopick_plugin.engine.io import mrc, star
from cryopick_plugin.engine.errors import InputError


def _count(r, limit_sq):
    """Lattice points of the (2r+1)³ cube within squared distance `limit_sq` of the centre."""
    rng = range(-r, r + 1)
    return sum(1 for i, j, k in itertools.product(rng, rng, rng) if i * i + j * j + k * k <= limit_sq)


@pytest.mark.parametrize('diameter', [3, 5, 7, 11])
def test_single_label_voxel_counts(diameter):
    r = diameter // 2
    shape = (24, 25, 26)
    centre = [[12.0, 11.0, 10.0]]  # x, y, z
    counts = {kind: int(np.count_nonzero(labels.make_labels(shape, centre, [1], diameter, kind)))
              for kind in labels.KINDS}
    assert counts['cube'] == (2 * r + 1) ** 3
    assert counts['ball'] == _count(r, r * r)
    assert counts['tball'] == _count(r, 2 * r * r)
    assert counts['ball'] < counts['tball'] < counts['cube']


def test_known_small_shapes_and_centring():
    # r = 1: ball = centre + 6 faces, tball adds the 12 edges, cube adds the 8 corners
    one = {k: int(labels.label_template(3, k)[0].sum()) for k in labels.KINDS}
    assert one == {'ball': 7, 'tball': 19, 'cube': 27}
    lab = labels.make_labels((9, 9, 9), [[2.4, 5.0, 6.6]], [3], 3, 'ball')  # rounds to x=2, y=5, z=7
    zz, yy, xx = np.nonzero(lab)
    assert (zz.mean(), yy.mean(), xx.mean()) == (7, 5, 2)
    assert set(np.unique(lab)) == {0, 3}
    # an even diameter is rounded up to the next odd one
    assert np.array_equal(labels.make_labels((9, 9, 9), [[4, 4, 4]], [1], 4, 'tball'),
                          labels.make_labels((9, 9, 9), [[4, 4, 4]], [1], 5, 'tball'))


def test_overlap_goes_to_the_nearest_centre_not_the_larger_class():
    shape = (11, 11, 21)
    xyz = [[8.0, 5.0, 5.0], [12.0, 5.0, 5.0]]  # 4 voxels apart along x, cubes of side 7 overlap
    lab = labels.make_labels(shape, xyz, [1, 2], 7, 'cube')
    row = lab[5, 5]
    assert list(row[5:10]) == [1] * 5           # nearer to the class-1 centre
    assert list(row[11:16]) == [2] * 5          # nearer to the class-2 centre
    assert row[10] == 1                         # equidistant: the particle listed first
    lab_rev = labels.make_labels(shape, xyz[::-1], [2, 1], 7, 'cube')
    assert lab_rev[5, 5, 10] == 2
    # each particle keeps a label centred on itself: its own class at its centre
    assert lab[5, 5, 8] == 1 and lab[5, 5, 12] == 2


def test_clipped_at_the_border_and_per_class_diameters():
    lab = labels.make_labels((10, 10, 10), [[0, 0, 0], [6, 6, 6]], [1, 2], {1: 5, 2: 3}, 'cube')
    assert np.count_nonzero(lab == 1) == 27      # the 5³ cube cut to its 3³ octant
    assert np.count_nonzero(lab == 2) == 27
    with pytest.raises(InputError):
        labels.make_labels((10, 10, 10), [[5, 5, 5]], [2], {1: 5}, 'cube')
    with pytest.raises(InputError):
        labels.make_labels((10, 10, 10), [[5, 5, 5]], [1], 5, 'sphere')
    spec = labels.parse_class_diameters('default:11, 2:7')
    assert spec == {'default': 11, 2: 7}
    assert labels.diameters_by_class([1, 2, 3], spec) == {1: 11, 2: 7, 3: 11}


def test_written_slab_by_slab_equals_in_memory(tmp_path):
    rng = np.random.default_rng(0)
    shape = (30, 20, 24)
    xyz = rng.uniform(0, 1, (25, 3)) * (np.array(shape[::-1]) - 1)
    classes = rng.integers(1, 4, 25)
    table = star.coordinates_frame(xyz, 'tomo', classes=classes)
    diam = {1: 5, 2: 7, 3: 3}
    out = tmp_path / 'lab.mrc'
    # 2 planes per slab: labels crossing slab borders must still be whole
    labels.write_label_map(out, shape, table, diam, 'tball', voxel_size=7.5, max_bytes=2 * 20 * 24 * 5)
    data, voxel = mrc.open_volume(out)
    # uint8 is stored as MRC mode 6 (uint16) by the shared writer
    assert data.dtype.kind == 'u' and voxel == pytest.approx(7.5)
    assert np.array_equal(np.asarray(data), labels.make_labels(shape, xyz, classes, diam, 'tball'))
    # the diameter can be read back from a label map (training does this when none is given)
    sparse = [[5, 5, 5], [15, 12, 20], [10, 14, 12]]
    lab = labels.make_labels(shape, sparse, [1, 2, 2], {1: 7, 2: 5}, 'tball')
    assert labels.estimate_diameters(lab, sparse, [1, 2, 2]) == {1: 7, 2: 5}


def _run(argv):
    parser = argparse.ArgumentParser()
    labels_cmd.add_args(parser)
    return labels_cmd.main(parser.parse_args([str(a) for a in argv]))


def test_labels_command_filters_by_tomogram_and_rejects_bad_input(tmp_path):
    tomo = tmp_path / 'TS_01.mrc'
    mrc.write_mrc(tomo, np.random.default_rng(1).normal(size=(16, 20, 24)).astype(np.float32), 10.0)
    table = pd.concat([star.coordinates_frame([[5, 6, 7], [15, 12, 8]], 'TS_01', classes=[1, 2]),
                       star.coordinates_frame([[1, 1, 1]], 'TS_02')], ignore_index=True)
    coords = tmp_path / 'c.star'
    star.write_coordinates(coords, table)
    out = tmp_path / 'lab.mrc'
    assert _run([tomo, coords, '--diameter', 5, '--diameter-per-class', '2:3', '--shape', 'cube',
                 '--out', out]) == 0
    lab, voxel = mrc.open_volume(out)
    assert voxel == pytest.approx(10.0)
    assert np.count_nonzero(lab == 1) == 125 and np.count_nonzero(lab == 2) == 27
    assert lab[1, 1, 1] == 0  # the TS_02 row is not used

    star.write_coordinates(coords, star.coordinates_frame([[5, 6, 30]], 'TS_01'))
    with pytest.raises(InputError, match='outside'):
        _run([tomo, coords, '--diameter', 5, '--out', tmp_path / 'bad.mrc'])
    star.write_coordinates(coords, star.coordinates_frame([[5, 6, 7]], 'TS_09'))
    with pytest.raises(InputError, match='TS_01'):
        _run([tomo, coords, '--diameter', 5, '--out', tmp_path / 'bad.mrc'])
    star.write_coordinates(coords, star.coordinates_frame([[5, 6, 7]], 'TS_01'))
    with pytest.raises(InputError):
        _run([tomo, coords, '--diameter', 5, '--diameter-per-class', '1=3', '--out', tmp_path / 'bad.mrc'])
    assert not (tmp_path / 'bad.mrc').exists()


@pytest.mark.parametrize('particle, label', [(22, 11), (33.6, 17), (20.4, 11), (38.2, 19), (16.75, 9),
                                             (24, 13), (4, 3), (2, 3)])
def test_label_diameter_is_about_half_the_particle_and_odd(particle, label):
    assert labels_cmd.label_diameter(particle) == label


def test_labels_command_takes_the_particle_diameter(tmp_path):
    tomo = tmp_path / 'TS_01.mrc'
    mrc.write_mrc(tomo, np.random.default_rng(2).normal(size=(30, 30, 30)).astype(np.float32), 10.0)
    coords = tmp_path / 'c.star'
    star.write_coordinates(coords, star.coordinates_frame([[8, 8, 8], [20, 20, 20]], 'TS_01', classes=[1, 2]))
    assert _run([tomo, coords, '--particle-diameter', 10, '--particle-diameter-per-class', '2:14',
                 '--shape', 'cube', '--out', tmp_path / 'p.mrc']) == 0
    lab, _ = mrc.open_volume(tmp_path / 'p.mrc')
    # 10 → label 5 (5³ cube), 14 → label 7 (7³ cube)
    assert np.count_nonzero(lab == 1) == 125 and np.count_nonzero(lab == 2) == 343
    from cryopick_plugin.commands import build_parser
    with pytest.raises(SystemExit):  # one size or the other, not both
        build_parser().parse_args(['labels', str(tomo), str(coords), '--diameter', '5',
                                   '--particle-diameter', '10', '--out', 'x.mrc'])
    with pytest.raises(SystemExit):  # one of them is required
        build_parser().parse_args(['labels', str(tomo), str(coords), '--out', 'x.mrc'])


def _help_lines(command):
    import argparse
    from cryopick_plugin.commands import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return sub, sub.formatter_class(prog=command)


def test_train3d_help_shows_every_default_the_label_diameter_and_the_cost():
    sub, formatter = _help_lines('train3d')
    for action in sub._actions:
        if not action.option_strings or action.nargs == 0 or action.required:
            continue
        text = formatter._get_help_string(action) % {'default': action.default}
        assert 'default' in text.lower(), f"{action.option_strings[0]} does not say its default: {text!r}"
    text = ' '.join(sub.format_help().split())
    assert '--particle-diameter' in text and 'half the particle diameter, odd' in text
    assert 'per step in fp32' in text and 'bf16' in text
    labels_help = ' '.join(_help_lines('labels')[0].format_help().split())
    assert '--particle-diameter' in labels_help and 'half the particle diameter, odd' in labels_help


def test_train3d_turns_particle_diameters_into_label_diameters():
    from cryopick_plugin.commands import build_parser, train3d
    args = build_parser().parse_args(['train3d', '--train', 'a:b:c', '--out', 'm.pt', '--particle-diameter', '22',
                                      '--particle-diameter-per-class', '2:33.6'])
    assert train3d.diameter_spec(args) == {'default': 11, 2: 17}
    args = build_parser().parse_args(['train3d', '--train', 'a:b:c', '--out', 'm.pt'])
    assert train3d.diameter_spec(args) == {}
