"""DoG candidate picking: blob centres, polarity, tiling invariance, caps, thresholds, bad input."""
import numpy as np
import pytest

from cryopick_plugin.commands import main as cli
from cryopick_plugin.engine.disca import dog
from cryopick_plugin.engine.io import mrc, star
from cryopick_plugin.engine.errors import InputError
from cryopick_plugin.engine.evaluate import match_points

SHAPE = (40, 48, 56)
CENTRES = np.array([[10, 12, 12], [10, 34, 40], [28, 16, 38], [30, 36, 14], [20, 26, 26], [29, 38, 44]])  # z,y,x


def blob_volume(noise=0.3, sign=-1.0, seed=0, diameter=8):
    """Gaussian blobs (σ = radius/√3) of amplitude 1 in Gaussian noise; dark when sign < 0."""
    rng = np.random.default_rng(seed)
    vol = rng.normal(0, noise, SHAPE).astype(np.float32)
    zz, yy, xx = np.indices(SHAPE)
    sigma = diameter / 2 / np.sqrt(3)
    for c in CENTRES:
        r2 = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2
        vol += sign * np.exp(-r2 / (2 * sigma ** 2)).astype(np.float32)
    return vol


def zyx(table):
    return star.xyz_array(table)[:, ::-1]


def test_finds_blob_centres():
    picks = dog.dog_pick(blob_volume(), diameter=8, n_max=len(CENTRES))
    assert len(picks) == len(CENTRES)
    pairs, _ = match_points(zyx(picks), CENTRES, radius=2.0)
    assert len(pairs) == len(CENTRES)
    err = np.abs(zyx(picks)[pairs[:, 0]] - CENTRES[pairs[:, 1]])
    assert err.max() <= 1
    # scores are in noise units: the blobs stand far above the strongest noise maximum
    every = dog.dog_pick(blob_volume(), diameter=8)
    assert every[star.SCORE].iloc[len(CENTRES) - 1] > 2 * every[star.SCORE].iloc[len(CENTRES)]
    assert np.all(np.diff(every[star.SCORE].to_numpy()) <= 0)


def test_polarity_matters():
    vol = blob_volume(sign=-1.0)
    bright = dog.dog_pick(vol, diameter=8, polarity='bright', n_max=len(CENTRES))
    pairs, _ = match_points(zyx(bright), CENTRES, radius=2.0)
    assert len(pairs) == 0
    both = dog.dog_pick(vol, diameter=8, polarity='both', n_max=len(CENTRES))
    assert len(match_points(zyx(both), CENTRES, radius=2.0)[0]) == len(CENTRES)
    found = dog.dog_pick(-vol, diameter=8, polarity='bright', n_max=len(CENTRES))
    assert len(match_points(zyx(found), CENTRES, radius=2.0)[0]) == len(CENTRES)


def test_tiled_equals_untiled_on_memmap(tmp_path):
    path = tmp_path / 'tomo.mrc'
    mrc.write_mrc(path, blob_volume(noise=1.0, seed=4))
    volume, _ = mrc.open_volume(path)
    whole = dog.dog_pick(volume, diameter=8, tile=128)
    tiled = dog.dog_pick(volume, diameter=8, tile=9)
    assert len(whole) > len(CENTRES)
    assert whole.equals(tiled)


def test_cap_min_distance_and_border():
    vol = blob_volume(noise=1.0, seed=2)
    capped = dog.dog_pick(vol, diameter=8, n_max=3)
    assert len(capped) == 3
    every = dog.dog_pick(vol, diameter=8)
    np.testing.assert_array_equal(star.xyz_array(capped), star.xyz_array(every)[:3])
    for md in (None, 12.0):
        picks = dog.dog_pick(vol, diameter=8, min_distance=md)
        xyz = star.xyz_array(picks)
        d = np.linalg.norm(xyz[:, None] - xyz[None], axis=-1) + np.eye(len(xyz)) * 1e9
        assert d.min() >= (md or 4.0)
    wide = dog.dog_pick(vol, diameter=8, min_distance=12.0)
    assert len(wide) < len(every)
    far = dog.dog_pick(vol, diameter=8, exclude_border=6)
    z = zyx(far)
    assert z.min() >= 6 and np.all(z <= np.array(SHAPE) - 7)
    assert len(dog.dog_pick(vol, diameter=8, threshold=4.0)) < len(every)


def test_choose_threshold_separates_blobs_from_noise():
    vol = blob_volume(noise=0.5, seed=5)
    picks = dog.dog_pick(vol, diameter=8, volume_name='TS')
    truth = star.coordinates_frame(CENTRES[:, ::-1], 'TS')
    t = dog.choose_threshold([picks], [truth], radius=2.0)
    kept = picks[picks[star.SCORE] >= t]
    assert len(kept) == len(CENTRES)
    curve = dog.threshold_curve(picks, truth, radius=2.0)
    assert curve['f1'].max() == 1.0 and curve['f1'][-1] < 1.0


def test_bad_input():
    vol = blob_volume()
    with pytest.raises(InputError):
        dog.dog_pick(vol[0], diameter=8)
    with pytest.raises(InputError):
        dog.dog_pick(vol, diameter=0)
    with pytest.raises(InputError):
        dog.dog_pick(vol, diameter=8, polarity='grey')
    with pytest.raises(InputError):
        dog.dog_pick(np.ones(SHAPE, np.float32), diameter=8)
    bad = vol.copy()
    bad[3, 3, 3] = np.nan
    with pytest.raises(InputError, match='NaN'):
        dog.dog_pick(bad, diameter=8)


def test_command_line(tmp_path, capsys):
    path = tmp_path / 'TS_07.mrc'
    mrc.write_mrc(path, blob_volume(), voxel_size=10)
    out = tmp_path / 'picks.star'
    assert cli(['dog-pick', str(path), '--diameter', '8', '--max-picks', '6', '--out', str(out)]) == 0
    table = star.read_coordinates(out)
    assert len(table) == 6 and set(table[star.TOMO]) == {'TS_07'}
    assert len(match_points(zyx(table), CENTRES, radius=2.0)[0]) == 6
    const = tmp_path / 'flat.mrc'
    mrc.write_mrc(const, np.zeros(SHAPE, np.float32))
    assert cli(['dog-pick', str(const), '--diameter', '8', '--out', str(tmp_path / 'x.star')]) == 2
    assert 'flat.mrc' in capsys.readouterr().err and not (tmp_path / 'x.star').exists()


def scattered_blobs(seed, noise=0.5, shape=(48, 64, 64), n=16, diameter=8):
    """n dark Gaussian blobs at least 12 voxels apart in Gaussian noise, and their centres (z, y, x)."""
    rng = np.random.default_rng(100 + seed)
    centres = []
    while len(centres) < n:
        c = rng.uniform(6, np.array(shape) - 6)
        if all(np.linalg.norm(c - q) > 12 for q in centres):
            centres.append(c)
    centres = np.array(centres)
    vol = rng.normal(0, noise, shape).astype(np.float32)
    zz, yy, xx = np.indices(shape)
    sigma = diameter / 2 / np.sqrt(3)
    for c in centres:
        vol -= np.exp(-((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) / (2 * sigma ** 2)).astype(np.float32)
    return vol, centres


def _f1(picks, centres, radius=2.0):
    return 2 * len(match_points(zyx(picks), centres, radius)[0]) / (len(picks) + len(centres))


@pytest.mark.parametrize('seed', [0, 1])
def test_default_threshold_keeps_the_particles_and_drops_the_noise_maxima(seed):
    vol, centres = scattered_blobs(seed)
    picks = dog.dog_pick(vol, diameter=8)
    assert len(picks) > 10 * len(centres) and _f1(picks, centres) < 0.3  # without a threshold: mostly noise
    t = dog.default_threshold(picks[star.SCORE].to_numpy())
    assert _f1(picks[picks[star.SCORE] >= t], centres) >= 0.9


def test_default_threshold_keeps_one_population_whole_and_splits_two():
    rng = np.random.default_rng(0)
    # one log-normal population (a crowded tomogram: every candidate is a particle): a two-component fit
    # would cut it at its median, the separation test keeps it whole
    assert dog.default_threshold(rng.lognormal(1.0, 0.3, 300)) == 0.0
    # background maxima around e^0.5 and 40 particles around e^2: the threshold falls between them
    scores = np.concatenate([rng.lognormal(0.5, 0.3, 250), rng.lognormal(2.0, 0.2, 40)])
    t = dog.default_threshold(scores)
    assert np.exp(0.5 + 2 * 0.3) < t < np.exp(2.0 - 2 * 0.2)


def test_default_threshold_keeps_everything_when_there_is_too_little_to_fit():
    assert dog.default_threshold([5.0, 1.0, 3.0]) == 0.0
    assert dog.default_threshold(np.full(50, 2.0)) == 0.0
    assert dog.default_threshold([]) == 0.0


def test_command_threshold_auto_none_and_from_validation(tmp_path, caplog):
    vol, centres = scattered_blobs(0)
    path = tmp_path / 'TS_01.mrc'
    mrc.write_mrc(path, vol, voxel_size=10)
    val, val_centres = scattered_blobs(1)
    mrc.write_mrc(tmp_path / 'TS_02.mrc', val, voxel_size=10)
    star.write_coordinates(tmp_path / 'val.star', star.coordinates_frame(val_centres[:, ::-1], 'TS_02'))
    out = tmp_path / 'picks.star'
    with caplog.at_level('INFO'):
        assert cli(['dog-pick', str(path), '--diameter', '8', '--out', str(out)]) == 0
    assert any('chosen from the scores' in r.getMessage() for r in caplog.records)
    assert _f1(star.read_coordinates(out), centres) >= 0.9
    # none: every positive maximum, as before
    assert cli(['dog-pick', str(path), '--diameter', '8', '--threshold', 'none', '--out', str(out)]) == 0
    assert len(star.read_coordinates(out)) > 10 * len(centres)
    # with a cap and no threshold: the strongest up to the cap (what the Scipion protocol asks for)
    assert cli(['dog-pick', str(path), '--diameter', '8', '--max-picks', '40', '--out', str(out)]) == 0
    assert len(star.read_coordinates(out)) == 40
    caplog.clear()
    with caplog.at_level('INFO'):
        assert cli(['dog-pick', str(path), '--diameter', '8', '--validation', f"{tmp_path / 'TS_02.mrc'}:"
                    f"{tmp_path / 'val.star'}", '--out', str(out)]) == 0
    assert any('chosen on 1 validation tomogram' in r.getMessage() for r in caplog.records)
    assert _f1(star.read_coordinates(out), centres) >= 0.9
    # bad combinations and values: one line, nothing written
    bad = tmp_path / 'bad.star'
    assert cli(['dog-pick', str(path), '--diameter', '8', '--threshold', '3', '--validation',
                f"{tmp_path / 'TS_02.mrc'}:{tmp_path / 'val.star'}", '--out', str(bad)]) == 2
    assert cli(['dog-pick', str(path), '--diameter', '8', '--threshold', 'high', '--out', str(bad)]) == 2
    assert cli(['dog-pick', str(path), '--diameter', '8', '--validation', 'TS_02.mrc', '--out', str(bad)]) == 2
    assert not bad.exists()


def test_command_warns_when_the_scores_form_one_population(tmp_path, caplog):
    # noise only: one population of background maxima, all kept, and the log says what to do instead
    path = tmp_path / 'noise.mrc'
    mrc.write_mrc(path, np.random.default_rng(3).normal(size=(32, 48, 48)).astype(np.float32), voxel_size=10)
    with caplog.at_level('INFO'):
        assert cli(['dog-pick', str(path), '--diameter', '8', '--out', str(tmp_path / 'n.star')]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
    assert dog.threshold_from_scores(star.read_coordinates(tmp_path / 'n.star')[star.SCORE])[1] == 'one population'
    assert len(warnings) == 1 and '--threshold' in warnings[0] and '--validation' in warnings[0]
