"""DeepCryoPicker: fully automatic 2D particle picking (clustering → automatic training set → CNN → NMS).

Without --model, a classifier is trained first on all the given micrographs, with no labels: the
micrographs are rescaled (steps of 0.125) so particles are ~24 px (--preset cpu) or ~160 px (paper),
preprocessed (AutoCryoPicker chain), clustered by intensity (IBC; or k-means, fuzzy c-means, SLIC
super-clustering), the cleaned regions that look like single particles become up to 3 shape classes,
background windows a fourth, and a CNN learns them. Then every micrograph is scored by the CNN (fully
convolutional), large high-score regions are dropped and the local maxima go through NMS.

Writes <out>/<micrograph stem>_picks.star (rlnMicrographName, rlnCoordinateX = column, rlnCoordinateY =
row in pixels of the micrograph as stored, rlnAutopickFigureOfMerit, rlnClassNumber = shape class) per
micrograph, and <out>/deepcryopicker_model.pt (+ .json) when a model was trained.
Particles are assumed dark on a lighter background (raw cryo-EM); use --polarity bright otherwise.

Examples:
  cryopick deepcryopicker mics/*.mrc --diameter 108 --out picks/
  cryopick deepcryopicker mics/*.mrc --diameter 108 --out model_dir/ --train-only
  cryopick deepcryopicker new/*.mrc --model model_dir/deepcryopicker_model.pt --threshold 0.6 --out picks/
"""
import logging
import os
import time

from ..engine.pick2d.deepcryopicker import cnn2d, picker as dcp, ibc
from ..engine.io import star
from ..engine.errors import InputError
from . import add_threads_arg, add_resume_args
from ..engine.pick2d.micrograph_io import EDGE_MARGIN, read_micrograph

log = logging.getLogger(__name__)
MODEL_NAME = 'deepcryopicker_model.pt'


def add_args(parser):
    parser.add_argument('micrographs', nargs='+', help='2D micrographs (MRC, or greyscale JPG/PNG/TIF)')
    parser.add_argument('--diameter', type=float, default=None,
                        help='particle diameter in pixels (default: the model\'s, else estimated)')
    parser.add_argument('--out', required=True, help='output folder')
    parser.add_argument('--model', help='trained model (.pt) to pick with; no training')
    parser.add_argument('--train-only', action='store_true', help='train and save the model, do not pick')
    parser.add_argument('--preset', choices=sorted(cnn2d.PRESETS), default='cpu',
                        help='network preset: cpu (48² window, narrow) or paper (227² AlexNet-like)')
    parser.add_argument('--threshold', type=float, default=None,
                        help='particle score threshold (default: the model\'s, calibrated on the '
                             'background of its training micrographs)')
    parser.add_argument('--clustering', choices=ibc.METHODS, default='ibc', help='pixel clustering (ibc)')
    parser.add_argument('--shape', choices=ibc.SHAPES, default='irregular',
                        help='particle shape used to select training particles (irregular)')
    parser.add_argument('--polarity', choices=('dark', 'bright'), default='dark',
                        help='particles darker (raw cryo-EM, default) or brighter than the background')
    parser.add_argument('--per-class', type=int, default=None, help='training samples per class (preset)')
    parser.add_argument('--epochs', type=int, default=None, help='training epochs (preset)')
    parser.add_argument('--max-train', type=int, default=20, help='train on at most this many micrographs (20)')
    parser.add_argument('--self-training', type=int, default=dcp.SELF_TRAINING_ROUNDS, metavar='N',
                        help='rounds of retraining on the classifier\'s own confident picks of the training '
                             f'micrographs ({dcp.SELF_TRAINING_ROUNDS}; 0 = the published method)')
    parser.add_argument('--score-rotations', type=int, choices=(1, 4), default=dcp.SCORE_ROTATIONS,
                        help='average the classifier\'s scores over the four 90° turns of each micrograph (4; '
                             '4× the scoring time) or score it as it is (1, the default); stored in a trained '
                             'model, so picking with it scores the same way')
    parser.add_argument('--edge-margin', type=float, default=EDGE_MARGIN,
                        help="picks closer than this many particle diameters to the micrograph's edge are "
                             "dropped (default 0.5: the particle is cut by the edge; 0 keeps every pick)")
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--device', default=None, help='auto, cpu, cuda or cuda:N')
    add_threads_arg(parser)
    add_resume_args(parser, f'OUT/{MODEL_NAME}.checkpoint.pt (written after every epoch)')


def main(args):
    for path in args.micrographs:
        if not os.path.exists(path):
            raise InputError(path, "file not found")
    if args.model and args.train_only:
        raise InputError('--train-only', "nothing to do with --model (the model is already trained)")
    if args.diameter is not None and not args.diameter > 0:
        raise InputError('--diameter', f"must be positive, got {args.diameter:g}")
    if args.self_training < 0:
        raise InputError('--self-training', f"must be 0 or more rounds, got {args.self_training}")
    if not 0 <= args.edge_margin < 10:
        raise InputError('--edge-margin', f"must be 0 or more diameters (below 10), got {args.edge_margin:g}")
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise InputError('--threshold', f"must be within [0, 1], got {args.threshold:g}")
    if args.resume is True and not args.model:
        from ..engine import checkpoint
        checkpoint.check(checkpoint.path_for(os.path.join(args.out, MODEL_NAME)), True)
    os.makedirs(args.out, exist_ok=True)
    if args.model:
        model = dcp.load_deepcryopicker(args.model, args.device)
    else:
        images = [read_micrograph(p)[0] for p in args.micrographs[:max(1, args.max_train)]]
        diameter = args.diameter
        if diameter is None:
            diameter = dcp.estimate_diameter(images[0], args.polarity, args.clustering, args.seed)
            log.info('estimated particle diameter %.1f px', diameter)
        t0 = time.time()
        path = os.path.join(args.out, MODEL_NAME)
        model, info = dcp.train_deepcryopicker(
            images, diameter, args.preset, args.clustering, args.shape, args.polarity,
            per_class=args.per_class, epochs=args.epochs, seed=args.seed, device=args.device,
            out=path, log=log.info, self_training=args.self_training, score_rotations=args.score_rotations,
            resume=args.resume)
        del images
        log.info('model trained in %.1f s → %s', time.time() - t0, path)
        if args.train_only:
            return 0
    total = 0
    from ..engine.progress import Progress, compute_summary
    log.info('picking %d micrograph(s); %s', len(args.micrographs), compute_summary(model.device, None))
    # a line after every micrograph: how many are done and when the last will be
    progress = Progress('picking', len(args.micrographs), unit='micrograph', say=log.info, every=0)
    for path in args.micrographs:
        image, _ = read_micrograph(path)
        picks, _, diag = dcp.deepcryopicker_pick(image, args.diameter, model=model, seed=args.seed,
                                                 threshold=args.threshold, edge_margin=args.edge_margin)
        table = star.coordinates_frame(star.xyz_array(picks), os.path.basename(path),
                                       classes=picks[star.CLASS].to_numpy(),
                                       scores=picks[star.SCORE].to_numpy(), micrograph=True)
        stem = os.path.splitext(os.path.basename(path))[0]
        star.write_coordinates(os.path.join(args.out, f'{stem}_picks.star'), table)
        total += len(table)
        progress.update(note=f"{path}: {len(table)} picks in {diag['times']['total']:.1f} s")
    log.info('%d micrographs, %d picks → %s', len(args.micrographs), total, args.out)
    return 0
