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

Presets: cpu (base width 8, ≈2 M parameters, input 512) and paper (base width 64, ≈131 M parameters, input
1024, as published; needs a GPU). --init fine-tunes a saved model (its architecture, input size and
preprocessing are kept).

Examples:
  cryopick train-cryosegnet --micrographs mic1.mrc mic2.mrc mic3.mrc --coords picks.star --diameter 108 \\
      --out csn.pt --epochs 50
  cryopick train-cryosegnet --micrographs a.jpg b.jpg --coords a.star b.star --diameter 108 --no-preprocess \\
      --init csn.pt --out csn_ft.pt --epochs 10
"""
import logging
import os


from ..engine.pick2d.cryosegnet import picker as cryosegnet
from ..engine.io import star
from ..engine.errors import InputError
from . import add_threads_arg

log = logging.getLogger(__name__)


def add_args(parser):
    parser.add_argument('--micrographs', nargs='+', required=True, help='micrographs (MRC, TIFF, JPG/PNG greyscale)')
    parser.add_argument('--coords', nargs='+', required=True,
                        help='one STAR file per micrograph, or one STAR file with rlnMicrographName')
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


def main(args):
    from ..engine.pick2d.micrograph_io import read_micrograph
    for path in args.micrographs + args.coords + ([args.init] if args.init else []):
        if not os.path.exists(path):
            raise InputError(path, "file not found")
    coords = coordinates_per_micrograph(args.micrographs, args.coords)
    images, pixel_sizes = [], []
    for path in args.micrographs:
        image, pixel = read_micrograph(path)
        images.append(image)
        pixel_sizes.append(pixel)
    pixel = args.pixel_size or next((p for p in pixel_sizes if p), None)
    history = cryosegnet.train_cryosegnet(
        images, coords, args.diameter, args.out, preset=args.preset, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, val_fraction=args.val_fraction, init_model=args.init,
        device=args.device, seed=args.seed, input_size=args.input_size, crop_size=args.crop_size,
        preprocess=not args.no_preprocess, pixel_size=pixel, lr_schedule=args.lr_schedule,
        names=[os.path.basename(p) for p in args.micrographs])
    best = max(history, key=lambda row: row['val_dice'])
    log.info('%d micrographs, %d particles: best validation Dice %.3f (epoch %d) → %s', len(images),
             int(sum(len(c) for c in coords)), best['val_dice'], best['epoch'], args.out)
    return 0
