"""CryoSegNet: an attention U-Net segments particles in a micrograph; picks come from its probability map.

Frames and orientation
    All arrays are (y, x) as read; a pick's rlnCoordinateX is the column and rlnCoordinateY the row of the
    micrograph array as read, in its own pixels, origin at the first pixel. Nothing here flips images: the
    vertical flip in CryoSegNet's code comes from how it reads MRC files, and the β-gal JPGs were written
    after that flip, so their annotations are already in the JPG's own array frame.

Network frame
    A micrograph is scaled, keeping its aspect ratio, so that its longer side is ``input_size`` (1024 in the
    paper, 512 for the CPU preset by default) and padded at the bottom/right with its mean to a square.
    CryoSegNet squashes every micrograph to 1024² instead; keeping the aspect ratio keeps particles round on
    non-square detectors (5760 × 4092). Downscaling uses area averaging. Pixel centres map as
    ``x_net = (x + 0.5)·s − 0.5``.

Inputs
    The network sees an image in [0, 1]: the output of `preprocess2d.cryosegnet_chain` (model meta
    ``preprocess`` = the chain switches) or, for images already denoised (meta ``preprocess`` = None), the
    image min–max scaled.

Training targets
    Filled circles of the particle diameter, drawn directly in the network frame with fractional edge
    coverage (what resizing a full-size binary mask would give, without building it).

Loss, augmentation, checkpoints
    A new network's output bias starts at the logit of the particles' share of the training pixels (the
    prior initialisation of RetinaNet), not at 0.5: from 0.5 the first steps only learn that most pixels
    are background, a plateau that noisy micrographs did not leave within a CPU-sized run.
    (BCE-with-logits + soft Dice) / 2 as in CryoSegNet; random flips and 90° rotations (micrographs have no
    preferred orientation, so these are label-preserving; the reference trained on ≈5,000 micrographs from
    22 data sets and used none, but fine-tuning on a handful of micrographs over-fits without them); Adam;
    the kept weights are those with the best validation Dice (threshold 0.5), evaluated also before the
    first epoch so fine-tuning never returns a model worse than the one it started from. With held-out
    micrographs, the U-Net-only picking threshold is then chosen on them (F1 within half the diameter over
    0.3–0.8) and stored in the model as its default.

Picking without SAM (`picks_from_map`)
    Threshold the map, take the maxima of the distance transform of the foreground (touching particles
    give one maximum each), keep maxima whose inscribed circle radius lies in [0.3 r, 1.5 r] (too thin:
    noise; too wide: contamination or carbon). This is our U-Net-only path, not CryoSegNet's published
    post-processing, which is `sam_picking.picks_with_sam`. On both paths picks closer than half a
    diameter to the micrograph's edge are dropped (a cut particle; `edge_margin`).
"""
import logging
import math
import os
import time

import numpy as np
import pandas as pd

from . import attention_unet
from ... import checkpoint
from ...io import star
from ...progress import Progress, compute_summary
from ...errors import InputError
from ...io.model_io import load_model, save_model
from ..micrograph_io import EDGE_MARGIN, away_from_edge
from ..picks import COLUMNS, check_diameter, check_micrograph, picks_frame  # noqa: F401 (part of this module's API)

log = logging.getLogger(__name__)

METHOD = 'cryosegnet'
DEFAULT_INPUT_SIZE = {'paper': 1024, 'cpu': 512}
# Training settings when the caller gives none (`training_defaults`). A new cpu-size network learns from a
# few micrographs on random 256² crops at lr 1e-3 (bench/README §4: the figures there use exactly these);
# the paper's 1e-4 on whole 1024² inputs is for its ≈5 000 micrographs, and for fine-tuning a trained model.
TRAINING_DEFAULTS = {'cpu': {'lr': 1e-3, 'batch_size': 4, 'crop_size': 256},
                     'paper': {'lr': 1e-4, 'batch_size': 2, 'crop_size': None},
                     'fine-tune': {'lr': 1e-4, 'batch_size': 2, 'crop_size': None}}
# An epoch draws at least this many crops (cycling through the training micrographs with new random crops,
# flips and turns), so that a handful of micrographs still gets enough optimisation steps per epoch: three
# 768² simulated micrographs gave 7 steps per epoch, and 50 epochs left a noisy set unlearnt.
MIN_CROPS_PER_EPOCH = 64
# Learning-rate schedules: 'cosine' (default) decays the rate along a half cosine from lr to LR_FLOOR·lr
# over all steps, so the last epochs settle instead of swinging (constant Adam at 1e-3 gave validation
# Dice jumping between 0 and 0.81 from one epoch to the next on simulated micrographs). Test F1 was the
# same on average (β-gal and three simulated noise levels, bench/README.md §4b); a settled model does not
# depend on which epoch spiked on one validation micrograph. 'constant' is CryoSegNet's.
LR_SCHEDULES = ('cosine', 'constant')
LR_FLOOR = 0.01


def training_defaults(preset, fine_tuning=False):
    """lr, batch size and crop size (None: whole input) for a preset name, or for fine-tuning."""
    if fine_tuning:
        return dict(TRAINING_DEFAULTS['fine-tune'])
    return dict(TRAINING_DEFAULTS['paper' if preset == 'paper' else 'cpu'])
DEFAULT_CHAIN = {'blur': True, 'nlmeans': True, 'wiener': True, 'clahe': True, 'guided': True}


# ----------------------------------------------------------------------------------------------- inputs

def chain_switches(preprocess):
    """None (no chain) or a full dict of cryosegnet_chain switches from True/False/None/dict."""
    if preprocess is None or preprocess is False:
        return None
    if preprocess is True:
        return dict(DEFAULT_CHAIN)
    if isinstance(preprocess, dict):
        unknown = set(preprocess) - set(DEFAULT_CHAIN)
        if unknown:
            raise InputError('preprocess', f"unknown chain switch(es) {sorted(unknown)}; "
                                           f"known: {sorted(DEFAULT_CHAIN)}")
        return {**DEFAULT_CHAIN, **{k: bool(v) for k, v in preprocess.items()}}
    raise InputError('preprocess', f"expected True, False or a dict of switches, got {preprocess!r}")


def to_unit_range(image, switches):
    """The network's input in [0, 1]: the CryoSegNet chain when `switches` is a dict, else min–max."""
    if switches is not None:
        from .. import preprocess as preprocess2d
        out = preprocess2d.cryosegnet_chain(image, **switches)
        return np.asarray(out, dtype=np.float32)
    lo, hi = float(image.min()), float(image.max())
    return ((image - lo) / (hi - lo)).astype(np.float32)


def network_frame(shape, input_size):
    """(h, w, sy, sx): size of the scaled micrograph inside the input_size² square and the scales."""
    H, W = shape
    s = input_size / max(H, W)
    h, w = max(1, int(round(H * s))), max(1, int(round(W * s)))
    return h, w, h / H, w / W


def to_network(image01, input_size):
    """Scale a [0,1] image into the network frame and pad it to input_size²; returns (square, (h, w))."""
    import cv2
    h, w, _, _ = network_frame(image01.shape, input_size)
    interp = cv2.INTER_AREA if h < image01.shape[0] else cv2.INTER_LINEAR
    small = cv2.resize(image01, (w, h), interpolation=interp)
    square = np.full((input_size, input_size), float(small.mean()), dtype=np.float32)
    square[:h, :w] = small
    return square, (h, w)


def disk_target(centres_xy, diameter_px, shape, input_size):
    """Filled circles (fractional coverage at the edge) at the centres, in the padded network frame."""
    h, w, sy, sx = network_frame(shape, input_size)
    target = np.zeros((input_size, input_size), dtype=np.float32)
    centres = np.asarray(centres_xy, dtype=float).reshape(-1, 2)
    r = 0.5 * diameter_px * 0.5 * (sx + sy)
    reach = int(math.ceil(r + 1))
    for x, y in centres:
        cx, cy = (x + 0.5) * sx - 0.5, (y + 0.5) * sy - 0.5
        x0, x1 = max(0, int(cx) - reach), min(w, int(cx) + reach + 2)
        y0, y1 = max(0, int(cy) - reach), min(h, int(cy) + reach + 2)
        if x0 >= x1 or y0 >= y1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        cover = np.clip(r + 0.5 - np.hypot(xx - cx, yy - cy), 0.0, 1.0)
        np.maximum(target[y0:y1, x0:x1], cover, out=target[y0:y1, x0:x1])
    return target


# --------------------------------------------------------------------------------------------- training

def _dice_terms(prob, target):
    inter = (prob * target).sum()
    return inter, prob.sum() + target.sum()


def _loss(logits, target):
    import torch.nn.functional as F
    bce = F.binary_cross_entropy_with_logits(logits, target)
    inter, total = _dice_terms(logits.sigmoid(), target)
    dice = 1.0 - (2.0 * inter + 1.0) / (total + 1.0)
    return 0.5 * (bce + dice)


def _augment(batch_x, batch_y, rng):
    """Same random flip / 90° rotation for an image and its target (numpy, per sample)."""
    k = int(rng.integers(4))
    flip = bool(rng.integers(2))
    out = []
    for a in (batch_x, batch_y):
        a = np.rot90(a, k)
        out.append(np.ascontiguousarray(a[:, ::-1] if flip else a))
    return out


def _evaluate(net, xs, ys, device, threshold=0.5):
    """Mean Dice loss (soft) and mean hard Dice over whole validation images."""
    import torch
    net.eval()
    losses, dices = [], []
    with torch.no_grad():
        for x, y in zip(xs, ys):
            prob = net(torch.from_numpy(x)[None, None].to(device)).sigmoid()[0, 0].cpu().numpy()
            inter, total = _dice_terms(prob, y)
            losses.append(1.0 - (2 * inter + 1.0) / (total + 1.0))
            hard = prob >= threshold
            truth = y >= 0.5
            denom = hard.sum() + truth.sum()
            dices.append(1.0 if denom == 0 else 2.0 * np.logical_and(hard, truth).sum() / denom)
    return float(np.mean(losses)), float(np.mean(dices))


def train_cryosegnet(images, coords, diameter_px, out_model, preset='cpu', epochs=50, batch_size=None,
                     lr=None, val_fraction=0.2, init_model=None, device='auto', seed=0, log=None,
                     input_size=None, crop_size=None, preprocess=False, pixel_size=None, names=None,
                     min_crops_per_epoch=MIN_CROPS_PER_EPOCH, lr_schedule='cosine', resume='auto'):
    """Train (or fine-tune) the attention U-Net on micrographs and particle centres.

    images        list of (y, x) arrays; raw when `preprocess` is True or a dict of chain switches (the
                  CryoSegNet chain runs on them, and on every micrograph the model later picks), already
                  denoised when False.
    coords        list of (N, 2) arrays of x (column), y (row) centres, one per image.
    diameter_px   particle diameter in pixels of these micrographs (the radius of the drawn circles).
    out_model     where the best model goes (model_io format, method 'cryosegnet').
    preset        'cpu' (base width 8) or 'paper' (base width 64, 131 M parameters), or an arch dict
                  (base_width, levels); ignored when fine-tuning.
    input_size    side of the network input (multiple of 32); default 512 ('cpu'), 1024 ('paper'), or
                  the initial model's.
    crop_size     train on random crop_size² windows of the network frame (multiple of 32) instead of the
                  whole square: cheaper steps and more of them per epoch (input_size // crop_size squared).
    lr, batch_size, crop_size   None: `training_defaults` (cpu preset 1e-3, 4, 256; paper preset and
                  fine-tuning 1e-4, 2, whole input).
    min_crops_per_epoch   an epoch draws at least this many crops (MIN_CROPS_PER_EPOCH).
    lr_schedule   'cosine' (lr decays to LR_FLOOR·lr over the run) or 'constant' (the reference).
    val_fraction  fraction of the micrographs held out for validation (at least one when two or more are
                  given; with one micrograph it validates on the training micrograph and says so in meta).
    init_model    fine-tune from this model file: its architecture, weights, input size and chain.
    log           callable(str) receiving one line per epoch and progress lines (device and precision at the
                  start, steps / rate / ETA within epochs; default: the module logger).
    resume        'auto': continue from <out_model>.checkpoint.pt, written after every epoch, when it holds a
                  run with the same settings; True: require it; False: start afresh (`checkpoint.py`). The
                  checkpoint is removed when training ends.
    Returns the history: a list of dicts (epoch, train_loss, val_loss, val_dice, lr at the epoch's last
    step, seconds); epoch 0 is the evaluation before training.
    """
    import torch
    say = log or (lambda msg: logging.getLogger(__name__).info(msg))
    if len(images) == 0 or len(images) != len(coords):
        raise InputError('micrographs', f"need one coordinate array per micrograph "
                                        f"({len(images)} micrographs, {len(coords)} coordinate sets)")
    names = list(names) if names is not None else [f'micrograph {i + 1}' for i in range(len(images))]
    init_meta, init_state = {}, None
    if init_model:
        arch, init_state, init_meta = load_model(init_model, METHOD)
        switches = chain_switches(init_meta.get('preprocess'))
        input_size = int(input_size or init_meta.get('input_size', 1024))
    else:
        if isinstance(preset, dict):
            arch = {'in_ch': 1, 'levels': 5, **preset}
        elif preset in attention_unet.PRESETS:
            arch = attention_unet.preset_arch(preset)
        else:
            raise InputError('preset', f"unknown preset {preset!r}; choose from {sorted(attention_unet.PRESETS)}")
        switches = chain_switches(preprocess)
        input_size = int(input_size or DEFAULT_INPUT_SIZE.get(preset if isinstance(preset, str) else 'cpu'))
    mult = 2 ** int(arch.get('levels', 5))
    if input_size % mult:
        raise InputError('input_size', f"{input_size} is not a multiple of {mult}")
    defaults = training_defaults(preset if isinstance(preset, str) else 'cpu', fine_tuning=bool(init_model))
    lr = float(defaults['lr'] if lr is None else lr)
    batch_size = int(defaults['batch_size'] if batch_size is None else batch_size)
    if crop_size is None and defaults['crop_size'] and defaults['crop_size'] < input_size:
        crop_size = defaults['crop_size']
    crop = int(crop_size or input_size)
    if crop % mult or crop > input_size:
        raise InputError('crop_size', f"{crop} must be a multiple of {mult} and at most the input size {input_size}")
    if epochs < 0 or batch_size < 1 or not (0 <= val_fraction < 1):
        raise InputError('options', "epochs ≥ 0, batch size ≥ 1 and 0 ≤ val_fraction < 1 are required")
    if lr_schedule not in LR_SCHEDULES:
        raise InputError('lr_schedule', f"unknown schedule {lr_schedule!r}; choose from {', '.join(LR_SCHEDULES)}")
    ckpt_path = checkpoint.path_for(out_model)
    checkpoint.check(ckpt_path, resume)

    # Check everything before the (long) preprocessing and training start.
    checked, centres = [], []
    for img, xy, name in zip(images, coords, names):
        img = check_micrograph(img, name)
        check_diameter(diameter_px, img.shape, 'diameter')
        xy = np.asarray(xy, dtype=float).reshape(-1, 2)
        if not np.all(np.isfinite(xy)):
            raise InputError(name, "coordinates hold non-finite values")
        outside = (xy < -0.5).any(axis=1) | (xy[:, 0] > img.shape[1] - 0.5) | (xy[:, 1] > img.shape[0] - 0.5)
        if outside.any():
            raise InputError(name, f"{int(outside.sum())} coordinate(s) outside the micrograph "
                                   f"({img.shape[1]} × {img.shape[0]} pixels)")
        checked.append(img)
        centres.append(xy)

    device = _device(device)
    say(f'train-cryosegnet: {compute_summary(device, None)}')
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    t0 = time.time()
    xs, ys = [], []
    preparing = Progress('preparing micrographs', len(checked), unit='micrograph', say=say)
    for img, xy in zip(checked, centres):
        square, _ = to_network(to_unit_range(img, switches), input_size)
        xs.append(square)
        ys.append(disk_target(xy, diameter_px, img.shape, input_size))
        preparing.update()
    say(f'prepared {len(xs)} micrograph(s) at {input_size}² in {time.time() - t0:.1f} s')

    n = len(xs)
    order = rng.permutation(n)
    n_val = 0 if (n < 2 or val_fraction == 0) else min(n - 1, max(1, int(round(val_fraction * n))))
    val_idx = sorted(order[:n_val].tolist()) if n_val else list(range(n))
    train_idx = sorted(order[n_val:].tolist())
    val_is_train = n_val == 0

    net = attention_unet.build(arch).to(device)
    if init_state is not None:
        net.load_state_dict(init_state)
    else:
        # Start the output at the particles' share of the training pixels instead of 0.5 (the prior
        # initialisation of RetinaNet): from 0.5 the first hundreds of steps only learn that most pixels
        # are background, and on noisy micrographs (simulated SNR 0.03) a 50-epoch run never got past
        # that plateau (validation Dice 0 throughout); started at the prior it learnt them (test F1 0.52).
        prior = float(np.clip(np.mean([ys[i].mean() for i in train_idx]), 1e-3, 0.5))
        with torch.no_grad():
            net.head.bias.fill_(math.log(prior / (1.0 - prior)))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    val_x, val_y = [xs[i] for i in val_idx], [ys[i] for i in val_idx]

    def snapshot():
        return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}

    # Everything that shapes the run's steps: a checkpoint made with other values is not resumed.
    resume_settings = {
        'micrographs': [[names[i], list(checked[i].shape), _digest(centres[i])] for i in range(n)],
        'diameter_px': float(diameter_px), 'arch': arch, 'input_size': input_size, 'crop': crop,
        'batch_size': batch_size, 'lr': lr, 'lr_schedule': lr_schedule, 'epochs': epochs, 'seed': seed,
        'val_fraction': val_fraction, 'preprocess': switches, 'min_crops_per_epoch': int(min_crops_per_epoch),
        'init_model': os.fspath(init_model) if init_model else None}
    saved = checkpoint.load(ckpt_path, resume_settings, resume, say=logging.getLogger(__name__).warning)
    if saved is None:
        history = []
        val_loss, val_dice = _evaluate(net, val_x, val_y, device)
        history.append({'epoch': 0, 'train_loss': None, 'val_loss': val_loss, 'val_dice': val_dice,
                        'seconds': 0.0})
        say(f'epoch 0: val loss {val_loss:.4f}, val Dice {val_dice:.4f}')
        best = {'epoch': 0, 'val_dice': val_dice, 'val_loss': val_loss, 'state': snapshot()}
        step, first_epoch = 0, 1
    else:
        net.load_state_dict(saved['net'])
        opt.load_state_dict(saved['optimizer'])
        checkpoint.restore_rng(saved['rng'], rng)
        history, best, step, first_epoch = saved['history'], saved['best'], saved['step'], saved['epoch'] + 1
        say(f"resuming from {ckpt_path} after epoch {saved['epoch']} (best val Dice {best['val_dice']:.4f} at "
            f"epoch {best['epoch']})")
    crops_per_image = max((input_size // crop) ** 2, -(-int(min_crops_per_epoch) // max(1, len(train_idx))))
    steps_per_epoch = -(-crops_per_image * len(train_idx) // batch_size)
    total_steps = max(1, epochs * steps_per_epoch)

    def set_lr(step):
        if lr_schedule == 'cosine':
            # the first step at lr, the last at LR_FLOOR·lr
            factor = LR_FLOOR + (1.0 - LR_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * step / max(1, total_steps - 1)))
        else:
            factor = 1.0
        for group in opt.param_groups:
            group['lr'] = lr * factor

    for epoch in range(first_epoch, epochs + 1):
        t_epoch = time.time()
        net.train()
        samples = np.repeat(np.asarray(train_idx), crops_per_image)
        rng.shuffle(samples)
        losses = []
        progress = Progress(f'epoch {epoch}/{epochs}', -(-len(samples) // batch_size), say=say)
        for start in range(0, len(samples), batch_size):
            bx, by = [], []
            for i in samples[start:start + batch_size]:
                oy, ox = rng.integers(0, input_size - crop + 1, size=2)
                ax, ay = _augment(xs[i][oy:oy + crop, ox:ox + crop], ys[i][oy:oy + crop, ox:ox + crop], rng)
                bx.append(ax)
                by.append(ay)
            tx = torch.from_numpy(np.stack(bx))[:, None].to(device)
            ty = torch.from_numpy(np.stack(by))[:, None].to(device)
            set_lr(step)
            step += 1
            loss = _loss(net(tx), ty)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            progress.update(note=lambda: f'loss {np.mean(losses[-20:]):.4f}')
        val_loss, val_dice = _evaluate(net, val_x, val_y, device)
        row = {'epoch': epoch, 'train_loss': float(np.mean(losses)), 'val_loss': val_loss,
               'val_dice': val_dice, 'lr': float(opt.param_groups[0]['lr']),
               'seconds': round(time.time() - t_epoch, 2)}
        history.append(row)
        # Best Dice wins; at equal Dice (e.g. still 0 early in training, when nothing passes 0.5 yet) the
        # lower validation loss does, so a short run keeps what it learnt instead of the starting weights.
        if val_dice > best['val_dice'] or (val_dice == best['val_dice'] and val_loss < best['val_loss']):
            best = {'epoch': epoch, 'val_dice': val_dice, 'val_loss': val_loss, 'state': snapshot()}
        checkpoint.save(ckpt_path, resume_settings, {
            'epoch': epoch, 'net': net.state_dict(), 'optimizer': opt.state_dict(), 'rng': checkpoint.rng_state(rng),
            'history': history, 'best': best, 'step': step})
        say(f"epoch {epoch}: train loss {row['train_loss']:.4f}, val loss {val_loss:.4f}, "
            f"val Dice {val_dice:.4f} ({row['seconds']:.1f} s)")

    h, w, sy, sx = network_frame(checked[0].shape, input_size)
    meta = {
        'input_size': input_size, 'pixel_size': pixel_size, 'diameter_px': float(diameter_px),
        'diameter_net_px': float(diameter_px) * 0.5 * (sx + sy), 'preprocess': switches,
        'normalisation': 'chain output' if switches else 'min-max to [0, 1]',
        'frame': 'aspect ratio kept, longer side = input_size, padded bottom/right with the mean',
        'threshold': 0.5, 'iou_filter': 0.94, 'size_factor': 0.2,
        'epochs': epochs, 'batch_size': batch_size, 'lr': lr, 'lr_schedule': lr_schedule, 'crop_size': crop,
        'seed': seed,
        'crops_per_epoch': int(crops_per_image * len(train_idx)),
        'augmentation': 'random flips and 90° rotations',
        'train_micrographs': [names[i] for i in train_idx], 'val_micrographs': [names[i] for i in val_idx],
        'val_is_train': val_is_train, 'best_epoch': best['epoch'], 'best_val_dice': best['val_dice'],
        'history': history, 'init_model': os.fspath(init_model) if init_model else None,
        'preset': None if (init_model or isinstance(preset, dict)) else preset,
        'n_particles': int(sum(len(c) for c in centres)),
    }
    if not val_is_train and epochs > 0:
        # The U-Net-only picking threshold is chosen on the held-out micrographs, so "the model's own
        # threshold" is a measured choice rather than 0.5 (a higher one separates touching particles).
        net.load_state_dict(best['state'])
        net.eval()
        model = CryoSegNetModel(net, arch, meta, device)
        maps = [predict_map(checked[i], model, preprocess=switches) for i in val_idx]
        thr, f1 = tune_threshold(maps, [centres[i] for i in val_idx], diameter_px)
        meta.update(threshold=thr, threshold_source='F1 on the validation micrographs',
                    threshold_val_f1=round(f1, 4))
        say(f'U-Net-only threshold {thr:.2f} (validation F1 {f1:.3f})')
    if saved is not None:
        meta['resumed_after_epoch'] = int(saved['epoch'])
    save_model(out_model, METHOD, arch, best['state'], meta)
    checkpoint.remove(ckpt_path)
    say(f"best val Dice {best['val_dice']:.4f} at epoch {best['epoch']} → {out_model}")
    return history


def _digest(xy):
    """Short fingerprint of a micrograph's coordinates (for resuming only the same training)."""
    import hashlib
    return hashlib.sha1(np.ascontiguousarray(xy, dtype=np.float64).tobytes()).hexdigest()[:16]


THRESHOLD_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def tune_threshold(maps, centres, diameter_px, grid=THRESHOLD_GRID, default=0.5):
    """(threshold, F1) of the U-Net-only path chosen on held-out maps against their true centres (F1 with
    one-to-one matching within half the diameter, pooled over the maps).

    One-standard-error rule: the network is trained at `default` (BCE and Dice are calibrated there), so a
    threshold is moved away from it only when the validation shows a gain larger than the sampling error
    of the best F1 — √(F1 (1 − F1) / n) with n the mean of picks and true particles, about ±0.02 for one
    micrograph of 600 particles. Among the thresholds within that error of the best F1 the one nearest
    `default` wins. Picking the raw maximum on one held-out β-gal micrograph chose 0.7 for a 0.012 gain
    there and lost 0.045 on the test micrographs (bench/README.md §4).
    """
    from ...evaluate import match_points
    scores = []
    for thr in grid:
        tp = n_pred = n_true = 0
        for prob, xy in zip(maps, centres):
            picks = picks_from_map(prob, diameter_px, threshold=thr)[[star.X, star.Y]].to_numpy()
            xy = np.asarray(xy, dtype=float).reshape(-1, 2)
            pairs = match_points(picks, xy, diameter_px / 2.0)[0] if len(picks) and len(xy) else ()
            tp, n_pred, n_true = tp + len(pairs), n_pred + len(picks), n_true + len(xy)
        scores.append((float(thr), 2 * tp / max(n_pred + n_true, 1), 0.5 * (n_pred + n_true)))
    best_f1, n = max((f1, n) for _, f1, n in scores)
    se = np.sqrt(best_f1 * (1.0 - best_f1) / max(n, 1.0))
    thr, f1, _ = min((s for s in scores if s[1] >= best_f1 - se), key=lambda s: (abs(s[0] - default), -s[1]))
    return thr, f1


# -------------------------------------------------------------------------------------------- inference

def _device(device):
    from ...settings import resolve_device
    return resolve_device(device)


class CryoSegNetModel:
    """A trained network on a device with the facts it was trained with (`meta`)."""

    def __init__(self, net, arch, meta, device, path=None):
        self.net, self.arch, self.meta, self.device, self.path = net, arch, meta, device, path

    @property
    def input_size(self):
        return int(self.meta.get('input_size', 1024))


def load_cryosegnet(path, device='auto'):
    """Load a 'cryosegnet' model file; InputError when it is missing or another kind of model."""
    arch, state, meta = load_model(path, METHOD)
    device = _device(device)
    net = attention_unet.build(arch)
    net.load_state_dict(state)
    net.to(device).eval()
    return CryoSegNetModel(net, arch, meta, device, os.fspath(path))


def _as_model(model, device):
    return model if isinstance(model, CryoSegNetModel) else load_cryosegnet(model, device)


def predict_map(image, model, device='auto', preprocess=None, source='micrograph'):
    """Particle probability (float32 (y, x), the micrograph's own size) from a model or model path.

    The model's own preprocessing (meta 'preprocess') is applied unless `preprocess` says otherwise
    (False: the image is already in the form the model expects).
    """
    import cv2
    import torch
    model = _as_model(model, device)
    image = check_micrograph(image, source)
    switches = chain_switches(model.meta.get('preprocess')) if preprocess is None else chain_switches(preprocess)
    square, (h, w) = to_network(to_unit_range(image, switches), model.input_size)
    with torch.no_grad():
        prob = model.net(torch.from_numpy(square)[None, None].to(model.device)).sigmoid()[0, 0].cpu().numpy()
    return cv2.resize(np.ascontiguousarray(prob[:h, :w]), (image.shape[1], image.shape[0]),
                      interpolation=cv2.INTER_LINEAR).astype(np.float32)


def picks_from_map(prob, diameter_px, threshold=0.5, min_radius=0.3, max_radius=1.5, edge_margin=EDGE_MARGIN):
    """U-Net-only picking (no SAM): centres of particles in a probability map.

    Foreground = prob ≥ threshold; one pick per maximum of its distance transform, maxima at least 0.4
    diameters apart; a maximum is kept when its inscribed-circle radius is within [min_radius, max_radius]
    times the particle radius. Works on a copy scaled so the diameter is about 24 pixels (fast on 4k²
    maps). Picks closer than `edge_margin` diameters to the map's edge are dropped (a cut particle;
    `micrograph_io.away_from_edge`). Returns a DataFrame with rlnCoordinateX/Y (pixels of `prob`),
    rlnAutopickFigureOfMerit (the map at the pick, the value `threshold` was applied to, so keeping the
    picks with score ≥ threshold keeps them all) and rlnDiameter.
    """
    import cv2
    from scipy import ndimage
    from skimage.feature import peak_local_max
    prob = np.asarray(prob, dtype=np.float32)
    d = check_diameter(diameter_px, prob.shape)
    f = max(1, int(d // 24))
    small = cv2.resize(prob, (prob.shape[1] // f, prob.shape[0] // f), interpolation=cv2.INTER_AREA) \
        if f > 1 else prob
    sy, sx = small.shape[0] / prob.shape[0], small.shape[1] / prob.shape[1]
    r = 0.5 * d * 0.5 * (sx + sy)
    fg = small >= threshold
    if not fg.any():
        return picks_frame(np.zeros((0, 2)), [], d)
    dist = ndimage.distance_transform_edt(fg)
    smooth = ndimage.gaussian_filter(small, max(0.5, r / 3))
    # The smoothed map breaks ties on distance-transform plateaus (it never outweighs a whole pixel).
    peaks = peak_local_max(dist + 0.5 * smooth, min_distance=max(1, int(round(0.4 * 2 * r))),
                           labels=ndimage.label(fg)[0], exclude_border=False)
    if len(peaks) == 0:
        return picks_frame(np.zeros((0, 2)), [], d)
    radius = dist[peaks[:, 0], peaks[:, 1]]
    keep = (radius >= min_radius * r) & (radius <= max_radius * r)
    peaks = peaks[keep]
    xy = np.stack([(peaks[:, 1] + 0.5) / sx - 0.5, (peaks[:, 0] + 0.5) / sy - 0.5], axis=1)
    # The thresholded value itself (a peak lies in the foreground, so ≥ threshold): a smoothed score fell
    # below the threshold on narrow blobs, and filtering the STAR at the picking threshold lost picks.
    scores = small[peaks[:, 0], peaks[:, 1]]
    inside = away_from_edge(xy, prob.shape, edge_margin * d)
    xy, scores = xy[inside], scores[inside]
    order = np.argsort(-scores, kind='stable')
    return picks_frame(xy[order], scores[order], d)


def cryosegnet_pick(image, model_path, diameter_px=None, sam_checkpoint=None, sam_type=None, threshold=None,
                    points_per_side=32, pred_iou_thresh=0.88, stability_score_thresh=0.95, iou_filter=0.94,
                    size_factor=0.2, device='auto', sam_model=None, preprocess=None, source='micrograph',
                    edge_margin=EDGE_MARGIN):
    """Pick one micrograph: U-Net map, then SAM post-processing (when a SAM model/checkpoint is given) or
    the U-Net-only path.

    model_path   model file or a loaded CryoSegNetModel.
    diameter_px  particle diameter in pixels of this micrograph (default: the training diameter).
    sam_checkpoint / sam_type   Segment Anything checkpoint (vit_b/vit_l/vit_h, inferred when None);
                 `sam_model` may instead be an already built Sam (loaded once for many micrographs).
    edge_margin  picks closer than this many diameters to the micrograph's edge are dropped (0 keeps them)
    Returns (DataFrame with rlnCoordinateX (column), rlnCoordinateY (row of the array as read),
    rlnAutopickFigureOfMerit, rlnDiameter; sorted by score), diagnostics dict: 'prob' (the map),
    'path' ('sam' or 'unet'), 'seconds' per stage, 'n_masks' (SAM masks before filtering).
    """
    image = check_micrograph(image, source)
    model = _as_model(model_path, device)
    d = check_diameter(diameter_px if diameter_px is not None else model.meta.get('diameter_px', 0),
                       image.shape, 'diameter')
    if sam_model is None and sam_checkpoint:
        from .sam import load_sam
        sam_model = load_sam(sam_checkpoint, sam_type, device=model.device)
    t0 = time.time()
    prob = predict_map(image, model, preprocess=preprocess, source=source)
    t1 = time.time()
    diag = {'prob': prob, 'seconds': {'network': t1 - t0}}
    if sam_model is not None:
        from .sam import picks_with_sam
        picks, n_masks = picks_with_sam(prob, sam_model, d, points_per_side=points_per_side,
                                        pred_iou_thresh=pred_iou_thresh,
                                        stability_score_thresh=stability_score_thresh,
                                        iou_filter=iou_filter, size_factor=size_factor, return_count=True)
        picks = picks[away_from_edge(picks[[star.X, star.Y]].to_numpy(float), image.shape, edge_margin * d)]
        diag.update(path='sam', n_masks=n_masks)
    else:
        if threshold is None:
            threshold = float(model.meta.get('threshold', 0.5))
        picks = picks_from_map(prob, d, threshold=threshold, edge_margin=edge_margin)
        diag.update(path='unet', n_masks=None, threshold=threshold)
    diag['seconds']['postprocess'] = time.time() - t1
    return picks.reset_index(drop=True), diag
