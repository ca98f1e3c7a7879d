"""Weak labels (DeepETPicker): particle centres of one tomogram → a class-index label map (uint8 MRC).

Every centre in COORDS.star becomes a small solid shape filled with its class (rlnClassNumber, 1 when the
column is absent): a truncated ball of radius √2·r clipped to the (2r+1)³ cube (tball, DeepETPicker's
default), a ball of radius r, or the whole cube, with r = diameter // 2. Where shapes overlap the voxel
goes to the nearest centre. When the STAR file has rlnTomoName, only the rows naming this tomogram
(its file name, with or without extension) are used.

Example:
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
    parser.add_argument('--diameter', type=int, required=True, help='label diameter in voxels (odd values keep '
                                                                  'it centred; even ones are rounded up)')
    parser.add_argument('--diameter-per-class', default='', metavar='C:D,...',
                        help='per-class diameters overriding --diameter, e.g. 1:13,2:7')
    parser.add_argument('--shape', choices=labels.KINDS, default='tball', help='label shape (default tball)')
    parser.add_argument('--out', required=True, help='output label map (uint8 MRC)')


def main(args):
    shape, voxel, _ = mrc.read_header(args.tomogram)
    if len(shape) != 3 or min(shape) < 2:
        raise InputError(args.tomogram, f"expected a 3D volume, found shape {shape}")
    table = star.read_coordinates(args.coordinates, dims=3)
    table = star.rows_for_volume(table, args.tomogram, args.coordinates)
    if len(table) == 0:
        raise InputError(args.coordinates, "holds no coordinates")
    star.check_inside(args.coordinates, table, shape, name_col=star.TOMO)
    diameters = {'default': args.diameter}
    diameters.update(labels.parse_class_diameters(args.diameter_per_class))
    labels.radius_of(args.diameter)
    labels.write_label_map(args.out, shape, table, diameters, kind=args.shape, voxel_size=voxel)
    counts = np.bincount(table[star.CLASS].to_numpy(dtype=int))
    log.info('%s: %d particles (%s) labelled as %s → %s', args.tomogram, len(table),
             ', '.join(f'class {c}: {n}' for c, n in enumerate(counts) if n), args.shape, args.out)
    return 0
