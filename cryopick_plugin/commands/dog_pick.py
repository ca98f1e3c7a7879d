"""Template-free candidate picking in a tomogram with a Difference of Gaussians (before DISCA).

The DoG scales follow the particle diameter (voxels); local maxima of the response (for 'dark' particles,
of its negative) are kept strongest first with no two picks closer than --min-distance (default half the
diameter), up to --max-picks. Scores (rlnAutopickFigureOfMerit) are in robust noise standard deviations of
the DoG map. The tomogram is processed in tiles, so it may be larger than the memory.

Threshold (--threshold):
  auto    chosen from this tomogram's own scores: a two-component mixture of background maxima and
          particles (the default without --max-picks; the log says which threshold it chose). When the
          scores form one population every candidate is kept, with a warning: right for a crowded
          tomogram, not for a few particles among many background blobs (give a number or --validation);
  none    keep every positive maximum (the default with --max-picks: the strongest up to that many);
  NUMBER  keep scores at or above it.
With --validation TOMO.mrc:TRUTH.star (repeatable) the threshold is instead the one with the best
localisation F1 (one-to-one matching within a quarter of the diameter) on those tomograms and their
particle coordinates, picked with the same settings.

Output: a STAR file with rlnTomoName, rlnCoordinateX/Y/Z (voxels, origin at the first voxel),
rlnClassNumber = 1 and rlnAutopickFigureOfMerit, sorted by decreasing score.

Examples:
  cryopick dog-pick TS_01.mrc --diameter 12 --out TS_01_dog.star
  cryopick dog-pick TS_01.mrc --diameter 12 --validation TS_02.mrc:TS_02_picks.star --out TS_01_dog.star
  cryopick dog-pick TS_01.mrc --diameter 12 --threshold 4 --max-picks 1000 --out TS_01_dog.star
"""
import logging
import os

from ..engine.disca import dog
from ..engine.errors import InputError
from ..engine.io import mrc, star

log = logging.getLogger(__name__)


def threshold_value(text):
    """'auto', 'none' or a number (argparse type)."""
    value = str(text).strip().lower()
    if value in ('auto', 'none'):
        return value
    try:
        return float(value)
    except ValueError:
        raise InputError('--threshold', f"expected auto, none or a number, got {text!r}") from None


def add_args(parser):
    parser.add_argument('tomogram', help='tomogram (MRC)')
    parser.add_argument('--diameter', type=float, required=True, help='particle diameter in voxels')
    parser.add_argument('--polarity', choices=dog.POLARITIES, default='dark',
                        help='particle contrast: dark (default, usual cryo-ET), bright or both')
    parser.add_argument('--threshold', type=str, default=None, metavar='auto|none|T',
                        help='minimum score in noise standard deviations, auto (from the scores) or none '
                             '(default: auto, or none when --max-picks is given)')
    parser.add_argument('--validation', action='append', default=[], metavar='TOMO:TRUTH',
                        help='choose the threshold on this tomogram and its particle coordinates (STAR) '
                             'instead (repeatable)')
    parser.add_argument('--max-picks', type=int, default=None, help='keep at most this many picks')
    parser.add_argument('--min-distance', type=float, default=None,
                        help='minimum distance between picks in voxels (default diameter/2)')
    parser.add_argument('--exclude-border', type=int, default=None,
                        help='drop picks closer than this to a face (default diameter/4, rounded up)')
    parser.add_argument('--tile', type=int, default=128, help='tile edge in voxels (default 128)')
    parser.add_argument('--tomo-name', default=None, help='rlnTomoName to write (default: file name stem)')
    parser.add_argument('--out', required=True, help='output STAR file')


def _validation_items(specs):
    """(volume, truth table, name) per TOMO:TRUTH spec, checked before any picking."""
    items = []
    for spec in specs:
        parts = spec.rsplit(':', 1)
        if len(parts) != 2 or not all(parts):
            raise InputError('--validation', f"expected TOMO.mrc:TRUTH.star, got {spec!r}")
        tomo, truth_path = parts
        volume, _, _ = mrc.open_checked(tomo, ndim=3)
        truth = star.rows_for_volume(star.read_coordinates(truth_path, dims=3), tomo, truth_path)
        if len(truth) == 0:
            raise InputError(truth_path, f"holds no coordinates for {os.path.basename(tomo)}")
        items.append((volume, truth, os.path.splitext(os.path.basename(tomo))[0]))
    return items


def main(args):
    threshold = threshold_value(args.threshold) if args.threshold is not None else \
        ('none' if args.max_picks is not None else 'auto')
    if args.validation and args.threshold is not None:
        raise InputError('--validation', "chooses the threshold: give it or --threshold, not both")
    volume, _, _ = mrc.open_checked(args.tomogram, ndim=3)
    validation = _validation_items(args.validation)
    name = args.tomo_name or os.path.splitext(os.path.basename(args.tomogram))[0]
    settings = dict(polarity=args.polarity, min_distance=args.min_distance, tile=args.tile,
                    exclude_border=args.exclude_border)
    picks = dog.dog_pick(volume, args.diameter, threshold=threshold if isinstance(threshold, float) else None,
                         n_max=args.max_picks if threshold == 'none' or isinstance(threshold, float) else None,
                         volume_name=name, **settings)
    if validation:
        scored = [dog.dog_pick(v, args.diameter, volume_name=n, **settings) for v, _, n in validation]
        radius = args.diameter / 4.0
        curve = dog.threshold_curve(scored, [t for _, t, _ in validation], radius)
        best = int(curve['f1'].argmax())  # as dog.choose_threshold: ties go to the highest threshold
        chosen = float(curve['threshold'][best])
        log.info('threshold %.3g chosen on %d validation tomogram(s): localisation F1 %.3f within %g voxels '
                 '(precision %.3f, recall %.3f)', chosen, len(validation), curve['f1'][best], radius,
                 curve['precision'][best], curve['recall'][best])
    elif threshold == 'auto':
        chosen, how = dog.threshold_from_scores(picks[star.SCORE].to_numpy())
        if how == 'two populations':
            log.info('threshold %.3g chosen from the scores of %d candidates (background and particles; '
                     '--threshold sets one)', chosen, len(picks))
        else:
            log.warning('no threshold: the scores of the %d candidates form %s, so all are kept. Right for a '
                        'crowded tomogram; with few particles among many background blobs give --threshold '
                        '(about 3-5) or --validation', len(picks),
                        'one population' if how == 'one population' else 'too few for a choice')
    else:
        chosen = None
    if chosen is not None:
        picks = picks[picks[star.SCORE] >= chosen]
        if args.max_picks is not None:
            picks = picks.head(args.max_picks)
        picks = picks.reset_index(drop=True)
    star.write_coordinates(args.out, picks)
    log.info('%s: %d picks → %s', args.tomogram, len(picks), args.out)
    return 0
