"""MRC input and output.

Volumes are opened with memory mapping, so a tomogram larger than the RAM is only paged in where it is
read; code that needs the whole volume goes through `iter_slabs` / `iter_tiles`. Every write is atomic: the
data goes to a temporary file in the destination folder, which is renamed over the destination only once
it is complete, so an interrupted run never leaves a half-written MRC behind.
"""
import contextlib
import os
import stat
import tempfile
import warnings

import mrcfile
import numpy as np

from ..errors import InputError

# Bytes of float32 working data a whole-volume pass may hold at once (per slab). Keeps the peak memory of
# statistics and normalisation bounded whatever the tomogram size.
DEFAULT_SLAB_BYTES = 256 * 1024 ** 2
# Bytes of the float64 copy `volume_stats` makes per slab: statistics are read-bound, so small slabs cost
# no speed, and the pass stays far below the size of a large tomogram.
STATS_SLAB_BYTES = 32 * 1024 ** 2


def _open(path, mode='r'):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(path, "file not found")
    if os.path.isdir(path):
        raise InputError(path, "is a folder, expected an MRC file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            return mrcfile.mmap(path, mode=mode, permissive=False)
    except (ValueError, OSError, EOFError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(path, f"not a readable MRC file ({msg})") from None


def read_header(path):
    """Return (shape (z, y, x), voxel size in Å (x), dtype) without reading the data."""
    with _open(path) as mrc:
        shape = tuple(int(s) for s in mrc.data.shape)
        voxel = float(mrc.voxel_size.x)
        dtype = mrc.data.dtype
    return shape, voxel, dtype


def open_volume(path, ndim=3):
    """Open an MRC file read-only with memory mapping and check its dimensionality.

    Returns (array, voxel_size_A). The array is a read-only numpy memmap in (z, y, x) order for
    ``ndim=3`` and (y, x) for ``ndim=2`` (a single-section 3D file is accepted as a 2D image). The file
    stays open as long as the array is referenced.
    """
    mrc = _open(path)
    data = mrc.data
    if data is None:
        raise InputError(path, "MRC file holds no data")
    if ndim == 2 and data.ndim == 3 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != ndim:
        what = {2: "a 2D image", 3: "a 3D volume"}[ndim]
        raise InputError(path, f"expected {what}, found an array of shape {tuple(data.shape)}")
    if min(data.shape) < 2:
        raise InputError(path, f"degenerate shape {tuple(data.shape)}")
    return data, float(mrc.voxel_size.x)


def iter_slabs(shape, itemsize=4, max_bytes=DEFAULT_SLAB_BYTES):
    """Yield slices along axis 0 whose float32 copies stay below `max_bytes`."""
    plane = int(np.prod(shape[1:])) * itemsize
    step = max(1, int(max_bytes // max(plane, 1)))
    for start in range(0, shape[0], step):
        yield slice(start, min(shape[0], start + step))


def volume_stats(data, max_bytes=STATS_SLAB_BYTES):
    """Mean, standard deviation, minimum, maximum and NaN/inf presence, computed slab by slab.

    Works on memory-mapped arrays without loading them whole: each slab is one float64 copy of at most
    `max_bytes` (the sum of squares is a dot product, so no second temporary), and float64 accumulators keep
    the mean exact enough for volumes of billions of voxels.
    """
    n = 0
    total = 0.0
    total_sq = 0.0
    lo, hi = np.inf, -np.inf
    finite = True
    for sl in iter_slabs(data.shape, itemsize=8, max_bytes=max_bytes):
        block = np.asarray(data[sl], dtype=np.float64).ravel()
        if not np.all(np.isfinite(block)):
            finite = False
            block = block[np.isfinite(block)]
        if block.size == 0:
            continue
        n += block.size
        total += float(block.sum())
        total_sq += float(np.dot(block, block))
        lo = min(lo, float(block.min()))
        hi = max(hi, float(block.max()))
    mean = total / n if n else float('nan')
    var = max(total_sq / n - mean * mean, 0.0) if n else float('nan')
    return {'mean': mean, 'std': float(np.sqrt(var)), 'min': lo, 'max': hi, 'finite': finite}


def check_usable(path, data, stats=None):
    """Raise InputError when a volume holds NaN/inf or is constant; return its statistics."""
    stats = stats or volume_stats(data)
    if not stats['finite']:
        raise InputError(path, "contains NaN or infinite values")
    if not stats['std'] > 0 or stats['max'] == stats['min']:
        raise InputError(path, f"is constant (every voxel is {stats['min']:g})")
    return stats


def open_checked(path, ndim=3):
    """`open_volume` plus the NaN / constant check. Returns (array, voxel_size, stats)."""
    data, voxel = open_volume(path, ndim=ndim)
    stats = check_usable(path, data)
    return data, voxel, stats


def current_umask():
    """The process's file-mode creation mask, read without changing it where the system allows."""
    try:
        # Linux ≥ 4.7 reports it; setting and restoring os.umask would race with other threads' files.
        with open('/proc/self/status') as fh:
            for line in fh:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def final_mode(path):
    """The permissions a plain open(path, 'w') would leave: those of an existing file, else 0666 & ~umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_path(path, suffix=''):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The file gets the permissions a plain open() would have given it (see `final_mode`): mkstemp creates
    it 0600, which would hide every output from the colleagues sharing a Scipion project.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.part' + suffix,
                               dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, final_mode(path))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_mrc(path, array, voxel_size=1.0):
    """Write a 2D or 3D array as MRC (float32 unless int8/int16/uint8/uint16) atomically."""
    array = np.asarray(array)
    if array.dtype not in (np.int8, np.int16, np.uint8, np.uint16, np.float32):
        array = array.astype(np.float32)
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(array)
            mrc.voxel_size = float(voxel_size)
    return path


@contextlib.contextmanager
def new_volume(path, shape, dtype=np.float32, voxel_size=1.0):
    """Create a memory-mapped MRC to be filled tile by tile; it appears at `path` only when complete."""
    with atomic_path(path) as tmp:
        mrc = mrcfile.new_mmap(tmp, shape=tuple(int(s) for s in shape), mrc_mode=_mode(dtype),
                               overwrite=True)
        try:
            mrc.voxel_size = float(voxel_size)
            yield mrc.data
            mrc.update_header_stats()
            mrc.flush()
        finally:
            mrc.close()


def _mode(dtype):
    dtype = np.dtype(dtype)
    return {np.dtype(np.int8): 0, np.dtype(np.int16): 1, np.dtype(np.float32): 2,
            np.dtype(np.uint16): 6, np.dtype(np.uint8): 6}.get(dtype, 2)
