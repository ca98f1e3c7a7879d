"""Template-free candidate picking in a tomogram with a Difference of Gaussians (before DISCA).

The DoG scales follow the particle diameter (voxels); local maxima of the response (for 'dark' particles,
of its negative) are kept strongest first with no two picks closer than --min-distance (default half the
diameter), up to --max-picks. Scores (rlnAutopickFigureOfMerit) are in robust noise standard deviations of
the DoG map, so a --threshold means the same in every tomogram. The tomogram is processed in tiles, so it
may be larger than the memory.

Output: a STAR file with rlnTomoName, rlnCoordinateX/Y/Z (voxels, origin at the first voxel),
rlnClassNumber = 1 and rlnAutopickFigureOfMerit, sorted by decreasing score.

Example:
  cryopick dog-pick TS_01.mrc --diameter 12 --threshold 4 --max-picks 1000 --out TS_01_dog.star
"""
import logging
import os

from ..engine.disca import dog
from ..engine.io import mrc, star

log = logging.getLogger(__name__)


def add_args(parser):
    parser.add_argument('tomogram', help='tomogram (MRC)')
    parser.add_argument('--diameter', type=float, required=True, help='particle diameter in voxels')
    parser.add_argument('--polarity', choices=dog.POLARITIES, default='dark',
                        help='particle contrast: dark (default, usual cryo-ET), bright or both')
    parser.add_argument('--threshold', type=float, default=None,
                        help='minimum score in noise standard deviations (default: none)')
    parser.add_argument('--max-picks', type=int, default=None, help='keep at most this many picks')
    parser.add_argument('--min-distance', type=float, default=None,
                        help='minimum distance between picks in voxels (default diameter/2)')
    parser.add_argument('--exclude-border', type=int, default=None,
                        help='drop picks closer than this to a face (default diameter/4, rounded up)')
    parser.add_argument('--tile', type=int, default=128, help='tile edge in voxels (default 128)')
    parser.add_argument('--tomo-name', default=None, help='rlnTomoName to write (default: file name stem)')
    parser.add_argument('--out', required=True, help='output STAR file')


def main(args):
    volume, _, _ = mrc.open_checked(args.tomogram, ndim=3)
    name = args.tomo_name or os.path.splitext(os.path.basename(args.tomogram))[0]
    picks = dog.dog_pick(volume, args.diameter, polarity=args.polarity, threshold=args.threshold,
                         n_max=args.max_picks, min_distance=args.min_distance, tile=args.tile,
                         exclude_border=args.exclude_border, volume_name=name)
    star.write_coordinates(args.out, picks)
    log.info('%s: %d picks → %s', args.tomogram, len(picks), args.out)
    return 0
