"""Preprocess a 2D micrograph with the CryoSegNet or DeepCryoPicker chain (for viewing or checking).

CryoSegNet chain: Gaussian blur 9×9, z-score, non-local means (h 10, 7, 21), Wiener (9×9 Gaussian PSF,
balance 30), CLAHE (clip 2, 16×16 tiles), guided filter (box 20, ε 0.1). DeepCryoPicker chain: min–max,
contrast stretch, histogram equalisation, adaptive Wiener 5×5, CLAHE twice, self-guided filter ×4,
grey opening ×5. Each step can be switched off with --no-<step>. The output is float32 in [0, 1] (MRC) or
8-bit (PNG/JPG/TIF), in the frame of the input array (no flip). --bin N downsamples first (area averaging),
which makes the chains fast on 4096² micrographs; --stages-dir writes every intermediate image as PNG.

Examples:
  cryopick preprocess2d mic.mrc --chain cryosegnet --out mic_denoised.mrc
  cryopick preprocess2d mic.mrc --chain deepcryopicker --bin 4 --no-morphology --out mic.png --stages-dir st/
"""
import logging
import os
import time

from ..engine.pick2d import preprocess as preprocess2d
from ..engine.errors import InputError
from ..engine.pick2d.micrograph_io import read_micrograph, write_micrograph

log = logging.getLogger(__name__)

ALL_STEPS = sorted(set(preprocess2d.CRYOSEGNET_SWITCHES) | set(preprocess2d.DEEPCRYOPICKER_SWITCHES))


def add_args(parser):
    parser.add_argument('micrograph', help='2D micrograph (MRC, or greyscale JPG/PNG/TIF)')
    parser.add_argument('--chain', choices=preprocess2d.CHAINS, default='cryosegnet',
                        help='which preprocessing chain (default cryosegnet)')
    parser.add_argument('--out', required=True, help='output image: .mrc (float32 [0,1]) or .png/.jpg/.tif')
    parser.add_argument('--bin', type=float, default=1.0, help='downsample by this factor first (default 1)')
    parser.add_argument('--stages-dir', help='write every intermediate stage as <NN>_<stage>.png here')
    for step in ALL_STEPS:
        parser.add_argument(f"--no-{step.replace('_', '-')}", dest=f'no_{step}', action='store_true',
                            help=f'switch off the {step} step')


def main(args):
    if args.bin < 1:
        raise InputError('--bin', f"must be >= 1, got {args.bin:g}")
    known = {'cryosegnet': preprocess2d.CRYOSEGNET_SWITCHES,
             'deepcryopicker': preprocess2d.DEEPCRYOPICKER_SWITCHES}[args.chain]
    off = [s for s in ALL_STEPS if getattr(args, f'no_{s}')]
    foreign = [s for s in off if s not in known]
    if foreign:
        raise InputError('--no-' + foreign[0].replace('_', '-'), f"the {args.chain} chain has no such step "
                                                                f"(steps: {', '.join(known)})")
    image, pixel = read_micrograph(args.micrograph)
    t0 = time.time()
    result, stages = preprocess2d.run_chain(image, args.chain, keep_stages=bool(args.stages_dir),
                                            bin_factor=args.bin, **{s: False for s in off})
    log.info('%s chain on %s (%d×%d) in %.1f s', args.chain, args.micrograph, result.shape[1], result.shape[0],
             time.time() - t0)
    out_pixel = pixel * args.bin if pixel else None
    write_micrograph(args.out, result, out_pixel)
    if args.stages_dir:
        os.makedirs(args.stages_dir, exist_ok=True)
        for i, (name, img) in enumerate(stages):
            write_micrograph(os.path.join(args.stages_dir, f'{i:02d}_{name}.png'), img)
    log.info('wrote %s', args.out)
    return 0
