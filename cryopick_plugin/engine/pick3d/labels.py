"""Weak labels for 3D picking (DeepETPicker): particle centres → a class-index label map.

Around every particle centre a small solid shape is painted with the particle's class (1, 2, ...);
background is 0. With r = diameter // 2 the shape lives in the (2r+1)³ cube centred on the voxel nearest
to the centre (coordinates are rounded, not truncated):

==========  ==================================================================================
``cube``    the whole (2r+1)³ cube
``ball``    voxels at distance ≤ r from the centre
``tball``   voxels at distance ≤ √2·r, clipped to the cube ("truncated ball", DeepETPicker's
            default; the reference builds it by thresholding a Gaussian of σ = r at exp(−1))
==========  ==================================================================================

Even diameters are rounded up to the next odd one (r = d // 2), as in the reference, so a label is
always centred on a voxel.

Overlaps: where the shapes of two particles overlap, the voxel goes to the particle whose centre is
nearest (ties go to the particle listed first). The reference keeps the larger class index instead,
which shifts the label of the smaller-index particle off its centre; the nearest-centre rule keeps
every label centred on its own particle and is independent of class numbering.

Label maps are uint8 (up to 255 classes) and are written slab by slab through `mrc.new_volume`, so a
tomogram of any size needs only one slab of labels and distances in memory.
"""
import numpy as np

from ..io import mrc, star
from ..errors import InputError

KINDS = ('tball', 'ball', 'cube')


def radius_of(diameter):
    """Half-width r of the (2r+1)³ label cube for a diameter in voxels."""
    d = int(round(float(diameter)))
    if d < 1:
        raise InputError('diameter', f"label diameter must be at least 1 voxel, got {diameter}")
    return d // 2


def label_template(diameter, kind='tball'):
    """Boolean (2r+1)³ mask of one label and the squared distance of each voxel to the centre."""
    if kind not in KINDS:
        raise InputError('shape', f"unknown label shape {kind!r} (choose {', '.join(KINDS)})")
    r = radius_of(diameter)
    g = np.arange(-r, r + 1)
    d2 = g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2
    if kind == 'cube':
        mask = np.ones(d2.shape, dtype=bool)
    elif kind == 'ball':
        mask = d2 <= r * r
    else:
        mask = d2 <= 2 * r * r
    return mask, d2


def diameters_by_class(classes, diameters):
    """Map each class in `classes` to a diameter from a scalar or a {class: diameter} dict.

    A dict may hold the key 'default' (or None) for classes it does not name.
    """
    out = {}
    for c in sorted(set(int(c) for c in classes)):
        if isinstance(diameters, dict):
            if c in diameters:
                out[c] = diameters[c]
            elif str(c) in diameters:
                out[c] = diameters[str(c)]
            elif 'default' in diameters or None in diameters:
                out[c] = diameters.get('default', diameters.get(None))
            else:
                raise InputError('diameter', f"no label diameter given for class {c}")
        else:
            out[c] = diameters
        radius_of(out[c])
    return out


def parse_class_diameters(text, cast=int, option='--diameter-per-class', example='1:13,2:7'):
    """'1:13,2:7' → {1: 13, 2: 7} ('default:11' → {'default': 11}); values through `cast` (int for label
    diameters, float for particle diameters); InputError naming `option` on anything else."""
    out = {}
    if not text:
        return out
    for pair in str(text).replace(' ', '').split(','):
        if not pair:
            continue
        try:
            cls_, dia = pair.split(':')
            # 'default:D' is accepted so a spec recorded as "default:11,2:7" can be passed back as is
            out['default' if cls_ == 'default' else int(cls_)] = cast(dia)
        except ValueError:
            raise InputError(option, f"expected class:diameter pairs like '{example}', got {text!r}") from None
    return out


def _check_classes(classes):
    classes = np.asarray(classes, dtype=int)
    if classes.size and (classes.min() < 1 or classes.max() > 255):
        raise InputError('classes', f"class numbers must lie in 1..255 for a uint8 label map, "
                                    f"found {classes.min()}..{classes.max()}")
    return classes


def paint_labels(out, z0, xyz, classes, diameters, kind='tball', dist=None):
    """Paint labels into `out`, a (z, y, x) uint8 block whose first plane is tomogram plane `z0`.

    `dist` (float32, same shape, +inf where unset) carries the nearest-centre rule across calls; a
    fresh one is made when None. Returns `dist`.
    """
    if dist is None:
        dist = np.full(out.shape, np.inf, dtype=np.float32)
    xyz = np.asarray(xyz, dtype=float).reshape(-1, 3)
    classes = _check_classes(classes)
    per_class = diameters_by_class(classes, diameters) if len(classes) else {}
    templates = {c: label_template(d, kind) for c, d in per_class.items()}
    centres = np.rint(xyz[:, ::-1]).astype(int)  # z, y, x voxel indices
    lo_block = np.array([z0, 0, 0])
    hi_block = lo_block + np.array(out.shape)
    for (cz, cy, cx), c in zip(centres, classes):
        mask, d2 = templates[int(c)]
        r = mask.shape[0] // 2
        lo = np.array([cz, cy, cx]) - r
        hi = lo + mask.shape[0]
        a = np.maximum(lo, lo_block)
        b = np.minimum(hi, hi_block)
        if np.any(b <= a):
            continue
        t = tuple(slice(a[i] - lo[i], b[i] - lo[i]) for i in range(3))
        o = tuple(slice(a[i] - lo_block[i], b[i] - lo_block[i]) for i in range(3))
        m, dd = mask[t], d2[t]
        closer = m & (dd < dist[o])
        out[o][closer] = c
        dist[o][closer] = dd[closer]
    return dist


def make_labels(shape, xyz, classes, diameters, kind='tball'):
    """Label map of a (z, y, x) `shape` with one shape per centre (x, y, z rows), as a uint8 array."""
    out = np.zeros(tuple(int(s) for s in shape), dtype=np.uint8)
    paint_labels(out, 0, xyz, classes, diameters, kind)
    return out


def write_label_map(path, tomo_shape, table, diameters, kind='tball', voxel_size=1.0,
                    max_bytes=64 * 1024 ** 2):
    """Write the label map of a coordinate table (RELION columns) as a uint8 MRC, slab by slab.

    `diameters` is a scalar or a {class: diameter} dict (voxels). Returns the path.
    """
    xyz = star.xyz_array(table).reshape(-1, 3)
    classes = _check_classes(table[star.CLASS].to_numpy() if star.CLASS in table.columns
                             else np.ones(len(table), dtype=int))
    per_class = diameters_by_class(classes, diameters) if len(classes) else {}
    label_template(1, kind)  # validates `kind` before anything is written
    reach = max([radius_of(d) for d in per_class.values()], default=0)
    zc = np.rint(xyz[:, 2]).astype(int)
    # slab bytes: uint8 labels + float32 distances
    with mrc.new_volume(path, tomo_shape, np.uint8, voxel_size) as vol:
        for sl in mrc.iter_slabs(tomo_shape, itemsize=5, max_bytes=max_bytes):
            block = np.zeros((sl.stop - sl.start,) + tuple(tomo_shape[1:]), dtype=np.uint8)
            near = (zc >= sl.start - reach) & (zc < sl.stop + reach)
            paint_labels(block, sl.start, xyz[near], classes[near], per_class or diameters, kind)
            vol[sl] = block
    return path


def estimate_diameters(label_map, xyz, classes):
    """Label diameter per class measured on a label map: the run of the particle's class along x through
    each centre (2r+1 for cube, ball and tball alike), median over the particles of a class.

    Particles whose run is cut by the volume border or another label are ignored when others exist.
    """
    xyz = np.asarray(xyz, dtype=float).reshape(-1, 3)
    classes = np.asarray(classes, dtype=int)
    shape = label_map.shape
    out = {}
    for c in sorted(set(classes.tolist())):
        runs = []
        for x, y, z in np.rint(xyz[classes == c]).astype(int):
            if not (0 <= z < shape[0] and 0 <= y < shape[1] and 0 <= x < shape[2]):
                continue
            row = np.asarray(label_map[z, y, :]) == c
            if not row[x]:
                continue
            left = x
            while left > 0 and row[left - 1]:
                left -= 1
            right = x
            while right < shape[2] - 1 and row[right + 1]:
                right += 1
            # symmetric half-width: the nearer side is the one not widened by a touching neighbour
            half = min(x - left, right - x)
            if left == 0 or right == shape[2] - 1:
                continue
            runs.append(2 * half + 1)
        if runs:
            out[c] = int(np.median(runs))
    return out
