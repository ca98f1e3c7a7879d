"""Coordinate tables in RELION STAR files, read and written with `starfile`.

A coordinate table is a pandas DataFrame with RELION column names:

==========================  =====================================================================
rlnTomoName / rlnMicrographName  the volume (tsId) or micrograph the row belongs to
rlnCoordinateX/Y(/Z)        position in voxels (pixels) of that volume, origin at the first voxel
rlnClassNumber              class (1-based; DeepETPicker class / DISCA cluster / simulated template)
rlnAutopickFigureOfMerit    score of the pick (optional)
rlnAngleRot/Tilt/Psi        orientation, RELION ZYZ Euler angles in degrees (optional)
==========================  =====================================================================

Extra columns travel along untouched.
"""
import os

import numpy as np
import pandas as pd
import starfile

from ..errors import InputError
from .mrc import atomic_path

TOMO = 'rlnTomoName'
MIC = 'rlnMicrographName'
X, Y, Z = 'rlnCoordinateX', 'rlnCoordinateY', 'rlnCoordinateZ'
CLASS = 'rlnClassNumber'
SCORE = 'rlnAutopickFigureOfMerit'
ROT, TILT, PSI = 'rlnAngleRot', 'rlnAngleTilt', 'rlnAnglePsi'
DIAMETER = 'rlnDiameter'
ANGLES = (ROT, TILT, PSI)


def read_star_blocks(path):
    """Return the STAR file's data blocks as an ordered dict of DataFrames (or dicts for non-loops)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(path, "file not found")
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile raises a variety of parser errors
        raise InputError(path, f"not a readable STAR file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    return blocks


def read_coordinates(path, dims=3):
    """Read the first loop that has coordinate columns; check columns and values.

    Returns a DataFrame with at least rlnCoordinateX/Y(/Z) as float and rlnClassNumber as int (1 when
    absent). Raises InputError naming the file when no block has the coordinate columns or a value is not
    finite.
    """
    blocks = read_star_blocks(path)
    needed = [X, Y, Z][:dims]
    for block in blocks.values():
        if isinstance(block, pd.DataFrame) and all(c in block.columns for c in needed):
            df = block.copy()
            break
    else:
        raise InputError(path, f"no data block with columns {', '.join(needed)}")
    for col in needed:
        df[col] = pd.to_numeric(df[col], errors='coerce').astype(float)
        if not np.all(np.isfinite(df[col].to_numpy())):
            raise InputError(path, f"column {col} holds non-numeric or non-finite values")
    if CLASS in df.columns:
        df[CLASS] = pd.to_numeric(df[CLASS], errors='coerce')
        if df[CLASS].isna().any():
            raise InputError(path, f"column {CLASS} holds non-numeric values")
        df[CLASS] = df[CLASS].astype(int)
    else:
        df[CLASS] = 1
    for col in (TOMO, MIC):
        if col in df.columns:
            df[col] = df[col].astype(str)
    return df.reset_index(drop=True)


def write_star(path, blocks):
    """Write DataFrames (a single one, or a dict name -> DataFrame) as a STAR file, atomically."""
    if isinstance(blocks, pd.DataFrame):
        blocks = {'particles': blocks}
    with atomic_path(path, suffix='.star') as tmp:
        starfile.write(blocks, tmp, overwrite=True, float_format='%.6f')
    return path


def write_coordinates(path, df, block='particles'):
    """Write a coordinate table (RELION columns) as a STAR file, atomically."""
    return write_star(path, {block: df.reset_index(drop=True)})


def coordinates_frame(xyz, volume_name=None, classes=None, scores=None, angles=None, micrograph=False):
    """Build a coordinate table from an (N, 2|3) array of x, y(, z) positions and optional columns."""
    xyz = np.asarray(xyz, dtype=float)
    # An empty pick list is a valid answer: keep the columns (x, y for micrographs, x, y, z otherwise).
    xyz = xyz.reshape(0, 2 if micrograph else 3) if xyz.size == 0 else xyz.reshape(len(xyz), -1)
    data = {}
    if volume_name is not None:
        data[MIC if micrograph else TOMO] = [str(volume_name)] * len(xyz) \
            if np.ndim(volume_name) == 0 else [str(v) for v in volume_name]
    for i, col in enumerate([X, Y, Z][:xyz.shape[1]]):
        data[col] = xyz[:, i]
    data[CLASS] = np.ones(len(xyz), dtype=int) if classes is None else np.asarray(classes, dtype=int)
    if scores is not None:
        data[SCORE] = np.asarray(scores, dtype=float)
    if angles is not None:
        angles = np.asarray(angles, dtype=float).reshape(len(xyz), 3)
        for i, col in enumerate(ANGLES):
            data[col] = angles[:, i]
    return pd.DataFrame(data)


def xyz_array(df):
    """Positions of a coordinate table as an (N, 2|3) float array in x, y(, z) order."""
    cols = [c for c in (X, Y, Z) if c in df.columns]
    return df[cols].to_numpy(dtype=float)


def check_inside(path, df, shape_zyx, name_col=None):
    """Raise InputError when a coordinate lies outside a volume of shape (z, y, x) / (y, x)."""
    xyz = xyz_array(df)
    bounds = np.asarray(shape_zyx[::-1], dtype=float)[:xyz.shape[1]]
    bad = np.any((xyz < -0.5) | (xyz > bounds - 0.5), axis=1)
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        where = f" of {df[name_col].iloc[i]}" if name_col and name_col in df.columns else ""
        raise InputError(path, f"{int(bad.sum())} coordinate(s) outside the volume{where} "
                               f"(first: {tuple(np.round(xyz[i], 1))}, size x,y,z = {tuple(bounds.astype(int))})")


def rows_for_volume(table, volume_path, source):
    """Rows of a coordinate table that belong to a tomogram / micrograph (all rows without a name column).

    A row belongs when its rlnTomoName (or rlnMicrographName) equals the file name with or without
    extension. Raises InputError naming `source` when no row does.
    """
    col = TOMO if TOMO in table.columns else MIC if MIC in table.columns else None
    if col is None:
        return table.reset_index(drop=True)
    base = os.path.basename(os.fspath(volume_path))
    stem = os.path.splitext(base)[0]
    keep = table[col].astype(str).isin([base, stem, os.fspath(volume_path)])
    if not keep.any():
        names = ', '.join(sorted(table[col].astype(str).unique())[:5])
        raise InputError(source, f"no row has {col} = {stem} (names present: {names})")
    return table[keep].reset_index(drop=True)
