"""Files for RELION 3.1 and wrappers around its programs (`relion_reconstruct`, `relion_preprocess`).

RELION 3.1 (Debian's `relion` package is 3.1.3) reads STAR files with a ``data_optics`` block and a
``data_particles`` / ``data_micrographs`` block, and takes 3D subtomograms as images of dimensionality 3.
Everything here was checked against the real 3.1.3 binaries (tests/io/test_relion.py runs them).

Centring conventions, measured with relion_preprocess 3.1.3 and relied upon by the tests:

- RELION's rlnCoordinateX/Y are 0-based pixel indices, exactly as in cryopick: a particle at integer
  (x, y) is extracted as ``image[y - box//2 : y - box//2 + box, x - box//2 : x - box//2 + box]``, so the
  picked pixel is pixel box//2 of the box (the FFT-centred origin RELION and cryopick both use). There is
  NO off-by-one between the two conventions.
- RELION 3.1 truncates fractional coordinates (30.5 → 30, 50.6 → 50), while cryopick rounds halves up
  (`extract.box_centres`: floor(p + 0.5)). `write_relion_coordinate_stars` therefore writes
  floor(p + 0.5): RELION then centres every box on the same pixel as cryopick's own crops.
- relion_preprocess only extracts even box sizes.
- relion_preprocess looks for the coordinates of a micrograph listed as ``dir/name.mrc`` in
  ``<coord_dir>dir/name<coord_suffix>`` (the micrograph's name as listed, without extension; an absolute
  micrograph path is appended to coord_dir as it is) and silently extracts nothing when that file is
  missing. Hence the layout written here: every micrograph is listed by its bare file name, linked into
  the RELION working folder when it lives elsewhere, with ``<name>_<suffix>.star`` beside it.
- Orientation: `relion_reconstruct --3d_rot` takes a subtomogram at angles (rot, tilt, psi), with
  A = `geometry.euler_to_matrix(rot, tilt, psi)`, to be particle(x) = reference(Aᵀ x), i.e.
  ``geometry.rotate_volume(reference, A.T)``, and rotates it back before averaging. (Rotating by A
  instead, with the same angles, rebuilds the reference rotated twice.)
- Image names in STAR files are resolved by RELION relative to the folder it runs in, not to the STAR
  file; the wrappers run RELION in the STAR file's folder, and the subtomogram STAR lists images relative
  to that folder (or absolute when they live elsewhere).
"""
import os
import shutil
import subprocess

import numpy as np
import pandas as pd
import starfile

from . import mrc, star
from ..errors import InputError

IMAGE = 'rlnImageName'
OPTICS_GROUP = 'rlnOpticsGroup'
ORIGINS_ANGST = ('rlnOriginXAngst', 'rlnOriginYAngst', 'rlnOriginZAngst')
STDERR_TAIL_LINES = 12


class RelionError(RuntimeError):
    """A RELION program failed: the command, its exit status and the tail of what it printed."""

    def __init__(self, command, returncode, tail):
        self.command = list(command)
        self.returncode = returncode
        self.tail = tail
        super().__init__(f"{os.path.basename(self.command[0])} failed (exit status {returncode}): {tail}"
                         f"\n  command: {' '.join(self.command)}")


def find_program(name):
    """Full path of a RELION program on PATH, or None."""
    return shutil.which(name)


def relion_version(program='relion_reconstruct'):
    """The version string a RELION program prints (e.g. 'RELION version: 3.1.3'), or None without it."""
    path = find_program(program)
    if path is None:
        return None
    out = subprocess.run([path, '--version'], capture_output=True, text=True, timeout=60)
    lines = [ln.strip() for ln in (out.stdout + out.stderr).splitlines() if 'version' in ln.lower()]
    return lines[0] if lines else None


def _tail(text, n=STDERR_TAIL_LINES):
    # RELION prints a C++ backtrace before its own 'ERROR:' line; the message after it is what matters.
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    if any(ln.startswith('ERROR') for ln in lines):
        first = max(i for i, ln in enumerate(lines) if ln.startswith('ERROR'))
        lines = lines[first:]
    return ' | '.join(lines[-n:])


def run_relion(args, cwd=None, timeout=None):
    """Run a RELION program; return its CompletedProcess, raise RelionError on failure.

    args: the command as a list, program name first (looked up on PATH). RELION reports errors on stderr
    and with a non-zero exit status; both are turned into one exception carrying the last lines.
    """
    args = [str(a) for a in args]
    path = find_program(args[0])
    if path is None:
        raise RelionError(args, None, f"{args[0]} not found on PATH (Debian/Ubuntu: apt-get install relion)")
    try:
        proc = subprocess.run([path] + args[1:], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise RelionError(args, None, f"timed out after {timeout} s: {_tail(str(exc.stderr or ''))}") from None
    if proc.returncode != 0:
        raise RelionError(args, proc.returncode, _tail(proc.stderr or proc.stdout))
    return proc


def _optics_block(pixel_size, voltage, cs, amplitude_contrast, image_size=None, dimensionality=None,
                  micrograph=False):
    row = {'rlnOpticsGroupName': 'opticsGroup1', OPTICS_GROUP: 1, 'rlnVoltage': float(voltage),
           'rlnSphericalAberration': float(cs), 'rlnAmplitudeContrast': float(amplitude_contrast)}
    if micrograph:
        row['rlnMicrographPixelSize'] = float(pixel_size)
    else:
        row.update({'rlnImagePixelSize': float(pixel_size), 'rlnImageSize': int(image_size),
                    'rlnImageDimensionality': int(dimensionality)})
    return pd.DataFrame([row])


def _write_relion_star(path, blocks):
    # RELION 3.1 recognises its own format by the optics table; the version line documents it.
    with mrc.atomic_path(path, suffix='.star') as tmp:
        starfile.write(blocks, tmp, overwrite=True, float_format='%.6f')
        with open(tmp) as fh:
            text = fh.read()
        with open(tmp, 'w') as fh:
            fh.write('# version 30001\n' + text)
    return path


def _relative_or_absolute(path, folder):
    path = os.path.abspath(os.fspath(path))
    rel = os.path.relpath(path, folder)
    return path if rel.startswith('..') else rel


# ------------------------------------------------------------------------------------------ map comparison
def lowpass(volume, voxel_size, resolution):
    """Sharp low-pass of a 2D/3D array: keep spatial frequencies up to 1/resolution (Å⁻¹)."""
    volume = np.asarray(volume, dtype=np.float64)
    freqs = np.meshgrid(*[np.fft.fftfreq(n, d=voxel_size) for n in volume.shape], indexing='ij')
    keep = np.sqrt(sum(f * f for f in freqs)) <= 1.0 / float(resolution)
    return np.fft.ifftn(np.fft.fftn(volume) * keep).real


def normalised_cc(a, b):
    """Pearson correlation of two arrays of the same shape (0 when one is constant)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def centre_in_box(volume, box):
    """Pad (or crop) a cubic volume to `box`³ keeping its centre voxel n//2 at box//2."""
    volume = np.asarray(volume, dtype=np.float32)
    n = volume.shape[0]
    out = np.zeros((box,) * 3, dtype=np.float32)
    lo_in, lo_out = max(0, n // 2 - box // 2), max(0, box // 2 - n // 2)
    m = min(n - lo_in, box - lo_out)
    out[lo_out:lo_out + m, lo_out:lo_out + m, lo_out:lo_out + m] = \
        volume[lo_in:lo_in + m, lo_in:lo_in + m, lo_in:lo_in + m]
    return out


# ------------------------------------------------------------------------------------------ 3D averaging
def write_relion31_subtomo_star(path, image_paths, table, voxel_size, voltage=300.0, cs=2.7,
                                amplitude_contrast=0.07):
    """Write a RELION 3.1 particles STAR for 3D subtomograms (one MRC each), ready for relion_reconstruct.

    image_paths: one cubic MRC per row of `table` (e.g. written by `extract.write_subtomograms`), absolute
    or relative to the current folder. table: the rows they were cut at (RELION columns: rlnTomoName or
    rlnMicrographName, rlnCoordinateX/Y/Z in voxels of the tomogram, optional angles, class, score);
    missing angles are written as 0 (a plain average). voxel_size: subtomogram voxel size in Å.

    Blocks: data_optics (rlnImagePixelSize, rlnImageSize, rlnImageDimensionality 3, microscope values
    RELION requires but ignores without CTF correction) and data_particles (rlnImageName relative to the
    STAR file's folder or absolute, rlnMicrographName = tomogram, coordinates, rlnAngleRot/Tilt/Psi,
    rlnOriginX/Y/ZAngst = 0, rlnOpticsGroup, and rlnClassNumber / rlnAutopickFigureOfMerit when
    present). Returns the path. Raises InputError for mismatched lengths, missing or non-cubic images
    or a bad voxel size.
    """
    path = os.fspath(path)
    image_paths = [os.fspath(p) for p in image_paths]
    table = table.reset_index(drop=True)
    if len(image_paths) != len(table):
        raise InputError(path, f"{len(image_paths)} subtomogram files for {len(table)} table rows")
    if not len(table):
        raise InputError(path, "no subtomograms to write")
    if not voxel_size or not np.isfinite(voxel_size) or voxel_size <= 0:
        raise InputError('voxel size', f"must be a positive number of Å, got {voxel_size}")
    for col in (star.X, star.Y, star.Z):
        if col not in table.columns:
            raise InputError(path, f"the coordinate table has no {col} column")
    box = None
    for image in image_paths:
        shape, _, _ = mrc.read_header(image)
        if len(shape) != 3 or len(set(shape)) != 1:
            raise InputError(image, f"is not a cubic 3D subtomogram (shape {shape})")
        if box is None:
            box = shape[0]
        elif shape[0] != box:
            raise InputError(image, f"has box {shape[0]}, the first subtomogram has box {box}")
    folder = os.path.dirname(os.path.abspath(path))
    name_col = star.TOMO if star.TOMO in table.columns else star.MIC if star.MIC in table.columns else None
    parts = pd.DataFrame({IMAGE: [_relative_or_absolute(p, folder) for p in image_paths]})
    parts[star.MIC] = table[name_col].astype(str).to_numpy() if name_col else 'tomogram'
    for col in (star.X, star.Y, star.Z):
        parts[col] = table[col].to_numpy(dtype=float)
    for col in star.ANGLES:
        parts[col] = table[col].to_numpy(dtype=float) if col in table.columns else 0.0
    for col in ORIGINS_ANGST:
        parts[col] = 0.0
    parts[OPTICS_GROUP] = 1
    if star.CLASS in table.columns:
        parts[star.CLASS] = table[star.CLASS].to_numpy(dtype=int)
    if star.SCORE in table.columns:
        parts[star.SCORE] = table[star.SCORE].to_numpy(dtype=float)
    optics = _optics_block(voxel_size, voltage, cs, amplitude_contrast, image_size=box, dimensionality=3)
    return _write_relion_star(path, {'optics': optics, 'particles': parts})


def run_relion_reconstruct(star_path, out_mrc, box=None, voxel_size=None, sym='c1', maxres=None, pad=2,
                           class_number=None, extra_args=(), timeout=None):
    """Average 3D subtomograms with `relion_reconstruct --3d_rot` (no CTF correction).

    star_path: a STAR from `write_relion31_subtomo_star` (RELION runs in its folder). out_mrc: the map to
    write (atomically). box: expected box edge of the result (checked, None = any). voxel_size: Å (None:
    the optics block's). sym: RELION symmetry group. maxres: Å limit of the reconstruction (None:
    Nyquist). pad: padding factor. class_number: only rows of this rlnClassNumber. extra_args: more
    relion_reconstruct options.

    Command: ``relion_reconstruct --i <star> --o <out> --3d_rot --sym <sym> --pad <pad> [--angpix A]
    [--maxres R] [--class N]`` in the STAR's folder. Returns (map (z, y, x) float32, voxel size in Å).
    Raises RelionError with RELION's last lines when it fails, InputError for bad options.
    """
    star_path = os.path.abspath(os.fspath(star_path))
    if not os.path.exists(star_path):
        raise InputError(star_path, "file not found")
    out_mrc = os.path.abspath(os.fspath(out_mrc))
    if not out_mrc.endswith('.mrc'):
        raise InputError(out_mrc, "relion_reconstruct writes MRC maps: the name must end in .mrc")
    args = ['relion_reconstruct', '--i', star_path, None, '--3d_rot', '--sym', sym, '--pad', int(pad)]
    if voxel_size is not None:
        args += ['--angpix', float(voxel_size)]
    if maxres is not None:
        args += ['--maxres', float(maxres)]
    if class_number is not None:
        args += ['--class', int(class_number)]
    args += list(extra_args)
    with mrc.atomic_path(out_mrc, suffix='.mrc') as tmp:
        args[3:4] = ['--o', tmp]
        run_relion(args, cwd=os.path.dirname(star_path), timeout=timeout)
        if not os.path.exists(tmp) or os.path.getsize(tmp) == 0:
            raise RelionError(args, 0, "finished without writing the map")
        volume, voxel = mrc.open_volume(tmp, ndim=3)
        volume = np.array(volume, dtype=np.float32)
    if box is not None and volume.shape != (int(box),) * 3:
        raise RelionError(args, 0, f"wrote a map of shape {volume.shape}, expected box {box}")
    return volume, voxel


# ------------------------------------------------------------------------------------------ 2D extraction
def relion_coordinates(xy):
    """Coordinates to write for RELION 3.1 so that it centres its box on cryopick's pixel.

    cryopick's centre pixel is floor(p + 0.5) (0-based, the same origin as RELION); RELION 3.1 truncates
    fractional coordinates, so the rounded value is written.
    """
    return np.floor(np.asarray(xy, dtype=float) + 0.5)


def crop_particles_2d(image, xy, box):
    """cryopick's own 2D crops: (N, box, box) float32 boxes of a (y, x) image centred on (x, y) positions.

    The centre pixel is floor(p + 0.5) and becomes pixel box//2 of the box (RELION's convention, see the
    module docstring). Raises InputError when a box leaves the image.
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise InputError('micrograph', f"expected a 2D image, got shape {image.shape}")
    centres = relion_coordinates(np.asarray(xy, dtype=float).reshape(-1, 2)).astype(np.int64)
    start = centres - int(box) // 2
    ny, nx = image.shape
    bad = (start[:, 0] < 0) | (start[:, 1] < 0) | (start[:, 0] + box > nx) | (start[:, 1] + box > ny)
    if np.any(bad):
        raise InputError('coordinates', f"{int(bad.sum())} box(es) of {box} pixels leave the {nx} x {ny} "
                                        f"image (first at x, y = {tuple(centres[np.flatnonzero(bad)[0]])})")
    out = np.empty((len(start), int(box), int(box)), dtype=np.float32)
    for k, (x0, y0) in enumerate(start):
        out[k] = image[y0:y0 + box, x0:x0 + box]
    return out


def _micrograph_lookup(micrograph_paths):
    lookup = {}
    for p in micrograph_paths:
        p = os.path.abspath(os.fspath(p))
        base = os.path.basename(p)
        for key in (base, os.path.splitext(base)[0], p):
            lookup.setdefault(key, p)
    return lookup


def write_relion_coordinate_stars(out_dir, table, suffix='cryopick', micrograph_paths=None, pixel_size=None,
                                  voltage=300.0, cs=2.7, amplitude_contrast=0.1,
                                  micrographs_star='micrographs.star'):
    """Write 2D picks in the layout `relion_preprocess --extract` reads, in a RELION working folder.

    out_dir: the folder RELION is to run in. table: rlnMicrographName (a file name, with or without
    extension, or a path) and rlnCoordinateX/Y (column, row; 0-based pixels, cryopick convention) plus
    optional class / score columns, carried along. micrograph_paths: the micrograph MRC files (None: the
    names in the table are paths). pixel_size: Å/pixel (None: the first micrograph's header).

    Writes, in out_dir: a link `<name>.mrc` to each micrograph living elsewhere; per micrograph
    `<name>_<suffix>.star` (one ``data_`` loop with rlnCoordinateX/Y written as floor(p + 0.5), see
    `relion_coordinates`); and `micrographs_star` (data_optics with rlnMicrographPixelSize, data_micrographs
    with rlnMicrographName = `<name>.mrc`, rlnOpticsGroup). Returns a dict: 'micrographs_star' (path),
    'coord_dir' (out_dir), 'coord_suffix' ('_<suffix>.star'), 'coordinates' (name -> path),
    'micrographs' (name -> listed file name), 'counts' (name -> number of picks). Raises InputError for unknown micrographs, clashing names
    or coordinates outside their micrograph.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if star.MIC not in table.columns:
        raise InputError('coordinates', f"the table has no {star.MIC} column")
    for col in (star.X, star.Y):
        if col not in table.columns:
            raise InputError('coordinates', f"the table has no {col} column")
    if not suffix or any(c in str(suffix) for c in '/ '):
        raise InputError('suffix', f"must be a non-empty name without '/' or spaces, got {suffix!r}")
    names = list(dict.fromkeys(table[star.MIC].astype(str)))
    lookup = _micrograph_lookup(micrograph_paths if micrograph_paths is not None else names)
    os.makedirs(out_dir, exist_ok=True)
    listed, coord_files, counts, listed_names = {}, {}, {}, []
    for name in names:
        src = lookup.get(name) or lookup.get(os.path.basename(name)) or \
            lookup.get(os.path.splitext(os.path.basename(name))[0])
        if src is None or not os.path.exists(src):
            raise InputError(name, "micrograph file not found among the given micrographs")
        shape, header_px, _ = mrc.read_header(src)
        if len(shape) == 3 and shape[0] == 1:
            shape = shape[1:]
        if len(shape) != 2:
            raise InputError(src, f"is not a 2D micrograph (shape {shape})")
        if pixel_size is None:
            pixel_size = header_px
        stem = os.path.splitext(os.path.basename(src))[0]
        mic_file = stem + '.mrc' if src.endswith('.mrc') else os.path.basename(src)
        if mic_file in listed_names:
            raise InputError(src, f"two micrographs are named {mic_file}: RELION finds coordinates by name")
        listed_names.append(mic_file)
        link = os.path.join(out_dir, mic_file)
        if os.path.abspath(link) != src:
            if os.path.lexists(link):
                if os.path.realpath(link) != os.path.realpath(src):
                    raise InputError(link, f"exists and is not {src}")
            else:
                os.symlink(src, link)
        rows = table[table[star.MIC].astype(str) == name]
        xy = rows[[star.X, star.Y]].to_numpy(dtype=float)
        star.check_inside(name, rows, shape)
        coords = pd.DataFrame({star.X: relion_coordinates(xy[:, 0]), star.Y: relion_coordinates(xy[:, 1])})
        for col in (star.CLASS, star.SCORE):
            if col in rows.columns:
                coords[col] = rows[col].to_numpy()
        coord_path = os.path.join(out_dir, f'{stem}_{suffix}.star')
        # An empty block name ('data_') is what RELION's own pickers write.
        star.write_star(coord_path, {'': coords})
        listed[name], coord_files[name], counts[name] = mic_file, coord_path, len(coords)
    if not pixel_size or pixel_size <= 0:
        raise InputError('pixel size', f"must be positive, got {pixel_size}")
    mics = pd.DataFrame({star.MIC: listed_names, OPTICS_GROUP: 1})
    optics = _optics_block(pixel_size, voltage, cs, amplitude_contrast, micrograph=True)
    mic_star = _write_relion_star(os.path.join(out_dir, micrographs_star),
                                  {'optics': optics, 'micrographs': mics})
    return {'micrographs_star': mic_star, 'coord_dir': out_dir, 'coord_suffix': f'_{suffix}.star',
            'coordinates': coord_files, 'micrographs': listed, 'counts': counts}


def read_relion_particles(particles_star, cwd=None):
    """Read a RELION particles STAR and its images ('NNNNNN@stack.mrcs' or one file per image).

    Image paths are resolved relative to `cwd` (default: the STAR's folder), as RELION does relative to
    the folder it ran in. Returns (stack (N, ...) float32, particles DataFrame, optics DataFrame or None).
    """
    particles_star = os.path.abspath(os.fspath(particles_star))
    blocks = star.read_star_blocks(particles_star)
    parts = blocks.get('particles')
    if not isinstance(parts, pd.DataFrame) or IMAGE not in parts.columns:
        raise InputError(particles_star, f"no data_particles block with {IMAGE}")
    optics = blocks.get('optics') if isinstance(blocks.get('optics'), pd.DataFrame) else None
    cwd = cwd or os.path.dirname(particles_star)
    cache, images = {}, []
    for name in parts[IMAGE].astype(str):
        index, _, file_name = name.rpartition('@')
        file_path = file_name if os.path.isabs(file_name) else os.path.join(cwd, file_name)
        if file_path not in cache:
            if not os.path.exists(file_path):
                raise InputError(particles_star, f"image file {file_name} not found (relative to {cwd})")
            # A stack of one image reads as 2D; a 3D file is a stack ('N@') or one subtomogram.
            shape = mrc.read_header(file_path)[0]
            data = mrc.open_volume(file_path, ndim=2 if len(shape) == 2 or shape[0] == 1 else 3)[0]
            cache[file_path] = data[None] if (data.ndim == 2 or not index) else data
        stack = cache[file_path]
        k = int(index) - 1 if index else 0
        if not 0 <= k < len(stack):
            raise InputError(particles_star, f"{name}: the stack holds {len(stack)} images")
        images.append(np.array(stack[k], dtype=np.float32))
    out = np.stack(images) if images else np.zeros((0,), dtype=np.float32)
    return out, parts.reset_index(drop=True), optics


def run_relion_preprocess(coordinate_files, box, part_dir='Particles', part_star='particles.star', norm=False,
                          bg_radius=None, no_ramp=False, invert=False, extra_args=(), timeout=None):
    """Extract 2D particles with `relion_preprocess --extract` and read them back.

    coordinate_files: the dict returned by `write_relion_coordinate_stars` (RELION runs in its coord_dir).
    box: even box size in pixels (RELION 3.1 extracts even boxes only). norm: `--norm` (background to
    mean 0 / std 1 outside `bg_radius` pixels, default box·0.375 as RELION's GUI; `no_ramp` subtracts the
    mean only). invert: `--invert_contrast`. part_dir / part_star: output stack folder and STAR, relative
    to the working folder.

    Command: ``relion_preprocess --i micrographs.star --coord_dir <dir>/ --coord_suffix _<suffix>.star
    --part_dir Particles/ --part_star particles.star --extract --extract_size <box> [--norm --bg_radius R
    [--no_ramp]] [--invert_contrast]``. Returns (stack (N, box, box) float32, particles DataFrame with
    rlnMicrographName, rlnCoordinateX/Y, rlnImageName). Raises InputError for an odd or too small box,
    RelionError when RELION fails or extracts fewer particles than the coordinate files hold.
    """
    box = int(box)
    if box < 2 or box % 2:
        raise InputError('--extract_size', f"RELION 3.1 extracts even box sizes only, got {box}")
    workdir = coordinate_files['coord_dir']
    part_dir = part_dir.rstrip('/') + '/'
    args = ['relion_preprocess', '--i', os.path.relpath(coordinate_files['micrographs_star'], workdir),
            '--coord_dir', './', '--coord_suffix', coordinate_files['coord_suffix'],
            '--part_dir', part_dir, '--part_star', part_star, '--extract', '--extract_size', box]
    if norm:
        radius = int(round(box * 0.375)) if bg_radius is None else int(bg_radius)
        if radius <= 0 or radius >= box // 2 + box // 4:
            raise InputError('--bg_radius', f"must be between 1 and {box // 2 + box // 4 - 1} pixels, got {radius}")
        args += ['--norm', '--bg_radius', radius]
        if no_ramp:
            args.append('--no_ramp')
    if invert:
        args.append('--invert_contrast')
    args += list(extra_args)
    run_relion(args, cwd=workdir, timeout=timeout)
    out_star = os.path.join(workdir, part_star)
    if not os.path.exists(out_star):
        raise RelionError(args, 0, f"finished without writing {part_star}")
    expected = sum(coordinate_files['counts'].values())
    blocks = star.read_star_blocks(out_star)
    parts = blocks.get('particles')
    n = len(parts) if isinstance(parts, pd.DataFrame) else 0
    if n != expected:
        raise RelionError(args, 0, f"extracted {n} particles for {expected} coordinates (coordinate files "
                                   f"not found by name, or boxes outside the micrographs)")
    stack, parts, _ = read_relion_particles(out_star, cwd=workdir)
    return stack, parts
