"""The one place where Scipion sets meet engine files.

3D: a SetOfCoordinates3D becomes a STAR table (RELION columns, x, y, z in voxels of the tomograms the set's
sampling rate refers to, origin at the first voxel) and back. Positions go through scipion-em-tomo's
`Coordinate3D.setPosition/getPosition` with the BOTTOM_LEFT_CORNER convention; the offset it implies is
computed once per tomogram (one probe coordinate) and applied to every row, which keeps big sets fast
without hand-rolling tomo's origin rules. Tomogram ids (tsId) link rows to tomograms.

2D: a SetOfCoordinates becomes a table with rlnMicrographName (the micrograph's micName), rlnCoordinateX
(column) and rlnCoordinateY (row) of the micrograph array as pwem reads it, and back.

Scores travel as rlnAutopickFigureOfMerit, classes (groupId in 3D) as rlnClassNumber.
"""
import os

import numpy as np
import pandas as pd

from pyworkflow.object import Float, Integer
from tomo import constants as tomo_const
from tomo.objects import Coordinate3D

from .engine.io import star
from .engine.errors import InputError

BLC = tomo_const.BOTTOM_LEFT_CORNER
SCIPION = tomo_const.SCIPION


# ----------------------------------------------------------------------------------------------- 3D
def tomo_name(tomo):
    """The name that links a tomogram to rows of a coordinate table: its tsId, else its file's base name."""
    return tomo.getTsId() or os.path.splitext(os.path.basename(tomo.getFileName()))[0]


def tomograms_by_name(tomograms):
    """Ordered dict tsId -> tomogram clone, sorted by tsId (deterministic step order for Continue)."""
    found = {}
    for tomo in tomograms.iterItems():
        found[tomo_name(tomo)] = tomo.clone()
    return dict(sorted(found.items()))


def _blc_offset(tomo):
    """Offset (voxels) between tomo's stored Scipion coordinates and bottom-left-corner coordinates."""
    probe = Coordinate3D()
    probe.setVolume(tomo)
    probe.setPosition(0.0, 0.0, 0.0, BLC)
    return np.array(probe.getPosition(SCIPION), dtype=float)


ID = 'cpId'  # column carrying the Scipion object id of each row (to select items back from engine output)


def coordinates3d_to_frame(coords, tomograms=None, sampling_rate=None, with_ids=False):
    """SetOfCoordinates3D -> coordinate table.

    Positions are given in voxels of `sampling_rate` (default: the set's own sampling rate, that of the
    tomograms it refers to). `tomograms` (default: the set's precedents) provide the origins.
    """
    tomograms = tomograms if tomograms is not None else coords.getPrecedents()
    tomos = tomograms_by_name(tomograms)
    offsets = {name: _blc_offset(t) for name, t in tomos.items()}
    set_sr = coords.getSamplingRate()
    scale = 1.0 if not sampling_rate else set_sr / float(sampling_rate)
    rows = []
    for coord in coords.iterItems(orderBy='id'):
        name = coord.getTomoId()
        if name not in offsets:
            raise InputError(f"coordinates {coords.getObjId()}",
                             f"coordinate {coord.getObjId()} refers to tomogram '{name}', not in the input tomograms")
        raw = np.array([coord._x.get(), coord._y.get(), coord._z.get()], dtype=float)
        x, y, z = (raw - offsets[name]) * scale
        row = {star.TOMO: name, star.X: x, star.Y: y, star.Z: z,
               star.CLASS: int(coord.getGroupId() or 1),
               star.SCORE: float(coord.getScore() or 0.0), ID: int(coord.getObjId())}
        rows.append(row)
    columns = [star.TOMO, star.X, star.Y, star.Z, star.CLASS, star.SCORE] + ([ID] if with_ids else [])
    return pd.DataFrame(rows, columns=columns)


def iter_coordinates3d(df, tomograms, sampling_rate=None, source='coordinates'):
    """Check a coordinate table against tomograms, then yield (row index, Coordinate3D) per row.

    `sampling_rate` is the voxel size (Å) the table's positions are given in (default: the tomograms'); they
    are rescaled to the tomograms' voxels. Rows are matched to tomograms by rlnTomoName == tsId (a table
    without rlnTomoName is accepted when there is exactly one tomogram). Every check happens before the
    first coordinate is made, so a bad table yields nothing.
    """
    tomos = tomograms_by_name(tomograms)
    if not tomos:
        raise InputError(source, "the tomogram set is empty")
    tomo_sr = tomograms.getSamplingRate()
    if not tomo_sr or tomo_sr <= 0:
        raise InputError(source, "the tomograms have no sampling rate")
    scale = 1.0 if not sampling_rate else float(sampling_rate) / tomo_sr
    if star.TOMO not in df.columns:
        if len(tomos) != 1:
            raise InputError(source, f"no {star.TOMO} column to tell which of {len(tomos)} tomograms each row belongs to")
        df = df.assign(**{star.TOMO: next(iter(tomos))})
    names = df[star.TOMO].astype(str)
    unknown = sorted(set(names) - set(tomos))
    if unknown:
        raise InputError(source, f"rows refer to tomograms not in the input set: {', '.join(unknown[:5])}"
                                 + (' ...' if len(unknown) > 5 else '')
                                 + f" (known tsIds: {', '.join(list(tomos)[:5])})")
    xyz = star.xyz_array(df) * scale
    for name, tomo in tomos.items():
        sel = (names == name).to_numpy()
        if sel.any():
            dim_x, dim_y, dim_z = tomo.getDim()
            star.check_inside(source, pd.DataFrame(xyz[sel], columns=[star.X, star.Y, star.Z]),
                              (dim_z, dim_y, dim_x))
    classes = df[star.CLASS].to_numpy(dtype=int) if star.CLASS in df.columns else np.ones(len(df), int)
    scores = df[star.SCORE].to_numpy(dtype=float) if star.SCORE in df.columns else None
    offsets = {name: _blc_offset(t) for name, t in tomos.items()}
    have_angles = all(c in df.columns for c in star.ANGLES)
    if have_angles:
        from .engine.geometry import euler_to_matrix
        angles = df[list(star.ANGLES)].to_numpy(dtype=float)
    for i, name in enumerate(names):
        coord = Coordinate3D()
        coord.setVolume(tomos[name])
        # Raw Scipion values = bottom-left-corner position + the tomogram's offset (from tomo's own rules).
        raw = xyz[i] + offsets[name]
        coord.setPosition(raw[0], raw[1], raw[2], SCIPION)
        coord.setGroupId(int(classes[i]))
        coord.setScore(float(scores[i]) if scores is not None else 0.0)
        if have_angles:
            matrix = np.eye(4)
            matrix[:3, :3] = euler_to_matrix(*angles[i])
            coord.setMatrix(matrix, convention=tomo_const.TR_RELION)
        yield i, coord


def frame_to_coordinates3d(df, coords, tomograms, sampling_rate=None, source='coordinates'):
    """Append the rows of a coordinate table to an (empty) SetOfCoordinates3D; return the count added."""
    added = 0
    for _, coord in iter_coordinates3d(df, tomograms, sampling_rate, source):
        coords.append(coord)
        added += 1
    return added


def frame_to_subtomograms(df, subtomos, tomograms, image_paths, voxel_size, source='subtomograms'):
    """Append subtomograms (one MRC file per row of `df`, in `image_paths`) to an (empty) SetOfSubTomograms.

    `df` holds the positions in voxels of the tomograms; each subtomogram keeps its Coordinate3D (tsId, class,
    score, orientation) and the name of its tomogram.
    """
    from tomo.objects import SubTomogram
    tomos = tomograms_by_name(tomograms)
    names = df[star.TOMO].astype(str).tolist() if star.TOMO in df.columns else [next(iter(tomos))] * len(df)
    added = 0
    for i, coord in iter_coordinates3d(df, tomograms, None, source):
        subtomo = SubTomogram()
        subtomo.setLocation(os.path.abspath(image_paths[i]))
        subtomo.setSamplingRate(float(voxel_size))
        subtomo.setCoordinate3D(coord)
        subtomo.setVolName(tomos[names[i]].getFileName())
        subtomo.setVolId(tomos[names[i]].getObjId())
        subtomo.setClassId(int(coord.getGroupId() or 1))
        subtomos.append(subtomo)
        added += 1
    return added


def subtomograms_to_frame(subtomos):
    """SetOfSubTomograms -> table of rlnImageName (absolute paths) and the Scipion ids, in id order.

    What the engine needs to load the volumes; positions stay with the Scipion objects.
    """
    rows = [{'rlnImageName': os.path.abspath(s.getFileName()), 'cpSubtomoId': int(s.getObjId())}
            for s in subtomos.iterItems(orderBy='id')]
    return pd.DataFrame(rows, columns=['rlnImageName', 'cpSubtomoId'])


def subtomograms_tilt_range(subtomos):
    """(angle min, angle max, where it was read) of the acquisition the subtomograms come from, or None.

    The TomoAcquisition of the set, else of its first subtomogram, else of the tomograms their coordinates
    refer to (set, then first tomogram): extraction protocols do not always copy the acquisition.
    """
    def of(obj):
        acq = obj.getAcquisition() if obj is not None and hasattr(obj, 'getAcquisition') else None
        if acq is None or not hasattr(acq, 'getAngleMin'):
            return None
        lo, hi = acq.getAngleMin(), acq.getAngleMax()
        return (float(lo), float(hi)) if lo is not None and hi is not None and lo < hi else None

    candidates = [('subtomograms', lambda: subtomos), ('first subtomogram', subtomos.getFirstItem)]
    if subtomos.hasCoordinates3D():
        tomograms = lambda: subtomos.getCoordinates3D().getPrecedents()  # noqa: E731
        candidates += [('tomograms', tomograms), ('first tomogram', lambda: tomograms().getFirstItem())]
    for source, get in candidates:
        try:
            found = of(get())
        except Exception:   # a set without items or precedents says nothing about the acquisition
            found = None
        if found:
            return found[0], found[1], source
    return None


# ----------------------------------------------------------------------------------------------- 2D
def mic_name(mic):
    """Base name (no folder, no extension) of a micrograph: the link to rlnMicrographName rows."""
    return os.path.splitext(os.path.basename(mic.getMicName() or mic.getFileName()))[0]


def micrographs_by_name(micrographs):
    found = {}
    for mic in micrographs.iterItems():
        found[mic_name(mic)] = mic.clone()
    return dict(sorted(found.items()))


def coordinates2d_to_frame(coords, micrographs=None, with_ids=False):
    """SetOfCoordinates -> table (rlnMicrographName, X = column, Y = row, score when present)."""
    mics = micrographs if micrographs is not None else coords.getMicrographs()
    names = {mic.getObjId(): mic_name(mic) for mic in mics.iterItems()}
    rows = []
    for coord in coords.iterItems(orderBy='id'):
        name = names.get(coord.getMicId()) or coord.getMicName()
        score = getattr(coord, '_score', None)
        rows.append({star.MIC: name, star.X: float(coord.getX()), star.Y: float(coord.getY()),
                     star.CLASS: int(getattr(coord, '_classNumber', Integer(1)).get() or 1),
                     star.SCORE: float(score.get()) if score is not None and score.get() is not None else 0.0,
                     ID: int(coord.getObjId())})
    return pd.DataFrame(rows, columns=[star.MIC, star.X, star.Y, star.CLASS, star.SCORE] + ([ID] if with_ids else []))


def frame_to_coordinates2d(df, coords, micrographs, scale=1.0, source='coordinates'):
    """Append table rows to an (empty) SetOfCoordinates; rows matched to micrographs by micName.

    Scipion stores 2D positions as integers: positions are rounded. Checks happen before the first append.
    """
    from pwem.objects import Coordinate
    mics = micrographs_by_name(micrographs)
    if not mics:
        raise InputError(source, "the micrograph set is empty")
    if star.MIC not in df.columns:
        if len(mics) != 1:
            raise InputError(source, f"no {star.MIC} column to tell which of {len(mics)} micrographs each row belongs to")
        df = df.assign(**{star.MIC: next(iter(mics))})
    names = df[star.MIC].astype(str).map(lambda n: os.path.splitext(os.path.basename(n))[0])
    unknown = sorted(set(names) - set(mics))
    if unknown:
        raise InputError(source, f"rows refer to micrographs not in the input set: {', '.join(unknown[:5])}")
    xy = star.xyz_array(df)[:, :2] * scale
    for name, mic in mics.items():
        sel = (names == name).to_numpy()
        if sel.any():
            dim_x, dim_y, _ = mic.getDim()
            star.check_inside(source, pd.DataFrame(xy[sel], columns=[star.X, star.Y]), (dim_y, dim_x))
    scores = df[star.SCORE].to_numpy(dtype=float) if star.SCORE in df.columns else np.zeros(len(df))
    classes = df[star.CLASS].to_numpy(dtype=int) if star.CLASS in df.columns else np.ones(len(df), int)
    for i, name in enumerate(names):
        coord = Coordinate()
        coord.setMicrograph(mics[name])
        coord.setPosition(int(round(xy[i, 0])), int(round(xy[i, 1])))
        coord._score = Float(float(scores[i]))
        coord._classNumber = Integer(int(classes[i]))
        coords.append(coord)
    return len(df)


def write_set_star(path, df):
    """Write a table produced here as a STAR file (atomic)."""
    return star.write_coordinates(path, df)
