"""CryoSegNet engine: network size, training on synthetic disks, picking, orientation, SAM wiring and
post-processing, fine-tuning, bad input, and the two commands.

No SAM weights exist offline: the SAM tests build a tiny, randomly initialised Sam from segment_anything's
own modules (one-block ViT encoder, 128-pixel input) to run the automatic-mask-generator wiring end to end;
the post-processing logic is checked on hand-made mask records with known answers.
"""
import os
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch

from cryopick_plugin.engine.pick2d.cryosegnet import attention_unet, picker as cs, sam as sam_picking
from cryopick_plugin.engine.io import model_io, star
from cryopick_plugin.engine.errors import InputError

DIAMETER = 12
TINY = {'base_width': 4, 'levels': 5}


def synthetic_micrograph(rng, shape=(128, 128), n=12, diameter=DIAMETER, rows=None):
    """Gaussian noise with n dark disks that do not touch; `rows` = (lo, hi) limits the centres' rows."""
    h, w = shape
    lo, hi = rows if rows else (diameter, h - diameter)
    image = rng.normal(0.0, 1.0, shape).astype(np.float32)
    centres = []
    for _ in range(10000):
        if len(centres) == n:
            break
        p = np.array([rng.uniform(diameter, w - diameter), rng.uniform(lo, hi)])
        if all(np.hypot(*(p - q)) >= 1.15 * diameter for q in centres):
            centres.append(p)
    centres = np.array(centres)
    yy, xx = np.mgrid[:h, :w]
    for x, y in centres:
        image[np.hypot(xx - x, yy - y) <= diameter / 2] -= 1.5
    return image, centres


def f1_score(pred, true, radius):
    try:
        from cryopick_plugin.engine.evaluate import match_points
        pairs, _ = match_points(pred, true, radius)
        tp = len(pairs)
    except ImportError:
        from scipy.optimize import linear_sum_assignment
        from scipy.spatial.distance import cdist
        if len(pred) == 0 or len(true) == 0:
            return 0.0
        dist = cdist(pred, true)
        cost = np.where(dist <= radius, dist, 1e6)
        r, c = linear_sum_assignment(cost)
        tp = int((dist[r, c] <= radius).sum())
    return 2.0 * tp / (len(pred) + len(true)) if len(pred) + len(true) else 1.0


def tiny_sam(img_size=128, dim=32, seed=0):
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
    torch.manual_seed(seed)
    grid = img_size // 16
    sam = Sam(
        image_encoder=ImageEncoderViT(img_size=img_size, patch_size=16, in_chans=3, embed_dim=dim, depth=1,
                                      num_heads=2, mlp_ratio=2, out_chans=dim, qkv_bias=True,
                                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=False,
                                      window_size=0, global_attn_indexes=()),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(grid, grid),
                                     input_image_size=(img_size, img_size), mask_in_chans=4),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=dim,
                                 transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2),
                                 iou_head_depth=1, iou_head_hidden_dim=16))
    return sam.eval()


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A tiny U-Net trained on five synthetic 128² micrographs (a few seconds on one core)."""
    rng = np.random.default_rng(0)
    data = [synthetic_micrograph(rng) for _ in range(5)]
    path = str(tmp_path_factory.mktemp('csn') / 'tiny.pt')
    history = cs.train_cryosegnet([d[0] for d in data], [d[1] for d in data], DIAMETER, path, preset=TINY,
                                  epochs=12, batch_size=4, lr=3e-3, val_fraction=0.2, input_size=128,
                                  crop_size=64, device='cpu', seed=0, log=lambda msg: None)
    return path, history


# ------------------------------------------------------------------------------------------ network

def test_parameter_counts_and_shapes():
    paper = attention_unet.preset_arch('paper')
    cpu = attention_unet.preset_arch('cpu')
    n_paper = attention_unet.count_parameters(paper)
    assert abs(n_paper - 131.4e6) / 131.4e6 < 0.01
    assert abs(attention_unet.count_macs(paper, 1024) - 1.19e12) / 1.19e12 < 0.02
    assert cpu['base_width'] * 8 <= paper['base_width']
    assert attention_unet.count_parameters(cpu) < n_paper / 50
    net = attention_unet.build(cpu).eval()
    with torch.no_grad():
        out = net(torch.zeros(2, 1, 64, 96))
    assert out.shape == (2, 1, 64, 96)
    assert sum(p.numel() for p in net.parameters()) == attention_unet.count_parameters(cpu)


def test_disk_target_follows_pixel_centres_in_non_square_frame():
    # a 64 × 128 micrograph in a 64² input: scale 0.5, content in the top 32 rows
    target = cs.disk_target([[10.0, 20.0]], 8, (64, 128), 64)
    assert target[32:].sum() == 0
    yy, xx = np.mgrid[:64, :64]
    cx, cy = (target * xx).sum() / target.sum(), (target * yy).sum() / target.sum()
    assert abs(cx - 4.75) < 0.05 and abs(cy - 9.75) < 0.05
    assert abs(target.sum() - np.pi * 2 ** 2) < 1.0
    square, (h, w) = cs.to_network(np.linspace(0, 1, 64 * 128, dtype=np.float32).reshape(64, 128), 64)
    assert square.shape == (64, 64) and (h, w) == (32, 64)


# ----------------------------------------------------------------------------------- train and pick

def test_training_learns_disks_and_picks_them(trained):
    path, history = trained
    assert history[0]['epoch'] == 0 and len(history) == 13
    best = max(row['val_dice'] for row in history)
    assert best > 0.7 > history[0]['val_dice']
    arch, _, meta = model_io.load_model(path, 'cryosegnet')
    assert arch['base_width'] == 4 and meta['input_size'] == 128 and meta['diameter_px'] == DIAMETER
    assert meta['best_val_dice'] == pytest.approx(best)
    assert len(meta['val_micrographs']) == 1 and len(meta['train_micrographs']) == 4
    # the picking threshold was chosen on the held-out micrograph and is the default of picking
    assert meta['threshold'] in cs.THRESHOLD_GRID and meta['threshold_source'].startswith('F1')
    assert meta['threshold_val_f1'] >= 0.8
    image, centres = synthetic_micrograph(np.random.default_rng(42))
    picks, diag = cs.cryosegnet_pick(image, path, device='cpu')
    assert list(picks.columns) == cs.COLUMNS and diag['path'] == 'unet'
    assert diag['prob'].shape == image.shape and diag['threshold'] == meta['threshold']
    assert f1_score(star.xyz_array(picks), centres, DIAMETER / 2) >= 0.8


def test_new_network_starts_at_the_particle_prior(tmp_path):
    rng = np.random.default_rng(5)
    data = [synthetic_micrograph(rng) for _ in range(2)]
    path = str(tmp_path / 'untrained.pt')
    cs.train_cryosegnet([d[0] for d in data], [d[1] for d in data], DIAMETER, path, preset=TINY, epochs=0,
                        input_size=128, device='cpu', seed=0, log=lambda msg: None)
    model = cs.load_cryosegnet(path, 'cpu')
    train = [i for i, name in enumerate(['micrograph 1', 'micrograph 2']) if name in model.meta['train_micrographs']]
    share = np.mean([cs.disk_target(data[i][1], DIAMETER, data[i][0].shape, 128).mean() for i in train])
    assert 0.05 < share < 0.3
    # sigmoid(bias) is the share of particle pixels, so the untrained map sits near it, not at 0.5
    assert torch.sigmoid(model.net.head.bias).item() == pytest.approx(share, rel=1e-4)
    prob = cs.predict_map(data[0][0], model)
    assert abs(float(prob.mean()) - share) < 0.15 and prob.max() < 0.5


def test_non_square_micrograph_keeps_aspect(trained):
    path, _ = trained
    # 64 rows × 128 columns fits the 128 input at scale 1: particles keep the size the model learnt
    image, centres = synthetic_micrograph(np.random.default_rng(7), shape=(64, 128), n=6)
    prob = cs.predict_map(image, path, device='cpu')
    assert prob.shape == (64, 128)
    picks = cs.picks_from_map(prob, DIAMETER)
    assert f1_score(star.xyz_array(picks), centres, DIAMETER / 2) >= 0.8


def test_unet_picks_of_particles_cut_by_the_edge_are_dropped():
    yy, xx = np.mgrid[:96, :96]
    prob = np.zeros((96, 96), np.float32)
    for x, y in ((48, 48), (3, 40), (70, 94)):     # inside; 3 px from the left edge; 1.5 px from the bottom
        prob[np.hypot(xx - x, yy - y) <= DIAMETER / 2] = 1.0
    kept = star.xyz_array(cs.picks_from_map(prob, DIAMETER))
    assert len(kept) == 1 and np.allclose(kept[0], [48, 48], atol=1)
    every = star.xyz_array(cs.picks_from_map(prob, DIAMETER, edge_margin=0))
    assert len(every) == 3


def test_orientation_rows_as_read(trained):
    """Particles only in the top rows of the array give picks with small row (y) values: no flip."""
    path, _ = trained
    image, centres = synthetic_micrograph(np.random.default_rng(3), n=6, rows=(DIAMETER, 36))
    assert centres[:, 1].max() <= 36
    picks, _ = cs.cryosegnet_pick(image, path, device='cpu')
    xy = star.xyz_array(picks)
    assert len(xy) >= 4 and xy[:, 1].max() < 48
    flipped, _ = cs.cryosegnet_pick(np.flipud(image).copy(), path, device='cpu')
    assert star.xyz_array(flipped)[:, 1].min() > 128 - 48


def test_finetuning_starts_from_saved_weights(trained, tmp_path):
    path, history = trained
    rng = np.random.default_rng(11)
    data = [synthetic_micrograph(rng) for _ in range(2)]
    out = str(tmp_path / 'ft.pt')
    ft = cs.train_cryosegnet([d[0] for d in data], [d[1] for d in data], DIAMETER, out, preset='paper',
                             epochs=0, init_model=path, device='cpu', log=lambda msg: None)
    # before any step the validation Dice is the trained model's, far above a fresh network's
    assert ft[0]['val_dice'] > 0.7
    arch0, state0, _ = model_io.load_model(path, 'cryosegnet')
    arch1, state1, meta1 = model_io.load_model(out, 'cryosegnet')
    assert arch1 == arch0 and meta1['init_model'] == path and meta1['input_size'] == 128
    assert all(torch.equal(state0[k], state1[k]) for k in state0)
    ft1 = cs.train_cryosegnet([d[0] for d in data], [d[1] for d in data], DIAMETER, out, epochs=1, lr=1e-4,
                              init_model=path, device='cpu', log=lambda msg: None)
    assert len(ft1) == 2 and ft1[1]['train_loss'] is not None


def test_learning_rate_schedules(trained, tmp_path):
    path, history = trained   # cosine by default: the rate of each epoch's last step falls to the floor
    rates = [row['lr'] for row in history[1:]]
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert rates[0] > 0.9 * 3e-3 and rates[-1] == pytest.approx(cs.LR_FLOOR * 3e-3)
    assert model_io.load_model(path, 'cryosegnet')[2]['lr_schedule'] == 'cosine'
    rng = np.random.default_rng(12)
    data = [synthetic_micrograph(rng) for _ in range(2)]
    flat = cs.train_cryosegnet([d[0] for d in data], [d[1] for d in data], DIAMETER, str(tmp_path / 'c.pt'),
                               preset=TINY, epochs=2, lr=2e-3, input_size=128, crop_size=64, min_crops_per_epoch=4,
                               lr_schedule='constant', device='cpu', log=lambda msg: None)
    assert [row['lr'] for row in flat[1:]] == [2e-3, 2e-3]
    with pytest.raises(InputError, match='schedule'):
        cs.train_cryosegnet([d[0] for d in data], [d[1] for d in data], DIAMETER, str(tmp_path / 'x.pt'),
                            preset=TINY, epochs=1, lr_schedule='step', device='cpu', log=lambda msg: None)
    assert not (tmp_path / 'x.pt').exists()
    from cryopick_plugin.protocols import protocol_cryosegnet   # the protocol's choices are the engine's
    assert protocol_cryosegnet.LR_SCHEDULES == list(cs.LR_SCHEDULES)


# ------------------------------------------------------------------------------------------- SAM

def test_sam_postprocessing_exact():
    records = [
        {'bbox': [10, 10, 20, 20], 'predicted_iou': 0.97},   # kept
        {'bbox': [50, 60, 20, 20], 'predicted_iou': 0.99},   # kept
        {'bbox': [100, 100, 20, 21], 'predicted_iou': 0.95},  # h within (20 - t/3, 20 + t), t = 0.2·√800/2
        {'bbox': [5, 5, 24, 20], 'predicted_iou': 0.98},     # too wide (24 > 22.83)
        {'bbox': [200, 5, 19, 20], 'predicted_iou': 0.96},   # too narrow (19 < 19.06)
        {'bbox': [0, 0, 20, 20], 'predicted_iou': 0.93},     # IoU not above 0.94
    ]
    picks = sam_picking.filter_sam_records(records, scale=(0.25, 0.25))
    assert list(picks.columns) == cs.COLUMNS
    np.testing.assert_allclose(star.xyz_array(picks), [[241.5, 281.5], [81.5, 81.5], [441.5, 443.5]])
    np.testing.assert_allclose(picks[star.SCORE], [0.99, 0.97, 0.95])
    np.testing.assert_allclose(picks[star.DIAMETER], 84.0)
    # anisotropic scales map each axis on its own
    one = sam_picking.filter_sam_records(records[:1], scale=(0.5, 0.25))
    np.testing.assert_allclose(star.xyz_array(one), [[81.5, 40.5]])
    assert len(sam_picking.filter_sam_records(records, iou_filter=0.995)) == 0


def test_sam_modal_size_tie_uses_expected_diameter():
    records = [{'bbox': [i * 40, 0, w, w], 'predicted_iou': 0.99} for i, w in enumerate([10, 10, 30, 30])]
    small = sam_picking.filter_sam_records(records)
    assert len(small) == 2 and small[star.DIAMETER].iloc[0] == 11
    large = sam_picking.filter_sam_records(records, diameter_px=31)
    assert len(large) == 2 and large[star.DIAMETER].iloc[0] == 31
    assert sorted(star.xyz_array(large)[:, 0]) == [95.0, 135.0]


def test_sam_input_keeps_aspect():
    prob = np.zeros((200, 300), np.float32)
    prob[20:40, 50:70] = 0.8
    img, (sy, sx) = sam_picking.sam_input(prob, 128)
    assert img.shape == (85, 128, 3) and img.dtype == np.uint8
    assert img.max() == 255 and img.min() == 0
    assert sy == pytest.approx(85 / 200) and sx == pytest.approx(128 / 300)


def test_unet_and_tiny_sam_end_to_end(trained):
    path, _ = trained
    image, _ = synthetic_micrograph(np.random.default_rng(5), shape=(160, 200))
    sam = tiny_sam()
    # random SAM weights give arbitrary IoU predictions: every filter is opened to exercise the wiring
    picks, diag = cs.cryosegnet_pick(image, path, sam_model=sam, points_per_side=8, pred_iou_thresh=0.0,
                                     stability_score_thresh=0.0, iou_filter=-np.inf, device='cpu')
    assert diag['path'] == 'sam' and diag['n_masks'] >= 1
    assert isinstance(picks, pd.DataFrame) and list(picks.columns) == cs.COLUMNS
    assert len(picks) >= 1
    xy = star.xyz_array(picks)
    assert np.all((xy >= -0.5) & (xy <= np.array([200, 160]) - 0.5))
    assert np.all(np.diff(picks[star.SCORE].to_numpy()) <= 0)


# ------------------------------------------------------------------------------------------ bad input

def test_load_sam_errors(tmp_path):
    missing = tmp_path / 'sam_vit_h.pth'
    with pytest.raises(InputError, match='not found.*vit_b, vit_l or vit_h'):
        sam_picking.load_sam(missing)
    junk = tmp_path / 'junk.pth'
    junk.write_bytes(b'this is not a checkpoint')
    with pytest.raises(InputError, match=r'junk\.pth.*vit_b, vit_l or vit_h'):
        sam_picking.load_sam(junk)
    other = tmp_path / 'tiny.pth'
    torch.save(tiny_sam().state_dict(), other)
    with pytest.raises(InputError, match=r'tiny\.pth.*width 32.*vit_b, vit_l or vit_h'):
        sam_picking.load_sam(other)
    unet = tmp_path / 'unet.pth'
    torch.save(attention_unet.build(TINY).state_dict(), unet)
    with pytest.raises(InputError, match='no Segment Anything image encoder'):
        sam_picking.load_sam(unet)
    with pytest.raises(InputError, match='unknown SAM model type'):
        sam_picking.load_sam(unet, 'vit_x')


def test_bad_micrographs_and_diameters(trained, tmp_path):
    path, _ = trained
    rgb = np.zeros((64, 64, 3), np.float32)
    with pytest.raises(InputError, match='colour'):
        cs.cryosegnet_pick(rgb, path, device='cpu')
    image, centres = synthetic_micrograph(np.random.default_rng(1), shape=(64, 64), n=2)
    with pytest.raises(InputError, match='does not fit'):
        cs.cryosegnet_pick(image, path, diameter_px=80, device='cpu')
    with pytest.raises(InputError, match='does not fit'):
        cs.train_cryosegnet([image], [centres], 64, str(tmp_path / 'x.pt'), preset=TINY, epochs=1)
    with pytest.raises(InputError, match='colour'):
        cs.train_cryosegnet([rgb], [centres], DIAMETER, str(tmp_path / 'x.pt'), preset=TINY, epochs=1)
    with pytest.raises(InputError, match='outside'):
        cs.train_cryosegnet([image], [centres + 100], DIAMETER, str(tmp_path / 'x.pt'), preset=TINY, epochs=1)
    with pytest.raises(InputError, match='constant'):
        cs.predict_map(np.ones((64, 64)), path, device='cpu')
    assert not os.path.exists(tmp_path / 'x.pt')
    other = tmp_path / 'other.pt'
    model_io.save_model(other, 'disca', {}, {}, {})
    with pytest.raises(InputError, match='expected a cryosegnet model'):
        cs.load_cryosegnet(other, 'cpu')


# ------------------------------------------------------------------------------------------- commands

def _write_micrographs(folder, n, seed):
    from cryopick_plugin.engine.io.mrc import write_mrc
    rng = np.random.default_rng(seed)
    paths, tables = [], []
    for i in range(n):
        image, centres = synthetic_micrograph(rng)
        path = str(folder / f'mic{i}.mrc')
        write_mrc(path, image, 1.5)
        paths.append(path)
        tables.append(star.coordinates_frame(centres, f'mic{i}.mrc', micrograph=True))
    return paths, tables


def test_train_command_with_chain_and_shared_star(tmp_path):
    from cryopick_plugin.commands import main
    paths, tables = _write_micrographs(tmp_path, 2, seed=21)
    shared = str(tmp_path / 'all.star')
    star.write_coordinates(shared, pd.concat(tables, ignore_index=True))
    out = str(tmp_path / 'cmd.pt')
    rc = main(['train-cryosegnet', '--micrographs', *paths, '--coords', shared, '--diameter', str(DIAMETER),
               '--out', out, '--epochs', '1', '--input-size', '128', '--crop-size', '64', '--device', 'cpu'])
    assert rc == 0
    arch, _, meta = model_io.load_model(out, 'cryosegnet')
    assert arch == attention_unet.preset_arch('cpu')
    assert meta['preprocess'] == cs.DEFAULT_CHAIN and meta['pixel_size'] == 1.5
    assert meta['n_particles'] == sum(len(t) for t in tables)
    # a STAR whose names match no micrograph is refused before training
    wrong = str(tmp_path / 'wrong.star')
    star.write_coordinates(wrong, star.coordinates_frame(np.array([[5.0, 5.0]]), 'other.mrc', micrograph=True))
    assert main(['train-cryosegnet', '--micrographs', *paths, '--coords', wrong, '--diameter', '12',
                 '--out', str(tmp_path / 'no.pt')]) == 2
    assert not os.path.exists(tmp_path / 'no.pt')


def test_pick_command_writes_star_per_micrograph(trained, tmp_path):
    from cryopick_plugin.commands import main
    path, _ = trained
    paths, tables = _write_micrographs(tmp_path, 2, seed=31)
    out = tmp_path / 'picks'
    assert main(['cryosegnet', *paths, '--model', path, '--out', str(out), '--no-sam', '--save-maps',
                 '--device', 'cpu']) == 0
    for p, truth in zip(paths, tables):
        stem = os.path.splitext(os.path.basename(p))[0]
        picks = star.read_coordinates(out / f'{stem}_picks.star', dims=2)
        assert {star.MIC, star.X, star.Y, star.SCORE, star.DIAMETER} <= set(picks.columns)
        assert set(picks[star.MIC]) == {os.path.basename(p)}
        assert f1_score(star.xyz_array(picks), star.xyz_array(truth), DIAMETER / 2) >= 0.8
        assert (out / f'{stem}_prob.mrc').exists()
    assert main(['cryosegnet', paths[0], '--model', path, '--out', str(out),
                 '--sam-checkpoint', str(tmp_path / 'missing.pth')]) == 2


def test_tune_threshold_picks_the_level_between_particles_and_junk():
    """Particles at 0.65, junk blobs at 0.55: only a threshold of 0.6 keeps the particles and drops the junk."""
    yy, xx = np.mgrid[0:200, 0:400]
    prob = np.zeros((200, 400), np.float32)
    centres = np.array([[60.0, 60.0], [200.0, 60.0], [330.0, 140.0]])
    for cx, cy in centres:
        prob[(xx - cx) ** 2 + (yy - cy) ** 2 <= 20 ** 2] = 0.65
    for cx, cy in ((60.0, 150.0), (200.0, 150.0)):
        prob[(xx - cx) ** 2 + (yy - cy) ** 2 <= 14 ** 2] = 0.55
    thr, f1 = cs.tune_threshold([prob], [centres], 40.0)
    assert thr == 0.6 and f1 == pytest.approx(1.0)
    assert cs.tune_threshold([prob], [centres], 40.0, grid=(0.5,))[1] == pytest.approx(2 * 3 / (5 + 3))


def _disk_map(particles, junk, n_hidden, level=0.75, junk_level=0.55, spacing=40, radius=10):
    """Probability map with `particles` disks at `level`, `junk` disks at `junk_level` (no particle
    there) and `n_hidden` true particles the map misses; returns (map, true centres)."""
    n = particles + junk + n_hidden
    side = int(np.ceil(np.sqrt(n)))
    prob = np.zeros((side * spacing, side * spacing), np.float32)
    yy, xx = np.mgrid[0:prob.shape[0], 0:prob.shape[1]]
    centres = []
    for i in range(n):
        cx, cy = spacing * (i % side) + spacing / 2, spacing * (i // side) + spacing / 2
        if i < particles:
            prob[(xx - cx) ** 2 + (yy - cy) ** 2 <= radius ** 2] = level
        elif i < particles + junk:
            prob[(xx - cx) ** 2 + (yy - cy) ** 2 <= radius ** 2] = junk_level
            continue
        centres.append((cx, cy))
    return prob, np.array(centres)


def test_tune_threshold_leaves_the_training_level_only_for_a_real_gain():
    # Two junk disks among 100 particles (10 more missed by the map): dropping them at 0.6 gains 0.009
    # in F1, well inside its sampling error (± 0.02): the threshold stays at 0.5.
    prob, centres = _disk_map(100, 2, 10)
    thr, f1 = cs.tune_threshold([prob], [centres], 20.0)
    assert thr == 0.5 and f1 == pytest.approx(2 * 100 / (102 + 110))
    # Thirty junk disks: the gain at 0.6 (0.952 against 0.833) is real and is taken.
    prob, centres = _disk_map(100, 30, 10)
    thr, f1 = cs.tune_threshold([prob], [centres], 20.0)
    assert thr == 0.6 and f1 == pytest.approx(2 * 100 / (100 + 110))


# ---------------------------------------------------------------------------- progress and resuming

class _Interrupt(Exception):
    pass


def test_progress_lines_and_an_interrupted_training_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv('CRYOPICK_PROGRESS_SECONDS', '0')     # a progress line at every step
    rng = np.random.default_rng(14)
    data = [synthetic_micrograph(rng) for _ in range(3)]
    args = ([d[0] for d in data], [d[1] for d in data], DIAMETER)
    kw = dict(preset=TINY, epochs=3, lr=2e-3, input_size=128, crop_size=64, min_crops_per_epoch=4, device='cpu',
              seed=0)
    lines = []
    whole = cs.train_cryosegnet(*args, str(tmp_path / 'whole.pt'), log=lines.append, **kw)
    assert lines[0].startswith('train-cryosegnet: device cpu (') and lines[0].endswith('precision fp32')
    assert any(line.startswith('epoch 2/3: 2/2 steps (100%)') and 'ETA' in line and 'loss' in line
               for line in lines), lines
    assert any(line.startswith('preparing micrographs: 3/3 micrographs') for line in lines)

    def stop_after_first_epoch(message):
        if message.startswith('epoch 1:'):
            raise _Interrupt()        # as a kill right after epoch 1 was saved
    out = str(tmp_path / 'cut.pt')
    with pytest.raises(_Interrupt):
        cs.train_cryosegnet(*args, out, log=stop_after_first_epoch, **kw)
    assert os.path.exists(out + '.checkpoint.pt') and not os.path.exists(out)
    lines = []
    resumed = cs.train_cryosegnet(*args, out, log=lines.append, resume=True, **kw)
    assert any(line.startswith(f'resuming from {out}.checkpoint.pt after epoch 1') for line in lines)
    assert not any(line.startswith(('epoch 0:', 'epoch 1:', 'epoch 1/3')) for line in lines)  # not trained again
    assert [row['epoch'] for row in resumed] == [0, 1, 2, 3]
    assert [row['train_loss'] for row in resumed[1:]] == pytest.approx([row['train_loss'] for row in whole[1:]],
                                                                       rel=1e-5)
    _, a, meta = model_io.load_model(out, 'cryosegnet')
    _, b, _ = model_io.load_model(tmp_path / 'whole.pt', 'cryosegnet')
    assert meta['resumed_after_epoch'] == 1 and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    assert not os.path.exists(out + '.checkpoint.pt')        # removed when training ends
    with pytest.raises(InputError, match='no checkpoint'):
        cs.train_cryosegnet(*args, out, resume=True, **kw)
