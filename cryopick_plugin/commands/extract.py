"""Extract subtomograms around coordinates: one MRC per particle plus subtomograms.STAR.

Each box is centred on the voxel nearest to the coordinate (the centre is voxel box//2 of the box);
boxes that would leave the tomogram are skipped and counted. When COORDS has rlnTomoName only the rows
naming this tomogram (file name with or without extension) are used. --binning N shrinks the box to
box/N by Fourier cropping (box must be a multiple of N). Each subtomogram is normalised to zero mean and
unit standard deviation unless --no-normalise; --invert flips the contrast.

Output in DIR: <prefix>_000001.mrc, ... and subtomograms.star (rlnImageName relative to the STAR file,
rlnTomoName, rlnCoordinateX/Y/Z in voxels of the original tomogram, the other input columns, and
rlnPixelSize = tomogram voxel size × N).

Example:
  cryopick extract TS_01.mrc TS_01_dog.star --box 32 --binning 2 --out TS_01_subtomos
"""
import logging
import os

from ..engine.disca import extract
from ..engine.io import mrc, star
from ..engine.errors import InputError

log = logging.getLogger(__name__)


def add_args(parser):
    parser.add_argument('tomogram', help='tomogram (MRC)')
    parser.add_argument('coordinates', help='STAR file with rlnCoordinateX/Y/Z in voxels of the tomogram')
    parser.add_argument('--box', type=int, required=True, help='box edge in voxels of the tomogram')
    parser.add_argument('--binning', type=int, default=1, help='binning factor (Fourier cropping), default 1')
    parser.add_argument('--bin-method', choices=extract.BIN_METHODS, default='fourier',
                        help='fourier (default) or block averaging')
    parser.add_argument('--no-normalise', action='store_true', help='keep the raw grey values')
    parser.add_argument('--invert', action='store_true', help='flip the contrast (dark particles → bright)')
    parser.add_argument('--prefix', default=None, help='file name prefix (default: tomogram name)')
    parser.add_argument('--out', required=True, help='output folder')


def main(args):
    volume, voxel, _ = mrc.open_checked(args.tomogram, ndim=3)
    table = star.read_coordinates(args.coordinates, dims=3)
    table = extract.rows_for_volume(table, args.tomogram, args.coordinates)
    if len(table) == 0:
        raise InputError(args.coordinates, "holds no coordinates")
    star.check_inside(args.coordinates, table, volume.shape, name_col=star.TOMO)
    name = os.path.splitext(os.path.basename(args.tomogram))[0]
    if star.TOMO not in table.columns:
        table.insert(0, star.TOMO, name)
    stack, kept, skipped = extract.extract_subtomograms(
        volume, star.xyz_array(table), args.box, binning=args.binning, normalise=not args.no_normalise,
        invert=args.invert, bin_method=args.bin_method)
    if len(kept) == 0:
        raise InputError(args.coordinates, f"every one of the {len(table)} boxes of {args.box} voxels "
                                           "leaves the tomogram")
    path = extract.write_subtomograms(args.out, stack, table.iloc[kept], voxel * args.binning,
                                      prefix=args.prefix or name)
    log.info('%s: %d subtomograms of %d³ voxels (%d skipped at the border) → %s', args.tomogram, len(kept),
             stack.shape[1], skipped, path)
    return 0
