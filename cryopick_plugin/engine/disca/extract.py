"""Subtomogram extraction, and subtomograms as RELION 3.1-style files (one MRC each plus a STAR table).

Centring. A position (x, y, z) becomes the voxel c = floor(p + 0.5) on each axis (halves round up) and
the box spans [c − box//2, c − box//2 + box). The particle centre is thus voxel box//2 of the box: the
middle voxel for odd boxes, the first voxel of the upper half for even ones, which is the origin RELION,
Scipion and an FFT-centred array (numpy.fft.fftshift) all use. Boxes that would leave the volume are
skipped (no padding), and counted.

Binning. By Fourier cropping (the RELION / Scipion way to rescale): the box's spectrum, with the origin
at box//2, is cut to the central box/binning frequencies. The centre stays exactly at voxel
(box/binning)//2, the mean is preserved and there is no aliasing; block averaging ('block') is offered
as the cheap alternative (it shifts the centre by (binning−1)/2 original voxels for even boxes). `box`
must be a multiple of `binning`.

Normalisation. Each subtomogram is set to zero mean and unit standard deviation after binning (DISCA's
PyTorch port does the same); `invert=True` also flips the contrast so dark particles become bright.

Files. `write_subtomograms` writes <prefix>_000001.mrc ... and a STAR table (block 'particles') with
rlnImageName (path relative to the STAR file), rlnTomoName, rlnCoordinateX/Y/Z in voxels of the
ORIGINAL tomogram, every other column of the coordinate table carried over (class, score, angles), and
rlnPixelSize, the subtomogram voxel size in Å. That is an optics-free table, as Scipion's and RELION 3.1's
readers take for 3D subtomograms; the voxel size is also in each MRC header.
"""
import os

import numpy as np
import pandas as pd

from ..io import mrc, star
from ..errors import InputError

IMAGE = 'rlnImageName'
PIXEL = 'rlnPixelSize'
BIN_METHODS = ('fourier', 'block')


def box_centres(xyz):
    """Integer (z, y, x) centre voxels of (N, 3) x, y, z positions (halves round up)."""
    xyz = np.asarray(xyz, dtype=float).reshape(-1, 3)
    return np.floor(xyz[:, ::-1] + 0.5).astype(np.int64)


def fourier_crop(vol, size):
    """Rescale a cubic volume to `size`³ by cropping its spectrum; keeps the centre at voxel n//2."""
    n = vol.shape[0]
    if size == n:
        return np.asarray(vol, dtype=np.float32)
    spec = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(vol)))
    lo = n // 2 - size // 2
    spec = spec[lo:lo + size, lo:lo + size, lo:lo + size]
    out = np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(spec))).real
    return (out * (size / n) ** 3).astype(np.float32)


def block_average(vol, factor):
    n = vol.shape[0] // factor
    return vol.reshape(n, factor, n, factor, n, factor).mean(axis=(1, 3, 5)).astype(np.float32)


def _normalise(sub, invert):
    sub = sub - sub.mean()
    std = sub.std()
    if std > 0:
        sub = sub / std
    return -sub if invert else sub


def extract_subtomograms(volume, xyz, box, binning=1, normalise=True, invert=False, bin_method='fourier'):
    """Cut cubic boxes centred on positions out of a 3D volume (z, y, x), memory map welcome.

    xyz: (N, 3) x, y, z positions in voxels of `volume`. box: box edge in voxels of `volume`.
    binning: integer factor; the output box is box // binning. normalise: zero mean, unit std per
    subtomogram. invert: multiply by −1 (after normalising). bin_method: 'fourier' or 'block'.

    Returns (stack (M, b, b, b) float32, kept (M,) indices into xyz, n_skipped_border).
    """
    if getattr(volume, 'ndim', None) != 3:
        raise InputError('volume', f"expected a 3D volume, got shape {getattr(volume, 'shape', None)}")
    box, binning = int(box), int(binning)
    if box < 2:
        raise InputError('--box', f"must be at least 2 voxels, got {box}")
    if binning < 1 or box % binning:
        raise InputError('--binning', f"must be a positive divisor of the box ({box}), got {binning}")
    if bin_method not in BIN_METHODS:
        raise InputError('bin_method', f"must be one of {', '.join(BIN_METHODS)}, got {bin_method!r}")
    if box > min(volume.shape):
        raise InputError('--box', f"{box} voxels does not fit in the volume {tuple(volume.shape)}")
    xyz = np.asarray(xyz, dtype=float)
    if xyz.size and (xyz.ndim != 2 or xyz.shape[1] != 3):
        raise InputError('coordinates', f"expected (N, 3) x, y, z positions, got shape {xyz.shape}")
    if not np.all(np.isfinite(xyz)):
        raise InputError('coordinates', "hold non-finite values")
    out_box = box // binning
    centres = box_centres(xyz)
    start = centres - box // 2
    inside = np.all((start >= 0) & (start + box <= np.array(volume.shape)), axis=1)
    kept = np.flatnonzero(inside)
    stack = np.empty((len(kept), out_box, out_box, out_box), dtype=np.float32)
    # visit boxes in z order so a memory map is read roughly sequentially
    for k in np.argsort(start[kept, 0], kind='stable'):
        z, y, x = start[kept[k]]
        sub = np.asarray(volume[z:z + box, y:y + box, x:x + box], dtype=np.float32)
        if binning > 1:
            sub = fourier_crop(sub, out_box) if bin_method == 'fourier' else block_average(sub, binning)
        if not np.all(np.isfinite(sub)):
            raise InputError('volume', f"contains NaN or infinite values near voxel (z, y, x) = {(z, y, x)}")
        if normalise:
            sub = _normalise(sub, invert)
        elif invert:
            sub = -sub
        stack[k] = sub
    return stack, kept, int(len(xyz) - len(kept))


def write_subtomograms(out_dir, stack, table, voxel_size, prefix='subtomo', star_name='subtomograms.star'):
    """Write each subtomogram as an MRC and a STAR table describing them; return the STAR path.

    stack: (M, b, b, b). table: the M coordinate rows they come from (RELION columns, coordinates in voxels
    of the original tomogram), in the same order. voxel_size: subtomogram voxel size in Å (tomogram voxel
    size × binning). Files: out_dir/<prefix>_000001.mrc ..., out_dir/<star_name>.
    """
    stack = np.asarray(stack)
    if stack.ndim != 4 or len(set(stack.shape[1:])) != 1:
        raise InputError('subtomograms', f"expected an (M, b, b, b) stack, got shape {stack.shape}")
    if len(table) != len(stack):
        raise InputError('subtomograms', f"{len(stack)} subtomograms for {len(table)} table rows")
    os.makedirs(out_dir, exist_ok=True)
    digits = max(6, len(str(len(stack))))
    names = [f'{prefix}_{i + 1:0{digits}d}.mrc' for i in range(len(stack))]
    for name, sub in zip(names, stack):
        mrc.write_mrc(os.path.join(out_dir, name), sub.astype(np.float32), voxel_size=voxel_size)
    out = table.reset_index(drop=True).drop(columns=[IMAGE, PIXEL], errors='ignore')
    out.insert(0, IMAGE, names)
    out[PIXEL] = float(voxel_size)
    path = os.path.join(out_dir, star_name)
    star.write_star(path, {'particles': out})
    return path


def read_subtomograms(star_path):
    """Read subtomograms listed in a STAR table (rlnImageName relative to the STAR file or absolute).

    Returns (stack (M, b, b, b) float32, table, voxel_size in Å: rlnPixelSize when present, else the first
    MRC header). Raises InputError naming the file when an image is missing, not a cube, or of another
    size than the first, or holds NaN, and when the table is empty.
    """
    blocks = star.read_star_blocks(star_path)
    table = next((b for b in blocks.values() if isinstance(b, pd.DataFrame) and IMAGE in b.columns), None)
    if table is None:
        raise InputError(star_path, f"no data block with column {IMAGE}")
    table = table.reset_index(drop=True)
    if len(table) == 0:
        raise InputError(star_path, "lists no subtomograms")
    folder = os.path.dirname(os.path.abspath(os.fspath(star_path)))
    subs, shape, header_voxel = [], None, None
    for name in table[IMAGE].astype(str):
        if '@' in name:
            raise InputError(star_path, f"stacked image names ({name}) are not supported; one MRC per "
                                        "subtomogram is expected")
        path = name if os.path.isabs(name) else os.path.join(folder, name)
        data, voxel = mrc.open_volume(path, ndim=3)
        if len(set(data.shape)) != 1:
            raise InputError(star_path, f"{name} is not a cube (shape {tuple(data.shape)})")
        if shape is None:
            shape, header_voxel = data.shape, voxel
        elif data.shape != shape:
            raise InputError(star_path, f"{name} has box {data.shape[0]}, the first subtomogram has "
                                        f"box {shape[0]}: all must have the same size")
        sub = np.asarray(data, dtype=np.float32)
        if not np.all(np.isfinite(sub)):
            raise InputError(star_path, f"{name} contains NaN or infinite values")
        subs.append(sub)
    if PIXEL in table.columns:
        pix = pd.to_numeric(table[PIXEL], errors='coerce').to_numpy(dtype=float)
        if len(pix) and (not np.all(np.isfinite(pix)) or np.ptp(pix) > 1e-6 * max(abs(pix[0]), 1)):
            raise InputError(star_path, f"{PIXEL} is not the same for every subtomogram")
        voxel_size = float(pix[0]) if len(pix) else header_voxel
    else:
        voxel_size = header_voxel
    stack = np.stack(subs)
    return stack, table, voxel_size


rows_for_volume = star.rows_for_volume  # kept for callers of the engine API

