"""Density templates for the simulators: real maps from a folder, or simple synthetic shapes.

A template is a float32 (z, y, x) density: positive, zero background, the molecule's centre of mass at
the centre voxel of an odd-sized cubic box that holds the molecule in any orientation (so rotating it
about the box centre with `geometry.rotate_volume` never cuts it). Densities are scaled so that the
interior of a molecule is about 1: maps in arbitrary units become comparable, and the synthetic shapes
use the same scale.

Maps are read from ``<folder>/<name>.mrc`` (default `settings.default_templates_dir()`, the 10 Å maps of
shared/data/templates_10A) and resampled when the requested voxel size differs from the map's. Without a
folder the simulators still work: each requested map name is replaced by the unused synthetic shape
closest to it in size (two-lobe, barrel, rod, ring, tetramer, sphere, ...), a warning says so and the
set's ``source`` is 'synthetic'.
"""
import glob
import logging
import os

import numpy as np
from scipy import ndimage

from .. import settings
from ..errors import InputError

log = logging.getLogger(__name__)

# Bounding diameters (Å) of the maps shipped in shared/data/templates_10A. Without a map folder these
# names are still accepted: each is replaced by the unused synthetic shape closest in size.
KNOWN_MAP_DIAMETERS_A = {'4v4r': 336, '5mrc': 372, '4v94': 382, '4cr2': 326, '3j9i': 204, '1bxn': 168,
                         '1qvr': 234, '3cf3': 186, '1u6g': 196, '2cg9': 172, '3d2f': 238, '3gl1': 124,
                         '3h84': 120, '3qm1': 84, '1s3x': 102}
KNOWN_MAPS = tuple(KNOWN_MAP_DIAMETERS_A)

# Synthetic shapes and their bounding diameters (Å). Sizes are defined in Å so that a shape keeps its
# physical size at any voxel size.
SYNTHETIC_DIAMETERS_A = {'two_lobe': 350, 'barrel': 226, 'rod': 331, 'ring': 207, 'tetramer': 185,
                         'sphere': 157, 'l_shape': 279, 'small_ball': 104}
SYNTHETIC_SHAPES = tuple(SYNTHETIC_DIAMETERS_A)

# Fraction of the maximum above which a voxel counts as part of the molecule for its bounding radius
# (used for non-overlapping placement and reported diameters), and a lower one for the box that must hold
# all of the density.
RADIUS_THRESHOLD = 0.05
BOX_THRESHOLD = 0.01

_cache = {}


class TemplateSet(dict):
    """name -> float32 (z, y, x) density, with where each came from and its bounding radius.

    Attributes: ``source`` ('maps', 'synthetic' or 'mixed'), ``sources`` (name -> 'map'/'synthetic'),
    ``voxel_size`` (Å), ``folder`` (map folder or None), ``radius`` (name -> bounding radius in voxels
    about the box centre), ``substitutes`` (requested map name -> synthetic shape used instead).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sources = {}
        self.radius = {}
        self.voxel_size = 10.0
        self.folder = None
        self.substitutes = {}

    @property
    def source(self):
        kinds = set(self.sources.values())
        if kinds == {'map'}:
            return 'maps'
        if kinds == {'synthetic'}:
            return 'synthetic'
        return 'mixed' if kinds else 'none'

    def diameter(self, name):
        """Bounding diameter in voxels."""
        return 2.0 * self.radius[name]


def available_maps(folder):
    """Sorted names of the MRC maps in a folder."""
    return sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(folder, '*.mrc')))


def load_templates(names=None, folder=None, voxel_size=10.0, synthetic=False):
    """Load templates by name.

    names: iterable of map names ('4v4r', ...) and/or synthetic shape names; None = every map in the
    folder (or every synthetic shape without one). folder: map folder; None = the default; False (or
    ``synthetic=True``) forces synthetic shapes. voxel_size: Å per voxel of the returned templates.
    Raises InputError for an unknown name, a missing folder or an unusable map.
    """
    if not voxel_size or voxel_size <= 0:
        raise InputError('voxel size', f"must be positive, got {voxel_size}")
    if names is not None:
        names = [names] if isinstance(names, str) else [str(n) for n in names]
        if len(set(names)) != len(names):
            raise InputError('templates', f"duplicate template names in {names}")
    if synthetic or folder is False:
        folder = None
    elif folder is None:
        folder = settings.default_templates_dir()
        if folder is not None and not os.path.isdir(folder):
            raise InputError(folder, "template folder not found")
    elif not os.path.isdir(folder):
        raise InputError(folder, "template folder not found")

    out = TemplateSet()
    out.voxel_size = float(voxel_size)
    out.folder = folder
    maps = available_maps(folder) if folder else []
    if names is None:
        names = maps if maps else list(SYNTHETIC_SHAPES)
    spare = [s for s in SYNTHETIC_SHAPES if s not in names]
    for name in names:
        if name in maps:
            out[name], out.radius[name] = _load_map(os.path.join(folder, name + '.mrc'), voxel_size)
            out.sources[name] = 'map'
            continue
        if name in SYNTHETIC_SHAPES:
            shape_name = name
        elif folder is None and name.lower() in KNOWN_MAPS:
            if not spare:
                raise InputError('templates', f"no synthetic shape left to stand in for '{name}'")
            size = KNOWN_MAP_DIAMETERS_A[name.lower()]
            shape_name = min(spare, key=lambda s: abs(SYNTHETIC_DIAMETERS_A[s] - size))
            spare.remove(shape_name)
            out.substitutes[name] = shape_name
        else:
            where = f"in {folder}" if folder else "(no template folder; synthetic shapes only)"
            choices = ', '.join(maps + list(SYNTHETIC_SHAPES))
            raise InputError('templates', f"unknown template '{name}' {where}; available: {choices}")
        out[shape_name], out.radius[shape_name] = synthetic_template(shape_name, voxel_size)
        out.sources[shape_name] = 'synthetic'
    if out.substitutes:
        log.warning("no template maps (no folder, or synthetic shapes requested): synthetic shapes stand in "
                    "for the maps (%s)",
                    ', '.join(f"{k} -> {v}" for k, v in out.substitutes.items()))
    return out


def _load_map(path, voxel_size):
    key = (os.path.abspath(path), os.path.getmtime(path), float(voxel_size))
    if key not in _cache:
        from ..io.mrc import open_checked
        data, map_voxel, _ = open_checked(path, ndim=3)
        data = np.clip(np.asarray(data, dtype=np.float32), 0, None)
        if not np.any(data > 0):
            raise InputError(path, "map has no positive density")
        if map_voxel <= 0:
            map_voxel = 10.0
        _cache[key] = centre_and_scale(data, map_voxel, voxel_size)
    vol, radius = _cache[key]
    return vol.copy(), radius


def centre_and_scale(density, from_voxel, to_voxel):
    """Resample a positive density to `to_voxel` Å/voxel with its centre of mass at the centre voxel of
    an odd cubic box that holds it in any orientation; scale its interior to ~1.

    Returns (template, bounding radius in voxels of the output).
    """
    density = np.asarray(density, dtype=np.float32)
    peak = float(density.max())
    # Interior level: the median of the clearly-inside voxels; robust to a few hot voxels.
    interior = float(np.median(density[density > 0.5 * peak]))
    density = density / interior
    peak = float(density.max())
    com = np.array(ndimage.center_of_mass(density))
    step = float(to_voxel) / float(from_voxel)  # input voxels per output voxel

    def extent(threshold):
        idx = np.argwhere(density > threshold * peak)
        return float(np.sqrt(((idx - com) ** 2).sum(axis=1)).max()) + 0.5

    r_box = extent(BOX_THRESHOLD) / step
    half = int(np.ceil(r_box)) + 1
    size = 2 * half + 1
    source = density
    if step > 1:
        # Averaging away detail finer than the output grid avoids aliasing when coarsening.
        source = ndimage.gaussian_filter(density, sigma=0.5 * np.sqrt(step ** 2 - 1), mode='constant')
    offset = com - half * step
    out = ndimage.affine_transform(source, np.diag([step] * 3), offset=offset, output_shape=(size,) * 3,
                                   order=1, mode='constant', cval=0.0)
    out = np.clip(out, 0, None).astype(np.float32)
    return out, _bounding_radius(out)


def _bounding_radius(vol, threshold=RADIUS_THRESHOLD):
    centre = (np.array(vol.shape) - 1) / 2.0
    idx = np.argwhere(vol > threshold * float(vol.max()))
    return float(np.sqrt(((idx - centre) ** 2).sum(axis=1)).max()) + 0.5


def synthetic_template(name, voxel_size=10.0):
    """A synthetic density (interior ~1, smooth edges) and its bounding radius in voxels.

    Shapes and sizes (Å): two_lobe (a 95 Å and an off-axis 65 Å lobe, ribosome-like, asymmetric),
    barrel (hollow cylinder, outer radius 70, length 150, proteasome-like), rod (capsule 260 × 2·40),
    ring (torus, 65 + 22), tetramer (four 35 Å balls on a tetrahedron), sphere (radius 60),
    l_shape (two orthogonal arms, chiral), small_ball (radius 35).
    """
    if name not in SYNTHETIC_SHAPES:
        raise InputError('templates', f"unknown synthetic shape '{name}'; available: {', '.join(SYNTHETIC_SHAPES)}")
    v = float(voxel_size)
    extent_A = {'two_lobe': 175, 'barrel': 110, 'rod': 140, 'ring': 95, 'tetramer': 80, 'sphere': 70,
                'l_shape': 130, 'small_ball': 45}[name]
    half = int(np.ceil(extent_A / v)) + 3
    ax = (np.arange(2 * half + 1) - half) * v  # Å
    z, y, x = np.meshgrid(ax, ax, ax, indexing='ij')

    def ball(cx, cy, cz, r):
        return (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= r * r

    def capsule(p0, p1, r):
        p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
        d = p1 - p0
        t = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / (d @ d), 0, 1)
        return (x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (z - p0[2] - t * d[2]) ** 2 <= r * r

    if name == 'two_lobe':
        mask = ball(-35, 0, 0, 95) | ball(80, 30, 15, 65)
    elif name == 'barrel':
        rr = np.sqrt(x ** 2 + y ** 2)
        mask = (rr <= 70) & (rr >= 30) & (np.abs(z) <= 75)
    elif name == 'rod':
        mask = capsule((-110, 0, 0), (110, 0, 0), 40) | ball(60, 30, 0, 25)
    elif name == 'ring':
        rr = np.sqrt(x ** 2 + y ** 2)
        mask = (rr - 65) ** 2 + z ** 2 <= 22 ** 2
    elif name == 'tetramer':
        verts = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]) * (42 / np.sqrt(3))
        mask = np.zeros(x.shape, bool)
        for cx, cy, cz in verts:
            mask |= ball(cx, cy, cz, 35)
    elif name == 'sphere':
        mask = ball(0, 0, 0, 60)
    elif name == 'l_shape':
        mask = capsule((-60, -40, 0), (60, -40, 0), 30) | capsule((-60, -40, 0), (-60, 70, 0), 30) \
            | ball(-60, 70, 35, 25)
    else:  # small_ball
        mask = ball(0, 0, 0, 35)
    vol = mask.astype(np.float32)
    # Soft edges (~8 Å) so the density is band-limited like a real map at this sampling.
    vol = ndimage.gaussian_filter(vol, sigma=max(0.5, 8.0 / v), mode='constant')
    if vol.max() <= 0:
        raise InputError('voxel size', f"{voxel_size} Å is too coarse for the synthetic shape '{name}'")
    vol = vol / float(np.median(vol[vol > 0.5 * vol.max()]))
    # Recentre on the centre of mass like the maps, so truth coordinates mean the same thing.
    return centre_and_scale(vol, 1.0, 1.0)
