"""Weak labels (DeepETPicker): particle centres of one tomogram → a class-index label map (uint8 MRC).

Every centre in COORDS.star becomes a small solid shape filled with its class (rlnClassNumber, 1 when the
column is absent): a truncated ball of radius √2·r clipped to the (2r+1)³ cube (tball, DeepETPicker's
default), a ball of radius r, or the whole cube, with r = diameter // 2. Where shapes overlap the voxel
goes to the nearest centre. When the STAR file has rlnTomoName, only the rows naming this tomogram
(its file name, with or without extension) are used.

Which diameter: the label is a small core, not the whole particle. Use about half the particle diameter,
odd (a 22-voxel particle → 11; DeepETPicker's setting; labels as large as the particle merge neighbours
into one blob). --particle-diameter D does this for you: label diameter = round(D/2), made odd, at least 3.

Examples:
  cryopick labels TS_01.mrc TS_01_picks.star --particle-diameter 22 --out TS_01_labels.mrc
  cryopick labels TS_01.mrc TS_01_picks.star --diameter 11 --diameter-per-class 2:7 --out TS_01_labels.mrc
"""
import logging

import numpy as np

from ..engine.pick3d import labels
from ..engine.io import mrc, star
from ..engine.errors import InputError

log = logging.getLogger(__name__)


def add_args(parser):
    parser.add_argument('tomogram', help='tomogram (MRC) the coordinates refer to')
    parser.add_argument('coordinates', help='STAR file with rlnCoordinateX/Y/Z (voxels of the tomogram)')
    add_diameter_args(parser, required=True)
    parser.add_argument('--shape', choices=labels.KINDS, default='tball', help='label shape (default tball)')
    parser.add_argument('--out', required=True, help='output label map (uint8 MRC)')


def label_diameter(particle_diameter):
    """The label diameter for particles of `particle_diameter` voxels: about half of it, odd, at least 3."""
    d = float(particle_diameter)
    if not d > 0:
        raise InputError('--particle-diameter', f"must be positive, got {particle_diameter:g}")
    return max(3, int(round(d / 2.0)) | 1)


def add_diameter_args(parser, required=False, default_text=None):
    """--diameter / --particle-diameter (one of them) and their per-class forms, shared with train3d."""
    size = parser.add_mutually_exclusive_group(required=required)
    size.add_argument('--diameter', type=int, default=None, metavar='D',
                      help='label diameter in voxels: about half the particle diameter, odd (even values are '
                           'rounded up)' + (f'; default: {default_text}' if default_text else ''))
    size.add_argument('--particle-diameter', type=float, default=None, metavar='D',
                      help='particle diameter in voxels instead: the label diameter is then about half of it, '
                           'odd (22 → 11, 33.6 → 17)' + ('' if required else '; default: none, see --diameter'))
    per_class = parser.add_mutually_exclusive_group()
    per_class.add_argument('--diameter-per-class', default='', metavar='C:D,...',
                           help='per-class label diameters overriding the one above, e.g. 1:13,2:7 '
                                '(default: none)')
    per_class.add_argument('--particle-diameter-per-class', default='', metavar='C:D,...',
                           help='per-class particle diameters instead, e.g. 1:33.6,2:20.4 (default: none)')


def parse_particle_diameters(text):
    """'1:33.6,2:20' → {1: 33.6, 2: 20.0}; InputError on anything else."""
    from ..engine.pick3d.labels import parse_class_diameters
    return parse_class_diameters(text, float, '--particle-diameter-per-class', '1:33.6,2:20')


def diameter_spec(args):
    """{class or 'default': label diameter} from the options of `add_diameter_args` ({} when none given)."""
    spec = {}
    if getattr(args, 'particle_diameter', None) is not None:
        spec['default'] = label_diameter(args.particle_diameter)
    elif getattr(args, 'diameter', None) is not None:
        spec['default'] = args.diameter
    if getattr(args, 'particle_diameter_per_class', ''):
        spec.update({c: label_diameter(d) for c, d in parse_particle_diameters(args.particle_diameter_per_class).items()})
    spec.update(labels.parse_class_diameters(getattr(args, 'diameter_per_class', '')))
    return spec


def main(args):
    shape, voxel, _ = mrc.read_header(args.tomogram)
    if len(shape) != 3 or min(shape) < 2:
        raise InputError(args.tomogram, f"expected a 3D volume, found shape {shape}")
    table = star.read_coordinates(args.coordinates, dims=3)
    table = star.rows_for_volume(table, args.tomogram, args.coordinates)
    if len(table) == 0:
        raise InputError(args.coordinates, "holds no coordinates")
    star.check_inside(args.coordinates, table, shape, name_col=star.TOMO)
    diameters = diameter_spec(args)
    labels.radius_of(diameters['default'])
    if args.particle_diameter is not None:
        log.info('particle diameter %g voxels → label diameter %d', args.particle_diameter, diameters['default'])
    labels.write_label_map(args.out, shape, table, diameters, kind=args.shape, voxel_size=voxel)
    counts = np.bincount(table[star.CLASS].to_numpy(dtype=int))
    log.info('%s: %d particles (%s) labelled as %s → %s', args.tomogram, len(table),
             ', '.join(f'class {c}: {n}' for c, n in enumerate(counts) if n), args.shape, args.out)
    return 0
