"""Our SetOfCoordinates3D to and from RELION tomography STAR and Dynamo .tbl, through those plugins' own
converters (pip packages scipion-em-reliontomo and scipion-em-dynamo; no RELION or Dynamo binaries).

RELION: reliontomo's RELION 4 writer (`convert40_tomo.Writer.coordinates2Star`) writes rlnTomoName,
rlnTomoParticleId, rlnTomoManifoldIndex (= groupId, our class), rlnCoordinateX/Y/Z (bottom-left-corner
voxels, scaled by `coordsScale`), rlnOriginX/Y/ZAngst, rlnAngleRot/Tilt/Psi, rlnClassNumber, and Scipion's
own columns. Its reader (`createReaderTomo(..., isCoordsStar=True)` → `starFile2Coords3D`) brings positions,
tsIds, angles and groupId back. This is also the file reliontomo's 'import 3D coordinates from a star
file' protocol reads. RELION tomography coordinates are customarily at the tilt series' pixel size
("bin 1"): pass `sampling_rate` to write them at any pixel size, and the same value when reading back.

Dynamo: scipion-em-dynamo writes tables from subtomograms (`writeDynTable`) and reads coordinates from
tables (`readDynCoord`). A coordinate becomes a subtomogram-like record holding its Coordinate3D and its
transform, so Dynamo's writer produces the angles (ZXZ, its matrix2eulerAngles) and positions (columns
24-26, bottom-left corner). Its writer leaves the tomogram (column 20) and region (21) at 0 and the class
(22) at 1; `readDynCoord` takes groupId from column 21. We fill column 20 with the tomogram's index in the
.vll (1-based, sorted tsIds) and columns 21 and 22 with the groupId, so classes survive both readers.
One table per tomogram, as Dynamo's extraction works per tomogram.
"""
import os

import numpy as np

from pwem.objects import Transform
from tomo import constants as tomo_const
from tomo.objects import SetOfCoordinates3D, SubTomogram

from .convert import tomograms_by_name
from .engine.errors import InputError

BLC = tomo_const.BOTTOM_LEFT_CORNER
DYNAMO_TOMO_COL, DYNAMO_REGION_COL, DYNAMO_CLASS_COL = 20, 21, 22  # 1-based Dynamo table columns


def _scale(coords, sampling_rate):
    """Factor from the set's voxels to voxels of `sampling_rate` (None: the set's own)."""
    if sampling_rate is None:
        return 1.0
    if not sampling_rate or sampling_rate <= 0:
        raise InputError('sampling rate', f"must be positive, got {sampling_rate}")
    return float(coords.getSamplingRate()) / float(sampling_rate)


def _ts_ids(coords):
    ids = sorted({c.getTomoId() for c in coords.iterCoordinates()})
    if not ids or any(not t for t in ids):
        raise InputError(f"coordinates {coords.getObjId()}", "every coordinate needs a tomogram id (tsId)")
    return ids


def new_coordinates_set(folder, tomograms, box_size, suffix=''):
    """An empty SetOfCoordinates3D in `folder`, linked to `tomograms` and at their sampling rate."""
    out = SetOfCoordinates3D.create(folder, template='coordinates%s.sqlite', suffix=suffix)
    out.setPrecedents(tomograms)
    out.setSamplingRate(tomograms.getSamplingRate())
    out.setBoxSize(int(box_size))
    return out


# ------------------------------------------------------------------------------------------------ RELION
def export_relion_tomo_star(coords, star_path, sampling_rate=None):
    """Write a SetOfCoordinates3D as a RELION 4 tomography particles STAR with reliontomo's writer.

    sampling_rate: Å/voxel the STAR coordinates are to be expressed in (None: the set's). Returns the path.
    """
    from reliontomo.convert.convert40_tomo import Writer
    star_path = os.fspath(star_path)
    os.makedirs(os.path.dirname(os.path.abspath(star_path)), exist_ok=True)
    Writer().coordinates2Star(coords, star_path, _ts_ids(coords), coordsScale=_scale(coords, sampling_rate))
    return star_path


def import_relion_tomo_star(star_path, tomograms, out_coords, star_sampling_rate=None):
    """Fill `out_coords` (an empty SetOfCoordinates3D at the tomograms' sampling rate, see
    `new_coordinates_set`) from a RELION tomography STAR with reliontomo's reader.

    star_sampling_rate: Å/voxel of the STAR coordinates (None: the tomograms'). Rows whose rlnTomoName is
    not a tsId of `tomograms` are left out by reliontomo (it logs them). Returns `out_coords`.
    """
    from reliontomo.convert import createReaderTomo
    star_path = os.fspath(star_path)
    if not os.path.exists(star_path):
        raise InputError(star_path, "file not found")
    reader, _ = createReaderTomo(star_path, isRelion5=False, isCoordsStar=True)
    star_sr = float(star_sampling_rate or tomograms.getSamplingRate())
    reader.starFile2Coords3D(out_coords, tomograms, star_sr / float(tomograms.getSamplingRate()))
    return out_coords


# ------------------------------------------------------------------------------------------------ Dynamo
class _CoordinatesAsSubtomograms:
    """What dynamo's writeDynTable reads from a SetOfSubTomograms, made from coordinates of one tomogram."""

    def __init__(self, coordinates, scale):
        self._items = []
        for coord in coordinates:
            scaled = coord.clone()
            # Positions are scaled in the bottom-left-corner frame, which Dynamo tables use.
            for axis in 'XYZ':
                getattr(scaled, 'set' + axis)(getattr(coord, 'get' + axis)(BLC) * scale, BLC)
            sub = SubTomogram()
            sub.setObjId(coord.getObjId())
            sub.setCoordinate3D(scaled)
            matrix = np.array(coord.getMatrix(), dtype=float)
            matrix[:3, 3] *= scale
            sub.setTransform(Transform(matrix))
            self._items.append(sub)

    def iterSubtomos(self):
        return iter(self._items)


def export_dynamo_tables(coords, out_dir, tomograms=None, sampling_rate=None):
    """Write one Dynamo table per tomogram with scipion-em-dynamo's writer, plus a volume list.

    coords: SetOfCoordinates3D. tomograms: the tomograms they refer to (default: the set's precedents).
    sampling_rate: Å/voxel for the table positions (None: the set's). Files: out_dir/<tsId>.tbl and
    out_dir/tomograms.vll (one tomogram file per line, line i = tomogram index i in column 20).
    Returns {tsId: tbl path}.
    """
    from dynamo.convert import writeDynTable
    tomos = tomograms_by_name(tomograms if tomograms is not None else coords.getPrecedents())
    scale = _scale(coords, sampling_rate)
    ids = _ts_ids(coords)
    missing = [t for t in ids if t not in tomos]
    if missing:
        raise InputError(f"coordinates {coords.getObjId()}", f"refer to tomograms not in the input: {missing}")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'tomograms.vll'), 'w') as vll:
        vll.writelines(os.path.abspath(tomos[t].getFileName()) + '\n' for t in ids)
    tables = {}
    for index, ts_id in enumerate(ids, start=1):
        items = [c.clone() for c in coords.iterCoordinates(volume=tomos[ts_id])]
        path = os.path.join(out_dir, f'{ts_id}.tbl')
        with open(path, 'w') as fh:
            writeDynTable(fh, _CoordinatesAsSubtomograms(items, scale))
        groups = {c.getObjId(): int(c.getGroupId() or 1) for c in items}
        with open(path) as fh:
            rows = [line.split() for line in fh if line.strip()]
        for row in rows:
            row[DYNAMO_TOMO_COL - 1] = str(index)
            row[DYNAMO_REGION_COL - 1] = row[DYNAMO_CLASS_COL - 1] = str(groups[int(float(row[0]))])
        with open(path, 'w') as fh:
            fh.writelines(' '.join(row) + '\n' for row in rows)
        tables[ts_id] = path
    return tables


def import_dynamo_tables(tables, tomograms, out_coords, table_sampling_rate=None):
    """Fill `out_coords` (empty, see `new_coordinates_set`) from Dynamo tables with dynamo's reader.

    tables: {tsId: tbl path}. table_sampling_rate: Å/voxel of the table positions (None: the
    tomograms'). Returns `out_coords`.
    """
    from dynamo.convert import readDynCoord
    tomos = tomograms_by_name(tomograms)
    scale = float(table_sampling_rate or tomograms.getSamplingRate()) / float(tomograms.getSamplingRate())
    for ts_id, path in sorted(tables.items()):
        if ts_id not in tomos:
            raise InputError(path, f"tomogram '{ts_id}' is not in the input tomograms")
        if not os.path.exists(path):
            raise InputError(path, "file not found")
        readDynCoord(path, out_coords, tomos[ts_id], scaleFactor=scale)
    return out_coords
