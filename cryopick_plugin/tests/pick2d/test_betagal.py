"""β-gal ground truth: circle centres recovered from masks of touching, overlapping and cut circles."""
import cv2
import numpy as np
import pytest

from cryopick_plugin.engine.pick2d import betagal
from cryopick_plugin.engine.errors import InputError
from cryopick_plugin.engine.evaluate import match_points

R = 54


def _draw(shape, centres, radius=R):
    mask = np.zeros(shape, np.uint8)
    for x, y in centres:
        cv2.circle(mask, (int(x), int(y)), radius, 255, -1)
    return mask


def _jpeg(mask):
    ok, buf = cv2.imencode('.jpg', mask, [cv2.IMWRITE_JPEG_QUALITY, 70])
    assert ok
    return cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)


def _assert_same(found, truth, tol=3.0):
    assert len(found) == len(truth)
    pairs, dist = match_points(found, truth, tol)
    assert len(pairs) == len(truth), (found, truth)
    assert dist.max() <= tol


def test_touching_overlapping_and_cut_circles_exact_within_3px():
    truth = np.array([
        [150, 150],                        # alone
        [400, 150], [508, 150],            # touching (distance = diameter)
        [300, 400], [390, 400], [345, 478],  # three overlapping by ~18 px
        [700, 300], [790, 360],            # overlapping diagonally
        [30, 600],                         # cut by the left border
        [600, 790],                        # cut by the bottom border
        [200, 720], [290, 740],            # overlapping, near the border
    ], dtype=float)
    mask = _jpeg(_draw((800, 900), truth))
    found = betagal.mask_centres(mask >= betagal.MASK_THRESHOLD, R)
    _assert_same(found, truth)


def test_chain_of_touching_circles_gives_one_centre_each():
    truth = np.array([[100 + 100 * i, 200 + (i % 2) * 30] for i in range(6)], dtype=float)
    found = betagal.mask_centres(_draw((400, 800), truth) > 0, R)
    _assert_same(found, truth)


def test_empty_mask_and_small_smudge():
    assert betagal.mask_centres(np.zeros((50, 60), bool), R).shape == (0, 2)
    mask = np.zeros((300, 300), bool)
    mask[100:110, 100:110] = True  # far below a quarter of a disk: not a particle
    assert len(betagal.mask_centres(mask, R)) == 0
    with pytest.raises(InputError):
        betagal.mask_centres(np.zeros((3, 3, 3), bool), R)


def test_frame_conversion_flips_rows():
    c = np.array([[10.0, 0.0], [5.0, 99.0]])
    assert np.allclose(betagal.to_mrc_frame(c, 100), [[10, 99], [5, 0]])


def test_real_mask_count_and_coverage():
    recs_dir = betagal.default_betagal_dir()
    name = 'Falcon_2012_06_12-15_07_41_0'
    rec = betagal.load_betagal(recs_dir, names=[name])[0]
    mask = cv2.imread(rec.mask, cv2.IMREAD_GRAYSCALE) >= 128
    disk = np.pi * R ** 2
    n = len(rec.centres)
    # Overlap makes the union smaller than n disks, never larger.
    assert mask.sum() / disk * 0.95 <= n <= mask.sum() / disk * 1.5
    assert rec.shape == mask.shape and rec.pixel_size == pytest.approx(1.77)
    assert np.all((rec.centres >= 0) & (rec.centres < np.array(mask.shape[::-1])))
    drawn = _draw(mask.shape, rec.centres) > 0
    assert (drawn & mask).sum() / (drawn | mask).sum() > 0.97
    table = betagal.truth_frame([rec])
    assert len(table) == n and set(table['rlnMicrographName']) == {name + '.jpg'}
