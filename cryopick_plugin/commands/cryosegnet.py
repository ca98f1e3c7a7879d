"""CryoSegNet picking: U-Net probability map, then Segment Anything masks (or the U-Net-only path).

For every micrograph the trained attention U-Net (train-cryosegnet) gives a particle probability map,
after the model's own preprocessing. With a SAM checkpoint (--sam-checkpoint, or $CRYOPICK_SAM_CHECKPOINT
unless --no-sam) SAM's automatic mask generator runs on that map and CryoSegNet's filter keeps masks with
predicted IoU > --iou whose box is near the most frequent box size (--size-factor); each box centre is a
pick. Without one, picks are maxima of the distance transform of the map thresholded at --threshold.

Writes DIR/<micrograph>_picks.star with rlnMicrographName, rlnCoordinateX (column), rlnCoordinateY (row of
the micrograph array as read; no flip), rlnClassNumber, rlnAutopickFigureOfMerit and rlnDiameter, in
pixels of the micrograph; with --save-maps also DIR/<micrograph>_prob.mrc. The score is the value the
picking threshold was applied to: SAM's predicted IoU (kept above --iou) or the U-Net probability at the
pick (kept at or above --threshold), so keeping rows with a score at or above that threshold keeps every
pick, and a higher one is a stricter picking.

Examples:
  cryopick cryosegnet mics/*.mrc --model csn.pt --out picks/ --sam-checkpoint sam_vit_h_4b8939.pth
  cryopick cryosegnet a.jpg b.jpg --model csn.pt --out picks/ --no-sam --threshold 0.4
"""
import logging
import os
import time

from ..engine.pick2d.cryosegnet import picker as cryosegnet
from ..engine.io import star
from ..engine.errors import InputError
from . import add_threads_arg
from ..engine.pick2d.micrograph_io import EDGE_MARGIN
from ..engine.settings import SAM_CHECKPOINT_VAR

log = logging.getLogger(__name__)


def add_args(parser):
    parser.add_argument('micrographs', nargs='+', help='micrographs to pick (MRC, TIFF, JPG/PNG greyscale)')
    parser.add_argument('--model', required=True, help='cryosegnet model (train-cryosegnet)')
    parser.add_argument('--out', required=True, help='output folder for <micrograph>_picks.star')
    parser.add_argument('--sam-checkpoint', default=None,
                        help=f'Segment Anything checkpoint (default ${SAM_CHECKPOINT_VAR} when set)')
    parser.add_argument('--sam-type', choices=['vit_b', 'vit_l', 'vit_h'], default=None,
                        help='SAM model type (default: read from the checkpoint)')
    parser.add_argument('--no-sam', action='store_true', help='U-Net-only picking even when a SAM checkpoint is set')
    parser.add_argument('--points-per-side', type=int, default=32, help='SAM prompt grid (default 32)')
    parser.add_argument('--pred-iou-thresh', type=float, default=0.88, help='SAM generator IoU threshold (0.88)')
    parser.add_argument('--stability-thresh', type=float, default=0.95, help='SAM stability threshold (0.95)')
    parser.add_argument('--iou', type=float, default=0.94, help='keep SAM masks with predicted IoU above this (0.94)')
    parser.add_argument('--size-factor', type=float, default=0.2, help='SAM box size tolerance factor (0.2)')
    parser.add_argument('--threshold', type=float, default=None,
                        help='U-Net-only path: probability threshold (default: the model\'s, chosen on its '
                             'validation micrographs; 0.5 when it had none)')
    parser.add_argument('--diameter', type=float, default=None,
                        help='particle diameter in pixels (default: the training diameter)')
    parser.add_argument('--edge-margin', type=float, default=EDGE_MARGIN,
                        help="picks closer than this many particle diameters to the micrograph's edge are "
                             "dropped (default 0.5: the particle is cut by the edge; 0 keeps every pick)")
    parser.add_argument('--save-maps', action='store_true', help='also write the probability maps (MRC)')
    parser.add_argument('--device', default=None, help='auto, cpu, cuda or cuda:N')
    add_threads_arg(parser)


def main(args):
    from ..engine.pick2d.micrograph_io import read_micrograph
    from ..engine.io.mrc import write_mrc
    for path in args.micrographs:
        if not os.path.exists(path):
            raise InputError(path, "file not found")
    if args.points_per_side < 1:
        raise InputError('--points-per-side', "must be at least 1")
    if not 0 <= args.edge_margin < 10:
        raise InputError('--edge-margin', f"must be 0 or more diameters (below 10), got {args.edge_margin:g}")
    model = cryosegnet.load_cryosegnet(args.model, args.device)
    checkpoint = None if args.no_sam else (args.sam_checkpoint or os.environ.get(SAM_CHECKPOINT_VAR) or None)
    sam = None
    if checkpoint:
        from ..engine.pick2d.cryosegnet.sam import load_sam
        sam = load_sam(checkpoint, args.sam_type, device=model.device)
    else:
        log.info('no SAM checkpoint: U-Net-only picking (threshold + distance-transform maxima)')
    threshold = args.threshold if args.threshold is not None else float(model.meta.get('threshold', 0.5))
    os.makedirs(args.out, exist_ok=True)
    total = 0
    for path in args.micrographs:
        t0 = time.time()
        image, pixel = read_micrograph(path)
        picks, diag = cryosegnet.cryosegnet_pick(
            image, model, diameter_px=args.diameter, sam_model=sam, threshold=threshold,
            points_per_side=args.points_per_side, pred_iou_thresh=args.pred_iou_thresh,
            stability_score_thresh=args.stability_thresh, iou_filter=args.iou, size_factor=args.size_factor,
            source=path, edge_margin=args.edge_margin)
        stem = os.path.splitext(os.path.basename(path))[0]
        table = star.coordinates_frame(star.xyz_array(picks), os.path.basename(path),
                                       scores=picks[star.SCORE].to_numpy(), micrograph=True)
        table[star.DIAMETER] = picks[star.DIAMETER].to_numpy()
        star.write_coordinates(os.path.join(args.out, f'{stem}_picks.star'), table)
        if args.save_maps:
            write_mrc(os.path.join(args.out, f'{stem}_prob.mrc'), diag['prob'], pixel or 1.0)
        total += len(picks)
        log.info('%s: %d picks (%s path) in %.1f s', path, len(picks), diag['path'], time.time() - t0)
    log.info('%d micrographs, %d picks → %s', len(args.micrographs), total, args.out)
    return 0
