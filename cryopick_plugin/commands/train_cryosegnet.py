"""CryoSegNet training: fit the attention U-Net to micrographs and particle centres (or fine-tune a model).

Each particle becomes a filled circle of --diameter pixels; the network learns these masks with
(BCE + soft Dice) / 2, random flips and 90° rotations, Adam, and keeps the weights with the best Dice on
the held-out micrographs (--val-fraction). Micrographs are scaled keeping their aspect ratio so the longer
side is --input-size and padded to a square. Raw micrographs go through CryoSegNet's denoising chain
(Gaussian blur, normalisation, non-local means, Wiener, CLAHE, guided filter) unless --no-preprocess says
they are already denoised; the model remembers which, and picking applies the same.

Coordinates: one STAR file per micrograph (same order), or one STAR file with rlnMicrographName naming
each micrograph (file name with or without extension). rlnCoordinateX = column, rlnCoordinateY = row of
the micrograph array as read, in its pixels.

Masks instead (--masks): one image per micrograph (same order, same size), or a folder holding
<micrograph>_mask.<ext> or <micrograph>.<ext> for each, with a filled circle of --diameter pixels on every
particle (the shared β-gal data and CryoPPP ship such masks). The mask is thresholded (--mask-threshold,
default halfway between its lowest and highest value: 127.5 for 8-bit masks, which JPEG blurs at the
edges) and every circle's centre is found by a circular Hough transform of the blob outlines, so touching
and border-cut circles give one centre each (`betagal.mask_centres`); training then proceeds from those
centres exactly as from STAR coordinates.

Presets: cpu (base width 8, ≈2 M parameters, input 512) and paper (base width 64, ≈131 M parameters, input
1024, as published; needs a GPU). --init fine-tunes a saved model (its architecture, input size and
preprocessing are kept).

Examples:
  cryopick train-cryosegnet --micrographs mic1.mrc mic2.mrc mic3.mrc --coords picks.star --diameter 108 \\
      --out csn.pt --epochs 50
  cryopick train-cryosegnet --micrographs a.jpg b.jpg --coords a.star b.star --diameter 108 --no-preprocess \\
      --init csn.pt --out csn_ft.pt --epochs 10
  cryopick train-cryosegnet --micrographs betagal/micrographs/*.jpg --masks betagal/masks --diameter 108 \\
      --no-preprocess --out csn.pt
"""
import logging
import os

import numpy as np

from ..engine.pick2d.cryosegnet import picker as cryosegnet
from ..engine.io import star
from ..engine.errors import InputError
from . import add_threads_arg, add_resume_args

log = logging.getLogger(__name__)


def add_args(parser):
    parser.add_argument('--micrographs', nargs='+', required=True, help='micrographs (MRC, TIFF, JPG/PNG greyscale)')
    labels = parser.add_mutually_exclusive_group(required=True)
    labels.add_argument('--coords', nargs='+',
                        help='one STAR file per micrograph, or one STAR file with rlnMicrographName')
    labels.add_argument('--masks', nargs='+',
                        help='instead of --coords: one particle mask image per micrograph (a filled circle of '
                             '--diameter on each particle), or a folder with <micrograph>_mask.<ext>')
    parser.add_argument('--mask-threshold', type=float, default=None,
                        help='mask pixels at or above this are particle (default: halfway between the '
                             "mask's lowest and highest value)")
    parser.add_argument('--diameter', type=float, required=True, help='particle diameter in pixels of the micrographs')
    parser.add_argument('--out', required=True, help='model file to write')
    parser.add_argument('--preset', choices=sorted(cryosegnet.attention_unet.PRESETS), default='cpu',
                        help='network size (default cpu)')
    parser.add_argument('--epochs', type=int, default=50, help='training epochs (default 50; the paper used 200)')
    parser.add_argument('--batch-size', type=int, default=None,
                        help='images (or crops) per step (default 4 for a new cpu-size network, else 2)')
    parser.add_argument('--lr', type=float, default=None,
                        help='Adam learning rate (default 1e-3 for a new cpu-size network; 1e-4, the paper\'s, '
                             'for the paper size and for fine-tuning)')
    parser.add_argument('--val-fraction', type=float, default=0.2,
                        help='fraction of micrographs held out for validation (default 0.2)')
    parser.add_argument('--input-size', type=int, default=None,
                        help='network input side, a multiple of 32 (default 512 for cpu, 1024 for paper)')
    parser.add_argument('--lr-schedule', choices=cryosegnet.LR_SCHEDULES, default=cryosegnet.LR_SCHEDULES[0],
                        help='cosine (default): the rate decays to 1%% of --lr over the run, so the last epochs '
                             'settle; constant: CryoSegNet\'s (same test F1 on average in the benchmarks)')
    parser.add_argument('--crop-size', type=int, default=None,
                        help='train on random crops of this side of the network input (default 256 for a new '
                             'cpu-size network, else the whole input); an epoch draws at least '
                             f'{cryosegnet.MIN_CROPS_PER_EPOCH} of them')
    parser.add_argument('--init', default=None, help='fine-tune from this cryosegnet model')
    parser.add_argument('--no-preprocess', action='store_true',
                        help='micrographs are already denoised (e.g. CryoSegNet JPGs): skip the chain')
    parser.add_argument('--pixel-size', type=float, default=None, help='pixel size in Å (recorded in the model)')
    parser.add_argument('--device', default=None, help='auto, cpu, cuda or cuda:N (default $CRYOPICK_DEVICE or auto)')
    add_threads_arg(parser)
    parser.add_argument('--seed', type=int, default=0)
    add_resume_args(parser)


def _names(path):
    base = os.path.basename(os.fspath(path))
    return {base, os.path.splitext(base)[0], os.fspath(path)}


def rows_for_micrograph(table, mic_path, source, required=True):
    """Rows of a coordinate table that belong to a micrograph (by rlnMicrographName)."""
    if star.MIC not in table.columns:
        if required:
            raise InputError(source, f"has no {star.MIC} column to tell the micrographs apart; "
                                     f"give one STAR file per micrograph")
        return table
    names = table[star.MIC].astype(str)
    keep = names.isin(_names(mic_path)) | names.map(lambda n: os.path.splitext(os.path.basename(n))[0]).isin(
        _names(mic_path))
    return table[keep].reset_index(drop=True)


def coordinates_per_micrograph(mic_paths, star_paths):
    """(N, 2) x, y arrays, one per micrograph, from per-micrograph STAR files or one shared file."""
    if len(star_paths) == len(mic_paths):
        out = []
        for mic, path in zip(mic_paths, star_paths):
            table = star.read_coordinates(path, dims=2)
            if star.MIC in table.columns and table[star.MIC].nunique() > 1:
                table = rows_for_micrograph(table, mic, path)
                if len(table) == 0:
                    raise InputError(path, f"no row names micrograph {os.path.basename(mic)}")
            out.append(star.xyz_array(table)[:, :2])
        return out
    if len(star_paths) != 1:
        raise InputError('--coords', f"give one STAR file per micrograph ({len(mic_paths)}) or a single one "
                                     f"with {star.MIC}; got {len(star_paths)}")
    table = star.read_coordinates(star_paths[0], dims=2)
    out = [star.xyz_array(rows_for_micrograph(table, mic, star_paths[0]))[:, :2] for mic in mic_paths]
    if not any(len(c) for c in out):
        present = ', '.join(sorted(table[star.MIC].astype(str).unique())[:5])
        raise InputError(star_paths[0], f"no row names any of the micrographs (names present: {present})")
    for mic, c in zip(mic_paths, out):
        if len(c) == 0:
            log.warning('%s: no coordinates in %s; trained as a micrograph without particles', mic, star_paths[0])
    return out


def mask_paths(mic_paths, specs):
    """One mask file per micrograph: the files in order, or found in a folder by the micrograph's name."""
    if len(specs) == 1 and os.path.isdir(specs[0]):
        folder = specs[0]
        files = sorted(f for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f)))
        by_stem = {}
        for f in files:
            by_stem.setdefault(os.path.splitext(f)[0], f)
        out = []
        for mic in mic_paths:
            stem = os.path.splitext(os.path.basename(mic))[0]
            found = by_stem.get(stem + '_mask') or by_stem.get(stem)
            if found is None:
                raise InputError(folder, f"holds no mask for {os.path.basename(mic)} (looked for {stem}_mask.* "
                                         f"and {stem}.*)")
            out.append(os.path.join(folder, found))
        return out
    if len(specs) != len(mic_paths):
        raise InputError('--masks', f"give one mask per micrograph ({len(mic_paths)}) or a folder; got {len(specs)}")
    for path in specs:
        if not os.path.isfile(path):
            raise InputError(path, "file not found")
    return list(specs)


def read_mask(path):
    """A mask image as float32 (y, x); unlike a micrograph it may be constant (no particle)."""
    from ..engine.io.mrc import open_volume
    from ..engine.pick2d.micrograph_io import IMAGE_EXTENSIONS, _read_image
    if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS:
        mask = _read_image(path)
    else:
        mask = np.array(open_volume(path, ndim=2)[0], dtype=np.float32)
    if not np.all(np.isfinite(mask)):
        raise InputError(path, "contains NaN or infinite values")
    return mask


def centres_from_masks(mask_files, shapes, diameter, threshold=None):
    """(N, 2) x, y particle centres per mask: circles of `diameter` found in the thresholded mask."""
    from ..engine.pick2d.betagal import mask_centres
    out = []
    for path, shape in zip(mask_files, shapes):
        mask = read_mask(path)
        if mask.shape != tuple(shape):
            raise InputError(path, f"mask is {mask.shape[1]} × {mask.shape[0]} pixels, its micrograph "
                                   f"{shape[1]} × {shape[0]}")
        lo, hi = float(mask.min()), float(mask.max())
        thr = 0.5 * (lo + hi) if threshold is None else float(threshold)
        fg = mask >= thr if hi > lo or threshold is not None else np.zeros(mask.shape, bool)
        if fg.all():
            raise InputError(path, f"every pixel is at or above the threshold {thr:g}: not a particle mask")
        centres = mask_centres(fg, float(diameter) / 2.0)
        log.info('%s: %d particle centres (mask ≥ %g, circles of %g px)', path, len(centres), thr, diameter)
        out.append(centres)
    return out


def main(args):
    from ..engine.pick2d.micrograph_io import read_micrograph
    for path in args.micrographs + (args.coords or []) + ([args.init] if args.init else []):
        if not os.path.exists(path):
            raise InputError(path, "file not found")
    masks = mask_paths(args.micrographs, args.masks) if args.masks else None
    coords = coordinates_per_micrograph(args.micrographs, args.coords) if args.coords else None
    images, pixel_sizes = [], []
    for path in args.micrographs:
        image, pixel = read_micrograph(path)
        images.append(image)
        pixel_sizes.append(pixel)
    if masks is not None:
        coords = centres_from_masks(masks, [im.shape for im in images], args.diameter, args.mask_threshold)
    pixel = args.pixel_size or next((p for p in pixel_sizes if p), None)
    history = cryosegnet.train_cryosegnet(
        images, coords, args.diameter, args.out, preset=args.preset, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, val_fraction=args.val_fraction, init_model=args.init,
        device=args.device, seed=args.seed, input_size=args.input_size, crop_size=args.crop_size,
        preprocess=not args.no_preprocess, pixel_size=pixel, lr_schedule=args.lr_schedule,
        names=[os.path.basename(p) for p in args.micrographs], resume=args.resume)
    best = max(history, key=lambda row: row['val_dice'])
    log.info('%d micrographs, %d particles: best validation Dice %.3f (epoch %d) → %s', len(images),
             int(sum(len(c) for c in coords)), best['val_dice'], best['epoch'], args.out)
    return 0
