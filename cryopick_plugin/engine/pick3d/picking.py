"""3D picking with a trained 3D-ResUNet: overlap-tile inference, then MP-NMS and de-duplication.

Overlap tiles: the tomogram is covered by cubes of side `patch`; of each cube's prediction only the centre
(patch − 2·pad voxels per axis) is kept, so every voxel's probability comes from a tile where it sits at
least `pad` voxels from the tile border (the network's border effects stay in the discarded margin). The
core grid starts at 0 with stride patch − 2·pad and its last core is placed flush with the volume's end.
Outside the tomogram the input is zero after standardisation (the tomogram mean; `padding='zero'`, the
default, as the reference) or mirrored (`padding='mirror'`); or the windows at the tomogram's faces are moved
inside the volume (`padding='inside'`): the core stays where it is, off-centre in its window, so the network
sees real data where a centred window would stick out — as training patches are placed
(`train3d.patch_start`). On the SNR 0.02 benchmark, thresholds tuned on the validation tomogram for each
mode, 'inside' raised the validation F1 of three models (+0.003 / +0.016 / +0.050) and the test
classification F1 of two (+0.021, +0.027; −0.007 for the best model), while a tiny network of the test suite
lost a particle at a face with it (bench/README.md §1.1): within the noise of these sets, so the default
stays the reference's.

The per-class probability map is written into an array that is kept in memory when small and in a
temporary memory-mapped file otherwise, so memory stays bounded (tiles are streamed from the memmapped
tomogram). MP-NMS then runs over z-slabs of that map with an exact halo (`mpnms.mp_nms_slabs`), and picks
closer than t_dist to a better one are removed across classes (one place holds one particle).

Thresholds default to those stored in the model (possibly tuned on validation data during training), and
otherwise to t_seg 0.5, t_lm 0.1, kernel 5, ⌈d/(k−1)⌉ pooling passes and t_dist = d//2 + 1 from the label
diameter d.
"""
import logging
import os
import tempfile

import numpy as np

from ..io import model_io, mrc, star
from . import mpnms
from ..errors import InputError

log = logging.getLogger(__name__)

METHOD = 'deepetpicker'
# Probability maps larger than this go to a temporary memory-mapped file (MP-NMS then works slab by slab),
# so picking memory stays bounded whatever the tomogram size.
IN_MEMORY_BYTES = 64 * 1024 ** 2


# ----------------------------------------------------------------------------------------------- tiles
def core_starts(n, core):
    """Start of every kept core along an axis of length n (last one flush with the end)."""
    if n <= core:
        return [0]
    starts = list(range(0, n - core, core))
    return starts + [n - core]


def tiles(shape, patch, pad, inside=False):
    """(window start (z, y, x), core start, core length) of every tile of a (z, y, x) volume.

    inside: along every axis at least `patch` long, windows are moved inside the volume instead of sticking
    out of it (the core stays where it is, off-centre in its window), as training patches are placed."""
    core = patch - 2 * pad
    if core < 1:
        raise InputError('--pad', f"pad {pad} leaves no core in a patch of {patch} (need pad < patch/2)")

    def window(s, n):
        return min(max(s - pad, 0), n - patch) if inside and n >= patch else s - pad

    per_axis = [[(window(s, n), s, min(core, n)) for s in core_starts(n, core)] for n in shape]
    for (wz, z, lz) in per_axis[0]:
        for (wy, y, ly) in per_axis[1]:
            for (wx, x, lx) in per_axis[2]:
                yield (wz, wy, wx), (z, y, x), (lz, ly, lx)


def read_window(volume, start, size, mean=0.0, std=1.0, padding='zero'):
    """Standardised float32 cube of side `size` at `start` (may stick out of the volume)."""
    lo = [max(0, s) for s in start]
    hi = [min(n, s + size) for s, n in zip(start, volume.shape)]
    block = (np.asarray(volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], dtype=np.float32) - mean) / std
    widths = [(l - s, s + size - h) for s, l, h in zip(start, lo, hi)]
    if any(a or b for a, b in widths):
        if padding == 'mirror':
            block = np.pad(block, widths, mode='symmetric')  # numpy repeats the mirror for wide pads
        else:
            block = np.pad(block, widths, mode='constant')
    return block


# Mirror images used by test-time averaging: every combination of flips of z, y and x. Each one keeps a
# tomogram's statistics (the missing wedge is symmetric in kx and kz, the tilt axis lies along y), so the
# network sees inputs like its training patches; averaging them lowers the variance of the map.
FLIPS = [(), (4,), (3,), (2,), (3, 4), (2, 4), (2, 3), (2, 3, 4)]


def model_predictor(model, device='cpu', precision='auto', flip_average=False):
    """Callable (B, 1, P, P, P) float32 numpy → (B, n_classes, P, P, P) foreground probabilities.

    precision: 'auto' / 'fp32' / 'bf16' (`settings.resolve_precision`); the probabilities come back fp32.
    flip_average: average the probabilities over the eight mirror images of each tile (8× the cost). A tile's
    kept centre maps onto itself under these flips, so overlap-tile stitching is unchanged.
    """
    import torch
    from ..settings import autocast, memory_format, resolve_precision
    precision = resolve_precision(precision, device)
    layout = memory_format(5, precision)
    model = model.to(device).eval().to(memory_format=layout)
    flips = FLIPS if flip_average else [()]

    def predict(batch):
        with torch.no_grad(), autocast(device, precision):
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
            total = None
            for dims in flips:
                xi = torch.flip(x, dims) if dims else x
                p = model.foreground(xi.contiguous(memory_format=layout)).float()
                p = torch.flip(p, dims) if dims else p
                total = p if total is None else total + p
            return (total / len(flips)).cpu().numpy()
    return predict


PADDINGS = ('inside', 'zero', 'mirror')


def count_tiles(shape, patch, pad):
    """Number of overlap tiles of a (z, y, x) volume (`tiles`)."""
    core = patch - 2 * pad
    if core < 1:
        raise InputError('--pad', f"pad {pad} leaves no core in a patch of {patch} (need pad < patch/2)")
    return int(np.prod([len(core_starts(n, core)) for n in shape]))


def probability_map(volume, predictor, n_channels, patch, pad, batch_size=2, mean=0.0, std=1.0,
                    padding='zero', out=None, progress=None):
    """Fill `out` (n_channels, z, y, x) with the stitched tile centres of `predictor`; return it.

    padding: 'inside' (windows moved inside the volume at its faces), 'zero' or 'mirror' (see the module doc).
    progress: a `progress.Progress` counting tiles (`count_tiles`), advanced after every batch."""
    if padding not in PADDINGS:
        raise InputError('padding', f"unknown padding {padding!r} ({', '.join(PADDINGS)})")
    if out is None:
        out = np.zeros((n_channels,) + tuple(volume.shape), dtype=np.float32)
    pending = []

    def flush():
        batch = np.stack([read_window(volume, w, patch, mean, std, padding) for w, _, _ in pending])[:, None]
        probs = predictor(batch)
        for p, (w, c, n) in zip(probs, pending):
            o = tuple(slice(c[i], c[i] + n[i]) for i in range(3))
            t = tuple(slice(c[i] - w[i], c[i] - w[i] + n[i]) for i in range(3))
            out[(slice(None),) + o] = p[(slice(None),) + t]
        if progress is not None:
            progress.update(len(pending))
        pending.clear()

    for tile in tiles(volume.shape, patch, pad, inside=padding == 'inside'):
        pending.append(tile)
        if len(pending) >= batch_size:
            flush()
    if pending:
        flush()
    if progress is not None:
        progress.finish()
    return out


def _class_diameter(diameters, c):
    if not isinstance(diameters, dict):
        return float(diameters)
    return float(diameters[c] if c in diameters else diameters[str(c)])


def find_peaks(prob_map, diameters, t_seg=None, t_lm=None, t_dist=None, kernel=None, iterations=None,
               device='cpu'):
    """MP-NMS on every class channel of a (C, z, y, x) map, then de-duplication across classes.

    `diameters`: {class: label diameter (voxels)} for classes 1..C (defaults for the thresholds).
    Unless `iterations` is given, every channel is pooled ⌈d/(k−1)⌉ times with the largest label
    diameter d (the reference's choice; it keeps the peak scores of all classes on one scale, so one t_lm
    fits all — per-class counts made small classes' peaks systematically higher and lost large particles
    to the tuned t_lm). Unless `t_dist` is given, two picks are duplicates when closer than the
    de-duplication distance of the larger of their two classes: a particle of one class cannot sit that
    close to one of another class, so such a pair is one particle claimed by two channels (one distance
    from the smallest class, as the reference, lets a large particle keep a pick in each channel).
    Returns (zyx (N, 3) int, classes (N,), scores (N,)) by decreasing score.
    """
    p = resolve_thresholds(diameters, t_seg, t_lm, t_dist, kernel, iterations)
    n_pool = p['iterations'] or mpnms.default_iterations(
        max(_class_diameter(diameters, c + 1) for c in range(prob_map.shape[0])), p['kernel'])
    zyx, cls, scores = [], [], []
    for c in range(prob_map.shape[0]):
        idx, sc = mpnms.mp_nms_slabs(prob_map[c], t_seg=p['t_seg'], t_lm=p['t_lm'], kernel=p['kernel'],
                                     iterations=n_pool, device=device)
        zyx.append(idx)
        scores.append(sc)
        cls.append(np.full(len(idx), c + 1, dtype=int))
    zyx, cls, scores = np.concatenate(zyx), np.concatenate(cls), np.concatenate(scores)
    if p['t_dist'] is None:
        t_dist = np.array([mpnms.default_t_dist(_class_diameter(diameters, c)) for c in cls], dtype=float)
    else:
        t_dist = p['t_dist']
    keep = mpnms.deduplicate(zyx, scores, t_dist)
    return zyx[keep], cls[keep], scores[keep]


def resolve_thresholds(diameters, t_seg=None, t_lm=None, t_dist=None, kernel=None, iterations=None):
    """Fill unset thresholds from the defaults. `iterations` and `t_dist` stay None unless given: they
    are derived from the label diameters of the classes in `find_peaks`."""
    kernel = int(kernel or mpnms.DEFAULT_KERNEL)
    return {'t_seg': float(mpnms.DEFAULT_T_SEG if t_seg is None else t_seg),
            't_lm': float(mpnms.DEFAULT_T_LM if t_lm is None else t_lm),
            'kernel': kernel,
            'iterations': int(iterations) if iterations else None,
            't_dist': None if t_dist is None else float(t_dist)}


def picks_frame(zyx, classes, scores, tomo_name=None, scale=1.0):
    """RELION coordinate table from picks; `scale` maps working voxels to the tomogram's voxels."""
    xyz = np.asarray(zyx, dtype=float).reshape(-1, 3)[:, ::-1] * scale
    if len(xyz) == 0:
        import pandas as pd
        cols = ([star.TOMO] if tomo_name is not None else []) + [star.X, star.Y, star.Z, star.CLASS, star.SCORE]
        return pd.DataFrame({c: pd.Series(dtype=str if c == star.TOMO else int if c == star.CLASS else float)
                             for c in cols})
    return star.coordinates_frame(xyz, volume_name=tomo_name, classes=classes, scores=scores)


# ----------------------------------------------------------------------------------------------- models
def load_picker(model_path, device='cpu'):
    """(network on `device`, meta) from a DeepETPicker model file."""
    from .resunet3d import ResUNet3D
    arch, state, meta = model_io.load_model(model_path, METHOD)
    try:
        model = ResUNet3D(**arch)
        model.load_state_dict(state)
    except (TypeError, RuntimeError) as exc:
        raise InputError(model_path, f"weights do not fit the stored architecture ({type(exc).__name__})") \
            from None
    return model.to(device).eval(), meta


def class_diameters(meta):
    return {int(k): float(v) for k, v in (meta.get('diameters') or {}).items()}


def _temp_array(shape, work_dir, stack):
    nbytes = int(np.prod(shape)) * 4
    if nbytes <= IN_MEMORY_BYTES:
        return np.zeros(shape, dtype=np.float32)
    folder = stack.enter_context(tempfile.TemporaryDirectory(prefix='cryopick-pick3d-', dir=work_dir))
    return np.lib.format.open_memmap(os.path.join(folder, 'map.npy'), mode='w+', dtype=np.float32,
                                     shape=shape)


def rescaled(volume, factor, out):
    """Linear resampling of `volume` by `factor` into `out`, slab by slab: out[j] = volume(j / factor)."""
    from scipy.ndimage import map_coordinates
    grids = [np.arange(n) / factor for n in out.shape[1:]]
    for sl in mrc.iter_slabs(out.shape, max_bytes=64 * 1024 ** 2):
        zs = np.arange(sl.start, sl.stop) / factor
        a = int(np.floor(zs[0]))
        b = min(volume.shape[0], int(np.floor(zs[-1])) + 2)
        block = np.asarray(volume[a:b], dtype=np.float32)
        zz, yy, xx = np.meshgrid(zs - a, *grids, indexing='ij')
        out[sl] = map_coordinates(block, [zz, yy, xx], order=1, mode='nearest')
    return out


def pick(tomo_path, model_path, device='auto', t_seg=None, t_lm=None, t_dist=None, pad=None, batch_size=2,
         tomo_name=None, rescale=False, kernel=None, iterations=None, padding='zero', work_dir=None,
         model=None, precision='auto', flip_average=False):
    """Pick one tomogram with a DeepETPicker model; return a RELION coordinate table.

    Columns: rlnTomoName (`tomo_name`, default the file name without extension), rlnCoordinateX/Y/Z (voxels
    of this tomogram), rlnClassNumber, rlnAutopickFigureOfMerit (MP-NMS score in 0..1). Raises InputError
    for an unreadable/NaN/constant tomogram, a model of another method or format, or a voxel size that
    differs from the model's by more than 1% (unless `rescale`, which resamples the tomogram to the
    model's voxel size and maps the picks back). `model` = (network, meta) skips loading `model_path`.
    precision: the network's arithmetic ('auto', 'fp32', 'bf16'; see `settings.resolve_precision`).
    flip_average: average the map over the eight mirror images of every tile (`model_predictor`; 8× slower).
    """
    import contextlib
    import time
    from ..progress import Progress, compute_summary, duration
    from ..settings import resolve_device, resolve_precision
    t_start = time.monotonic()
    device = resolve_device(device)
    requested, precision = precision, resolve_precision(precision, device)
    data, voxel, stats = mrc.open_checked(tomo_path, ndim=3)
    name = tomo_name or os.path.splitext(os.path.basename(os.fspath(tomo_path)))[0]
    net, meta = model if model is not None else load_picker(model_path, device)
    net = net.to(device)
    diameters = class_diameters(meta)
    if not diameters:
        raise InputError(model_path, "model holds no class diameters")
    model_voxel = float(meta.get('voxel_size') or 0)
    scale = 1.0
    with contextlib.ExitStack() as stack:
        if model_voxel > 0 and voxel > 0 and abs(voxel - model_voxel) > 0.01 * model_voxel:
            if not rescale:
                raise InputError(tomo_path, f"voxel size {voxel:g} Å differs from the model's {model_voxel:g} Å "
                                            f"by more than 1%; resample the tomogram or allow rescaling")
            factor = voxel / model_voxel
            shape = tuple(max(2, int(round(n * factor))) for n in data.shape)
            data = rescaled(data, factor, _temp_array(shape, work_dir, stack))
            stats = mrc.volume_stats(data)
            scale = 1.0 / factor
        patch = int(meta.get('patch') or 48)
        pad = int(meta.get('pad_infer', patch // 6) if pad is None else pad)
        thr = dict(meta.get('thresholds') or {})
        p = resolve_thresholds(diameters,
                               t_seg if t_seg is not None else thr.get('t_seg'),
                               t_lm if t_lm is not None else thr.get('t_lm'),
                               t_dist if t_dist is not None else thr.get('t_dist'),
                               kernel or thr.get('kernel'), iterations or thr.get('iterations'))
        prob = _temp_array((len(diameters),) + tuple(data.shape), work_dir, stack)
        n_tiles = count_tiles(data.shape, patch, pad)
        log.info('%s: %s voxels, %d tiles of %d³ (pad %d)%s; %s', name, '×'.join(map(str, data.shape)), n_tiles,
                 patch, pad, ' × 8 mirror images' if flip_average else '',
                 compute_summary(device, precision, requested))
        probability_map(data, model_predictor(net, device, precision, flip_average), len(diameters), patch, pad,
                        batch_size, stats['mean'], stats['std'], padding, out=prob,
                        progress=Progress(f'{name}: network', n_tiles, unit='tile', say=log.info))
        zyx, cls, scores = find_peaks(prob, diameters, device=device, **p)
    log.info('%s: %d picks (t_seg %.2f, t_lm %.2f, t_dist %s, %s×k%d pooling, patch %d, pad %d) in %s', name,
             len(zyx), p['t_seg'], p['t_lm'], p['t_dist'] or 'per class', p['iterations'] or 'default',
             p['kernel'], patch, pad, duration(time.monotonic() - t_start))
    return picks_frame(zyx, cls, scores, name, scale)
