"""Pick particles in tomograms with a trained DeepETPicker model (overlap tiles + MP-NMS) → STAR.

The tomogram is standardised, predicted tile by tile (only each tile's centre is kept), and the per-class
probability map is reduced to particle centres by mean-pool NMS: binarise at t_seg, mean-pool k³ ⌈d/(k−1)⌉
times, keep local maxima above t_lm, then drop picks within t_dist of a better one. Unset thresholds come
from the model (tuned on validation data when it was trained) or from the label diameter. All tomograms'
picks go to one STAR file (rlnTomoName = file name without extension; rlnClassNumber;
rlnAutopickFigureOfMerit = MP-NMS score in 0..1).

Example:
  cryopick pick3d TS_01.mrc TS_02.mrc --model deepet.pt --out picks.star --t-seg 0.5 --device cuda
"""
import logging

import pandas as pd

from ..engine.pick3d import picking as pick3d
from ..engine import settings
from ..engine.io import star
from ..engine.errors import InputError
from . import add_threads_arg

log = logging.getLogger(__name__)


def add_args(parser):
    parser.add_argument('tomograms', nargs='+', help='tomograms (MRC) to pick')
    parser.add_argument('--model', required=True, help='model file written by `cryopick train3d`')
    parser.add_argument('--out', required=True, help='output STAR file with the picks of every tomogram')
    parser.add_argument('--t-seg', type=float, default=None, help='segmentation threshold (model default)')
    parser.add_argument('--t-lm', type=float, default=None, help='local-maximum threshold (model default)')
    parser.add_argument('--t-dist', type=float, default=None, help='de-duplication distance in voxels')
    parser.add_argument('--kernel', type=int, default=None, help='MP-NMS pooling kernel (odd, default 5)')
    parser.add_argument('--iterations', type=int, default=None, help='mean-pool passes (default ⌈d/(k−1)⌉)')
    parser.add_argument('--pad', type=int, default=None, help='tile margin discarded per side (model default)')
    parser.add_argument('--padding', choices=('zero', 'mirror', 'inside'), default='zero',
                        help="tiles at the tomogram's faces: 'zero' (default) / 'mirror' pad beyond the face, "
                             "'inside' moves the window inside the volume (as training patches are placed; "
                             "thresholds tuned with 'zero' may then need retuning)")
    parser.add_argument('--flip-average', action='store_true',
                        help='average the map over the eight mirror images of every tile (8× slower, '
                             'slightly better classification)')
    parser.add_argument('--batch-size', type=int, default=2, help='tiles per forward pass')
    parser.add_argument('--rescale', action='store_true',
                        help='resample tomograms whose voxel size differs from the model\'s instead of failing')
    parser.add_argument('--device', default=None, help='auto, cpu, cuda or cuda:N (default $CRYOPICK_DEVICE)')
    add_threads_arg(parser)
    parser.add_argument('--precision', choices=settings.PRECISIONS, default=None,
                        help='network arithmetic: auto (bf16 where the CPU/GPU has it natively), fp32 or bf16 (default $CRYOPICK_PRECISION or auto)')
    parser.add_argument('--tomo-name', action='append', default=[], metavar='NAME',
                        help='rlnTomoName to write, once per tomogram in order (default: file name without '
                             'extension)')
    parser.add_argument('--work-dir', default=None, help='folder for temporary memory-mapped maps')


def main(args):
    if args.batch_size < 1:
        raise InputError('--batch-size', 'must be at least 1')
    if args.tomo_name and len(args.tomo_name) != len(args.tomograms):
        raise InputError('--tomo-name', f"given {len(args.tomo_name)} times for {len(args.tomograms)} tomograms")
    names = args.tomo_name or [None] * len(args.tomograms)
    from ..engine.settings import resolve_device
    device = resolve_device(args.device)
    model = pick3d.load_picker(args.model, device)
    frames = []
    from ..engine.progress import Progress
    # a line after every tomogram (each takes minutes): how many are done and when the last will be
    progress = Progress('pick3d', len(args.tomograms), unit='tomogram', say=log.info, every=0)
    for tomo, name in zip(args.tomograms, names):
        frames.append(pick3d.pick(tomo, args.model, device=device, t_seg=args.t_seg, t_lm=args.t_lm,
                                  t_dist=args.t_dist, pad=args.pad, batch_size=args.batch_size,
                                  rescale=args.rescale, kernel=args.kernel, iterations=args.iterations,
                                  padding=args.padding, work_dir=args.work_dir, model=model, tomo_name=name,
                                  precision=args.precision, flip_average=args.flip_average))
        progress.update(note=f'{tomo}: {len(frames[-1])} picks')
    star.write_coordinates(args.out, pd.concat(frames, ignore_index=True))
    return 0
