"""CryoSegNet's written scores against its thresholds, and training from particle masks."""
import json
import os

import numpy as np
import pytest

from cryopick_plugin.commands import main as cli
from cryopick_plugin.engine.io import model_io, star
from cryopick_plugin.engine.io.mrc import write_mrc
from cryopick_plugin.engine.pick2d.cryosegnet import picker as cs, sam as sam_picking

from .test_cryosegnet import DIAMETER, synthetic_micrograph


def _disks(shape, centres, radii, values):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    out = np.zeros(shape, np.float32)
    for (x, y), r, v in zip(centres, radii, values):
        out[np.hypot(xx - x, yy - y) <= r] = v
    return out


def test_unet_scores_are_the_thresholded_values_so_the_star_filter_keeps_every_pick(tmp_path):
    # Blobs just above the threshold, some narrow (inscribed radius 0.45 of the particle's): smoothing
    # pulls a narrow blob's centre far below the threshold, the value it was picked at does not.
    d, threshold = 24, 0.5
    centres = [(40, 40), (120, 40), (200, 40), (40, 140), (120, 140), (200, 140)]
    radii = [12, 5.5, 12, 5.5, 9, 5.5]
    values = [0.9, 0.55, 0.51, 0.6, 0.52, 0.505]
    prob = _disks((200, 240), centres, radii, values)
    picks = cs.picks_from_map(prob, d, threshold=threshold, edge_margin=0)
    assert len(picks) == len(centres)
    path = tmp_path / 'p.star'
    star.write_coordinates(path, star.coordinates_frame(star.xyz_array(picks), 'm.mrc',
                                                        scores=picks[star.SCORE].to_numpy(), micrograph=True))
    back = star.read_coordinates(path, dims=2)
    assert len(back[back[star.SCORE] >= threshold]) == len(centres)
    # and the score still ranks: the brightest blob first, the faintest last
    np.testing.assert_allclose(sorted(back[star.SCORE]), sorted(values), atol=1e-5)
    # the smoothed map the old scores came from is below the threshold at the narrow blobs
    from scipy import ndimage
    smooth = ndimage.gaussian_filter(prob, d / 2 / 3)
    assert sum(smooth[y, x] < threshold for x, y in centres) >= 3


def test_sam_scores_are_the_filtered_iou():
    iou_filter = 0.94
    records = [{'bbox': [10 + 40 * i, 10, 20, 20], 'predicted_iou': iou} for i, iou in
               enumerate([0.9400004, 0.95, 0.97, 0.93, 0.99])]
    picks = sam_picking.filter_sam_records(records, iou_filter=iou_filter)
    assert len(picks) == 4 and (picks[star.SCORE] > iou_filter).all()


def _micrographs_with_masks(folder, n, seed, mask_ext='.png'):
    import cv2
    rng = np.random.default_rng(seed)
    paths, truths = [], []
    (folder / 'masks').mkdir()
    for i in range(n):
        image, centres = synthetic_micrograph(rng, n=8)
        path = str(folder / f'mic{i}.mrc')
        write_mrc(path, image, 1.5)
        mask = _disks(image.shape, centres, [DIAMETER / 2] * len(centres), [255] * len(centres)).astype(np.uint8)
        cv2.imwrite(str(folder / 'masks' / f'mic{i}_mask{mask_ext}'), mask)
        paths.append(path)
        truths.append(centres)
    return paths, truths


def test_mask_centres_separate_touching_and_border_cut_particles(tmp_path):
    import cv2
    from cryopick_plugin.commands import train_cryosegnet as cmd
    centres = np.array([(30, 30), (100, 35), (40, 100), (60, 170), (87, 170), (170, 120), (195, 60)], float)
    mask = _disks((200, 200), centres, [15] * len(centres), [255] * len(centres)).astype(np.uint8)
    # JPEG blurs the edges, as in the shared β-gal masks
    cv2.imwrite(str(tmp_path / 'm_mask.jpg'), cv2.GaussianBlur(mask, (5, 5), 1.0))
    found, = cmd.centres_from_masks([str(tmp_path / 'm_mask.jpg')], [(200, 200)], 30)
    assert len(found) == len(centres)
    dist = np.linalg.norm(centres[:, None] - found[None], axis=2)
    assert dist.min(axis=1).max() <= 1.5


def test_train_command_takes_masks_as_labels(tmp_path):
    from cryopick_plugin.commands import train_cryosegnet as cmd
    paths, truths = _micrographs_with_masks(tmp_path, 2, seed=5)
    masks = cmd.mask_paths(paths, [str(tmp_path / 'masks')])
    assert [os.path.basename(m) for m in masks] == ['mic0_mask.png', 'mic1_mask.png']
    for got, true in zip(cmd.centres_from_masks(masks, [(128, 128)] * 2, DIAMETER), truths):
        assert len(got) == len(true)
        assert np.linalg.norm(got[:, None] - true[None], axis=2).min(axis=1).max() <= 1.5  # whole pixels
    out = tmp_path / 'm.pt'
    assert cli(['train-cryosegnet', '--micrographs', *paths, '--masks', str(tmp_path / 'masks'),
                '--diameter', str(DIAMETER), '--out', str(out), '--epochs', '0', '--input-size', '128',
                '--no-preprocess', '--device', 'cpu']) == 0  # 0 epochs: the labels, not the training, are tested
    _, _, meta = model_io.load_model(str(out), 'cryosegnet')
    assert meta['n_particles'] == sum(len(t) for t in truths)


def test_mask_problems_are_one_line_errors_before_training(tmp_path, capsys):
    import cv2
    paths, _ = _micrographs_with_masks(tmp_path, 2, seed=6)
    os.remove(tmp_path / 'masks' / 'mic1_mask.png')
    out = tmp_path / 'no.pt'
    base = ['train-cryosegnet', '--micrographs', *paths, '--diameter', str(DIAMETER), '--out', str(out),
            '--epochs', '1', '--device', 'cpu']
    assert cli(base + ['--masks', str(tmp_path / 'masks')]) == 2
    assert 'no mask for mic1.mrc' in capsys.readouterr().err
    cv2.imwrite(str(tmp_path / 'small.png'), np.zeros((64, 64), np.uint8))
    assert cli(base + ['--masks', str(tmp_path / 'masks' / 'mic0_mask.png'), str(tmp_path / 'small.png')]) == 2
    err = capsys.readouterr().err
    assert 'small.png' in err and '64 × 64' in err
    assert cli(base + ['--masks', str(tmp_path / 'masks' / 'mic0_mask.png')]) == 2  # one mask for two micrographs
    with pytest.raises(SystemExit):  # masks or coordinates, not both
        cli(base + ['--masks', 'x.png', '--coords', 'y.star'])
    assert not out.exists()
