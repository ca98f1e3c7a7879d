"""Figures of cryopick results, written as PNG files (matplotlib only; no Scipion imports).

Every function takes plain inputs (paths, arrays, coordinate tables with RELION columns), writes one PNG
atomically and returns its path, so the figures can be made headless from a script, a test or a Scipion
viewer alike. Figures are drawn on `matplotlib.figure.Figure` objects with the Agg canvas, never through
pyplot, so they neither need nor disturb the GUI backend Scipion runs with.

Display conventions
  Tomograms: array (z, y, x), read memory-mapped; a slice is the mean of a few neighbouring planes and is
  shown with y (and z) upwards, as IMOD and scipion-em-tomo's bottom-left-corner convention show it.
  Picks are circles whose radius is that of the sphere's cross-section with the slice plane, so a particle
  appears only on the slices that cut it.
  Micrographs: x = column, y = row of the array as read, row 0 at the top (as Scipion's micrograph
  viewers show it).
  Contrast: 1st–99th percentile of the displayed image, robust to hot pixels and gold.
"""
import csv
import json
import math
import os

import numpy as np

from ..engine.io import star
from ..engine.errors import InputError
from ..engine.io.mrc import atomic_path, open_volume

DPI = 100
CLASS_COLOURS = ['#e6194b', '#3cb44b', '#4363d8', '#f58231', '#911eb4', '#42d4f4', '#f032e6', '#bfef45',
                 '#fabed4', '#469990', '#dcbeff', '#9a6324', '#fffac8', '#800000', '#aaffc3', '#808000']


# ------------------------------------------------------------------------------------------- helpers
def up_to_date(png, *sources):
    """True when `png` exists and is at least as new as every existing source file (figure cache)."""
    if not os.path.exists(png):
        return False
    newest = max((os.path.getmtime(s) for s in sources if s and os.path.exists(s)), default=0.0)
    return os.path.getmtime(png) >= newest


def class_colour(label):
    """A fixed colour per class label (1-based classes; labels beyond the palette wrap around)."""
    return CLASS_COLOURS[(int(label) - 1) % len(CLASS_COLOURS)]


def robust_limits(image, low=1.0, high=99.0):
    """(vmin, vmax) from percentiles of the finite values; a flat image gets a unit range around its value."""
    values = np.asarray(image, dtype=np.float32)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    if values.size > 1_000_000:  # percentiles of a regular subsample are as good and much cheaper
        values = values[::values.size // 1_000_000 + 1]
    lo, hi = np.percentile(values, [low, high])
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return float(lo) - 0.5, float(lo) + 0.5
    return float(lo), float(hi)


def bin_image(image, factor):
    """Block-mean downsampling by an integer factor (edges that do not fill a block are dropped)."""
    image = np.asarray(image, dtype=np.float32)
    factor = int(factor)
    if factor <= 1:
        return image
    h, w = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    if h == 0 or w == 0:
        return image
    return image[:h, :w].reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


def _display_factor(shape, max_side):
    return max(1, int(math.ceil(max(shape) / float(max_side)))) if max_side else 1


def _new_figure(width, height):
    from matplotlib.figure import Figure
    return Figure(figsize=(max(width, 1.0), max(height, 1.0)), dpi=DPI)


def _save(fig, out):
    """Write the figure atomically as PNG; return the path."""
    out = os.fspath(out)
    with atomic_path(out, suffix='.png') as tmp:
        fig.savefig(tmp, format='png', dpi=DPI)
    return out


def _empty_note(ax, text):
    ax.text(0.5, 0.5, text, ha='center', va='center', transform=ax.transAxes, color='0.4')
    ax.set_xticks([])
    ax.set_yticks([])


def _show_plane(ax, plane, extent, origin, cmap='gray'):
    vmin, vmax = robust_limits(plane)
    ax.imshow(plane, cmap=cmap, vmin=vmin, vmax=vmax, origin=origin, extent=extent, interpolation='nearest')
    ax.set_xlim(extent[0], extent[1])
    if origin == 'lower':
        ax.set_ylim(extent[2], extent[3])
    else:
        ax.set_ylim(extent[3], extent[2])


def _circles(ax, xy, radii, colours, linewidth=1.0):
    """Draw circles of data-unit radii (one collection: fast for thousands of picks)."""
    from matplotlib.collections import EllipseCollection
    if len(xy) == 0:
        return None
    d = 2.0 * np.asarray(radii, dtype=float)
    coll = EllipseCollection(d, d, np.zeros(len(d)), units='xy', offsets=np.asarray(xy, dtype=float),
                             offset_transform=ax.transData, facecolors='none', edgecolors=colours,
                             linewidths=linewidth)
    ax.add_collection(coll)
    return coll


def _as_frame(picks, dims):
    """A coordinate DataFrame with X/Y(/Z), CLASS (int) and SCORE (float, NaN when absent)."""
    import pandas as pd
    if picks is None:
        picks = pd.DataFrame(columns=[star.X, star.Y, star.Z][:dims])
    elif not isinstance(picks, pd.DataFrame):
        picks = star.read_coordinates(picks, dims=dims)
    df = picks.copy()
    for col in [star.X, star.Y, star.Z][:dims]:
        if col not in df.columns:
            raise InputError('picks', f"no {col} column")
        df[col] = df[col].astype(float)
    df[star.CLASS] = df[star.CLASS].astype(int) if star.CLASS in df.columns else 1
    df[star.SCORE] = df[star.SCORE].astype(float) if star.SCORE in df.columns else np.nan
    return df.reset_index(drop=True)


def _radii(df, radius):
    """Per-pick radius: a number, a {class: radius} mapping, or None to use rlnDiameter / 2."""
    if isinstance(radius, dict):
        default = max(radius.values()) if radius else 5.0
        return np.array([float(radius.get(int(c), radius.get(str(int(c)), default))) for c in df[star.CLASS]])
    if radius is None:
        if star.DIAMETER in df.columns:
            return df[star.DIAMETER].astype(float).to_numpy() / 2.0
        radius = 5.0
    return np.full(len(df), float(radius))


# ------------------------------------------------------------------------------------- learning curves
def _number(value):
    if value is None or value == '':
        return float('nan')
    try:
        return float(value)
    except (TypeError, ValueError):
        return float('nan')


def read_history(path):
    """A training history as a list of dicts of floats.

    Reads <model>.history.csv / .history.json (DeepETPicker training), a model's JSON description
    (<model>.json; its meta['history'] list: CryoSegNet, DISCA), or a DISCA history.json ({'iterations'}).
    Raises InputError when the file is missing or holds no per-epoch list.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(path, "history file not found")
    if path.endswith('.csv'):
        with open(path, newline='') as fh:
            rows = list(csv.DictReader(fh))
        return [{k: _number(v) for k, v in row.items()} for row in rows]
    try:
        with open(path) as fh:
            data = json.load(fh)
    except ValueError as exc:
        raise InputError(path, f"not a readable JSON file ({exc})") from None
    if isinstance(data, dict):
        for candidate in (data.get('iterations'), data.get('history'), (data.get('meta') or {}).get('history')):
            if isinstance(candidate, list):
                data = candidate
                break
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise InputError(path, "no per-epoch history in this file")
    return [{k: (_number(v) if not isinstance(v, (list, dict)) else v) for k, v in r.items()} for r in data]


LOSS_KEYS = ('train_loss', 'val_loss', 'loss')
METRIC_KEYS = ('val_score', 'val_f1', 'val_dice', 'val_precision', 'val_recall', 'train_accuracy', 'val_accuracy')


def best_epoch_of(history):
    """The epoch a trainer would keep: best val_score, else val_f1, else val_dice, else lowest val_loss."""
    x = _epochs(history)
    for key, better in (('val_score', np.nanargmax), ('val_f1', np.nanargmax), ('val_dice', np.nanargmax),
                        ('val_loss', np.nanargmin)):
        values = np.array([_number(r.get(key)) for r in history])
        if np.isfinite(values).any():
            return x[int(better(values))]
    return None


def _epochs(history):
    for key in ('epoch', 'iteration'):
        if history and all(np.isfinite(_number(r.get(key))) for r in history):
            return [int(_number(r[key])) for r in history]
    return list(range(1, len(history) + 1))


def learning_curves(history, out, best_epoch=None, title='Learning curves'):
    """Losses (left) and validation metrics (right) per epoch, the kept epoch marked.

    history: a list of dicts (epoch, train_loss, val_loss, val_f1, val_score, val_dice, ...; missing or
    empty values are skipped, validation may run every few epochs) or a file `read_history` reads.
    best_epoch: the epoch the model keeps (default: `best_epoch_of`). Returns `out`.
    """
    if not isinstance(history, list):
        history = read_history(history)
    if best_epoch is None and history:
        best_epoch = best_epoch_of(history)
    x = np.array(_epochs(history), dtype=float)
    fig = _new_figure(11, 4)
    ax_loss, ax_metric = fig.subplots(1, 2)
    for ax, keys, label in ((ax_loss, LOSS_KEYS, 'loss'), (ax_metric, METRIC_KEYS, 'score')):
        drawn = 0
        for key in keys:
            y = np.array([_number(r.get(key)) for r in history])
            ok = np.isfinite(y)
            if ok.any():
                ax.plot(x[ok], y[ok], marker='o', markersize=3, label=key.replace('_', ' '))
                drawn += 1
        if drawn:
            if best_epoch is not None:
                ax.axvline(best_epoch, color='k', linestyle='--', linewidth=1, label=f'kept epoch {best_epoch}')
            ax.legend(fontsize=8)
            ax.set_xlabel('epoch')
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        else:
            _empty_note(ax, f'no {label} values recorded')
    fig.suptitle(title + (f' — kept epoch {best_epoch}' if best_epoch is not None else ''))
    fig.tight_layout()
    return _save(fig, out)


# ------------------------------------------------------------------------------------------ tomograms
def _slab_mean(data, axis, centre, half):
    lo, hi = max(0, centre - half), min(data.shape[axis], centre + half + 1)
    index = [slice(None)] * 3
    index[axis] = slice(lo, hi)
    return np.asarray(data[tuple(index)], dtype=np.float32).mean(axis=axis)


def tomogram_slices(tomogram, picks, out, radius=None, z_fractions=(0.25, 0.5, 0.75), thickness=5,
                    title=None, max_side=800, class_labels=None):
    """Three xy slices (at `z_fractions` of the depth) and the central xz slice, with picks drawn.

    tomogram: MRC path (read memory-mapped) or (z, y, x) array. picks: DataFrame or STAR path with
    rlnCoordinateX/Y/Z in voxels of that tomogram (optional rlnClassNumber colours them). radius: particle
    radius in voxels, a {class: radius} mapping, or None (rlnDiameter / 2 when present). thickness: planes
    averaged per slice (odd). class_labels: optional {class: text} for the legend. Returns `out`.
    """
    data = open_volume(tomogram, ndim=3)[0] if not isinstance(tomogram, np.ndarray) else tomogram
    if data.ndim != 3:
        raise InputError('tomogram', f"expected a 3D volume, got shape {data.shape}")
    nz, ny, nx = data.shape
    df = _as_frame(picks, 3)
    radii = _radii(df, radius)
    half = max(0, int(thickness) // 2)
    zs = [min(nz - 1, max(0, int(round(f * (nz - 1))))) for f in z_fractions]
    y0 = (ny - 1) // 2
    factor = _display_factor((ny, nx), max_side)

    width = 12.0
    h_xy = width / len(zs) * ny / nx
    # thick (or small test) volumes: the xz panel is kept no taller than an xy panel plus a bit; imshow keeps
    # the aspect, so it only gets narrower
    h_xz = min(width * nz / nx, 1.3 * h_xy)
    fig = _new_figure(width, h_xy + h_xz + 1.2)
    grid = fig.add_gridspec(2, len(zs), height_ratios=[max(h_xy, 0.5), max(h_xz, 0.3)])
    xyz = df[[star.X, star.Y, star.Z]].to_numpy() if len(df) else np.zeros((0, 3))
    colours = np.array([class_colour(c) for c in df[star.CLASS]]) if len(df) else np.array([])

    def draw(ax, plane, extent, u, v, depth, level):
        _show_plane(ax, bin_image(plane, factor), extent, 'lower')
        if len(df):
            dist = np.abs(depth - level)
            near = dist < radii
            section = np.sqrt(np.maximum(radii[near] ** 2 - dist[near] ** 2, 0.0))
            _circles(ax, np.column_stack([u[near], v[near]]), np.maximum(section, 1.0), colours[near])
            return int(near.sum())
        return 0

    for i, z in enumerate(zs):
        ax = fig.add_subplot(grid[0, i])
        n = draw(ax, _slab_mean(data, 0, z, half), (-0.5, nx - 0.5, -0.5, ny - 0.5),
                 xyz[:, 0], xyz[:, 1], xyz[:, 2], z)
        ax.set_title(f'xy, z = {z}: {n} pick(s) cut', fontsize=9)
        ax.set_xlabel('x')
        ax.set_ylabel('y')
    ax = fig.add_subplot(grid[1, :])
    n = draw(ax, _slab_mean(data, 1, y0, half), (-0.5, nx - 0.5, -0.5, nz - 0.5),
             xyz[:, 0], xyz[:, 2], xyz[:, 1], y0)
    ax.set_title(f'xz, y = {y0}: {n} pick(s) cut', fontsize=9)
    ax.set_xlabel('x')
    ax.set_ylabel('z')

    if len(df):
        from matplotlib.lines import Line2D
        counts = df[star.CLASS].value_counts().sort_index()
        handles = [Line2D([], [], marker='o', linestyle='', markerfacecolor='none', markeredgecolor=class_colour(c),
                          label=f"{(class_labels or {}).get(int(c), f'class {int(c)}')}: {int(n)}")
                   for c, n in counts.items()]
        fig.legend(handles=handles, loc='upper right', fontsize=8, ncol=min(4, len(handles)))
    fig.suptitle(title or f'{nz}×{ny}×{nx} voxels, {len(df)} picks, slices of {2 * half + 1} planes',
                 fontsize=10, x=0.02, ha='left')
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    return _save(fig, out)


def score_histograms(picks, out, column=None, by=None, bins=30, title='Scores per class', xlabel='score'):
    """Histogram of the picks' scores, one outline per class, with the count and median in the legend."""
    import pandas as pd
    df = picks if isinstance(picks, pd.DataFrame) else star.read_coordinates(picks, dims=2)
    column = column or star.SCORE
    by = by or star.CLASS
    fig = _new_figure(7, 4)
    ax = fig.subplots()
    values = df[column].astype(float).to_numpy() if column in df.columns else np.zeros(0)
    values_ok = np.isfinite(values)
    if not values_ok.any():
        _empty_note(ax, 'no scores')
    else:
        edges = np.histogram_bin_edges(values[values_ok], bins=bins)
        groups = df[by].astype(int).to_numpy() if by in df.columns else np.ones(len(df), int)
        for g in np.unique(groups):
            v = values[(groups == g) & values_ok]
            if len(v):
                ax.hist(v, bins=edges, histtype='step', linewidth=1.5, color=class_colour(g),
                        label=f'class {g}: {len(v)} picks, median {np.median(v):.3g}')
        ax.set_xlabel(xlabel)
        ax.set_ylabel('picks')
        ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, out)


# ----------------------------------------------------------------------------------------------- DISCA
def shown_iterations(n_iterations, kept_iteration=None, max_panels=12):
    """Which iterations get a panel: all of them, or at most `max_panels` spread evenly, always including
    the first, the kept and the last one."""
    shown = set(range(n_iterations))
    if n_iterations > max_panels:
        must = {0, n_iterations - 1} | ({int(kept_iteration)} if kept_iteration is not None else set())
        spread = np.linspace(0, n_iterations - 1, max(2, max_panels - len(must) + 2)).round().astype(int)
        shown = must | {int(i) for i in spread}
        while len(shown) > max_panels and shown - must:  # rounding may add some too many: drop spread ones
            shown.discard(max(shown - must))
    return sorted(shown)


def disca_feature_space(embeddings, out, labels=None, kept_iteration=None, max_panels=12):
    """Scatter of the 2D PCA embedding of every iteration, coloured by cluster.

    embeddings: path of DISCA's embeddings.npz (arrays 'embeddings' (iterations, N, 2) and 'labels'
    (iterations, N), 0-based clusters) or the embeddings array with `labels` given. kept_iteration: the
    iteration DISCA kept (framed). More iterations than `max_panels`: evenly chosen, first, kept and last
    included. Returns `out`.
    """
    if not isinstance(embeddings, np.ndarray):
        path = os.fspath(embeddings)
        if not os.path.exists(path):
            raise InputError(path, "embeddings file not found")
        with np.load(path) as npz:
            embeddings, labels = npz['embeddings'], npz['labels']
    embeddings, labels = np.asarray(embeddings), np.asarray(labels)
    if embeddings.ndim != 3 or embeddings.shape[-1] < 2 or labels.shape != embeddings.shape[:2]:
        raise InputError('embeddings', f"expected (iterations, N, 2) embeddings and (iterations, N) labels, got "
                                       f"{embeddings.shape} and {labels.shape}")
    shown = shown_iterations(len(embeddings), kept_iteration, max_panels)
    cols = min(4, len(shown))
    rows = int(math.ceil(len(shown) / cols))
    fig = _new_figure(3.2 * cols, 3.0 * rows + 0.6)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, it in zip(axes, shown):
        lab = labels[it].astype(int)
        k = int(lab.max()) + 1 if lab.size else 0
        colours = [class_colour(c + 1) for c in lab]
        ax.scatter(embeddings[it, :, 0], embeddings[it, :, 1], c=colours, s=6, linewidths=0)
        kept = kept_iteration is not None and it == int(kept_iteration)
        ax.set_title(f'iteration {it}: K = {k}' + (' (kept)' if kept else ''), fontsize=9,
                     fontweight='bold' if kept else 'normal')
        if kept:
            for spine in ax.spines.values():
                spine.set_edgecolor('red')
                spine.set_linewidth(2)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    fig.suptitle('DISCA feature space (first two PCA components), coloured by cluster', fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return _save(fig, out)


def disca_history(history, out, kept_iteration=None):
    """K, BIC and DDBI per DISCA iteration (with the fraction of labels that changed), kept iteration marked.

    history: DISCA's history.json (path or loaded dict with 'iterations' and 'kept_iteration') or a list of
    iteration entries (iteration, k, bic, ddbi, changed). Returns `out`.
    """
    if isinstance(history, (str, os.PathLike)):
        path = os.fspath(history)
        if not os.path.exists(path):
            raise InputError(path, "history file not found")
        with open(path) as fh:
            history = json.load(fh)
    final_k = None
    if isinstance(history, dict):
        if kept_iteration is None:
            kept_iteration = history.get('kept_iteration', (history.get('meta') or {}).get('best_iteration'))
        final_k = history.get('k')   # after the orientation and split checks, when they changed it
        history = history.get('iterations') or history.get('history') or []
    if not history:
        raise InputError('history', "no DISCA iterations recorded")
    it = np.array([_number(h.get('iteration', i)) for i, h in enumerate(history)])
    fig = _new_figure(12, 3.6)
    axes = fig.subplots(1, 3)
    for ax, key, label in zip(axes, ('k', 'bic', 'ddbi'), ('K (clusters)', 'BIC of the chosen mixture',
                                                         'DDBI (lower is better)')):
        y = np.array([_number(h.get(key)) for h in history])
        ok = np.isfinite(y)
        if ok.any():
            ax.plot(it[ok], y[ok], marker='o', drawstyle='steps-mid' if key == 'k' else 'default')
        else:
            _empty_note(ax, f'no {key}')
        refining = [float(i) for i, h in zip(it, history) if h.get('phase') == 'refine']
        if refining:
            # EM iterations re-run after the split check changed the clusters (disca._refine)
            ax.axvspan(min(refining) - 0.5, max(refining) + 0.5, color='0.85', zorder=0,
                       label='refinement after the split check')
        if kept_iteration is not None:
            ax.axvline(float(kept_iteration), color='r', linestyle='--', linewidth=1,
                       label=f'kept iteration {kept_iteration}')
            if key == 'k' and final_k is not None and 0 <= int(kept_iteration) < len(history) \
                    and _number(history[int(kept_iteration)].get('k')) != float(final_k):
                ax.plot([float(kept_iteration)], [float(final_k)], marker='*', markersize=12, color='r',
                        linestyle='none', label=f'final K = {final_k} (orientation / split checks)')
        if kept_iteration is not None or refining:
            ax.legend(fontsize=8)
        ax.set_xlabel('iteration')
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    changed = np.array([_number(h.get('changed')) for h in history])
    if np.isfinite(changed).any():
        twin = axes[0].twinx()
        ok = np.isfinite(changed)
        twin.plot(it[ok], changed[ok], color='0.5', linestyle=':', marker='.', label='labels changed')
        twin.set_ylim(0, 1.05)
        twin.set_ylabel('fraction of labels changed', color='0.4', fontsize=8)
    fig.suptitle('DISCA iterations', fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    return _save(fig, out)


def class_average_slices(averages, out, title='Class averages'):
    """Three orthogonal central slices (xy, xz, yz) of each class average, one row per class.

    averages: list of dicts {'class': label, 'file': MRC path (or 'volume': array), 'size': members}. The
    titles say "unaligned average": DISCA's members are randomly oriented, so these summarise a class, they
    are not structures. Returns `out`.
    """
    if not averages:
        raise InputError('averages', "no class averages to show")
    rows = len(averages)
    fig = _new_figure(7.5, 2.3 * rows + 0.7)
    axes = fig.subplots(rows, 3, squeeze=False)
    for r, entry in enumerate(averages):
        vol = entry.get('volume')
        if vol is None:
            vol = open_volume(entry['file'], ndim=3)[0]
        vol = np.asarray(vol, dtype=np.float32)
        cz, cy, cx = (s // 2 for s in vol.shape)
        planes = (('xy', vol[cz], 'x', 'y'), ('xz', vol[:, cy, :], 'x', 'z'), ('yz', vol[:, :, cx], 'y', 'z'))
        vmin, vmax = robust_limits(vol)
        for c, (name, plane, xl, yl) in enumerate(planes):
            ax = axes[r, c]
            ax.imshow(plane, cmap='gray', vmin=vmin, vmax=vmax, origin='lower', interpolation='nearest')
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(xl, fontsize=8)
            ax.set_ylabel(yl, fontsize=8)
            if c == 0:
                size = entry.get('size')
                ax.set_title(f"class {entry.get('class', r + 1)}" + (f' ({size} members)' if size is not None
                                                                      else '') + ', unaligned average',
                             fontsize=9, loc='left')
            else:
                ax.set_title(name, fontsize=8)
    fig.suptitle(title + ' — unaligned averages of randomly oriented members: a summary, not a structure',
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return _save(fig, out)


# ---------------------------------------------------------------------------------------------- 2D
def _read_image(image):
    if isinstance(image, np.ndarray):
        return image.astype(np.float32, copy=False)
    from ..engine.pick2d.micrograph_io import read_micrograph
    return read_micrograph(image)[0]


def micrograph_picks(micrograph, picks, out, radius=None, title=None, max_side=1024, score_range=None):
    """A micrograph with its picks as circles coloured by score (viridis, with a colour bar).

    micrograph: path (MRC, TIFF, PNG...) or (y, x) array. picks: DataFrame or STAR path with
    rlnCoordinateX (column) / rlnCoordinateY (row) in pixels of that micrograph and optional
    rlnAutopickFigureOfMerit. radius: pixels, or None for rlnDiameter / 2 (5 px when absent). The
    micrograph is block-averaged to at most `max_side` pixels for display; circles stay in micrograph
    pixels. Returns `out`.
    """
    import matplotlib
    from matplotlib import cm, colors
    image = _read_image(micrograph)
    df = _as_frame(picks, 2)
    h, w = image.shape
    factor = _display_factor(image.shape, max_side)
    fig = _new_figure(8.0 + 1.0, 8.0 * h / w + 0.8)
    ax = fig.subplots()
    _show_plane(ax, bin_image(image, factor), (-0.5, w - 0.5, -0.5, h - 0.5), 'upper')
    scores = df[star.SCORE].to_numpy()
    ok = np.isfinite(scores)
    lo, hi = score_range or ((float(scores[ok].min()), float(scores[ok].max())) if ok.any() else (0.0, 1.0))
    norm = colors.Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1e-6)
    cmap = matplotlib.colormaps['viridis']
    if len(df):
        rgba = [cmap(norm(s)) if np.isfinite(s) else (1.0, 0.2, 0.2, 1.0) for s in scores]
        _circles(ax, df[[star.X, star.Y]].to_numpy(), _radii(df, radius), rgba, linewidth=1.2)
    # always drawn, so figures with and without picks share one layout
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.04, pad=0.02, label='score')
    ax.set_xlabel('x (column)')
    ax.set_ylabel('y (row)')
    ax.set_title(title or f'{w}×{h} px, {len(df)} picks', fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def preprocessing_stages(stages, out, max_side=512, title='Preprocessing stages'):
    """The images of a preprocessing chain side by side: stages = [(name, image), ...] as
    `engine.preprocess2d.run_chain(..., keep_stages=True)` returns them. Returns `out`."""
    if not stages:
        raise InputError('stages', "no preprocessing stages to show")
    cols = min(4, len(stages))
    rows = int(math.ceil(len(stages) / cols))
    h, w = np.asarray(stages[0][1]).shape[:2]
    fig = _new_figure(3.4 * cols, (3.4 * h / w + 0.4) * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for i, (ax, (name, img)) in enumerate(zip(axes, stages)):
        img = np.asarray(img, dtype=np.float32)
        img = bin_image(img, _display_factor(img.shape, max_side))
        vmin, vmax = robust_limits(img, 0.5, 99.5)
        ax.imshow(img, cmap='gray', vmin=vmin, vmax=vmax, interpolation='nearest')
        ax.set_title(f'{i}. {name}', fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(stages):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return _save(fig, out)


def probability_map(prob, out, picks=None, image_shape=None, radius=None, title='Particle probability map',
                    max_side=1024):
    """A score / probability map (magma, colour bar) with the picks outlined in cyan.

    prob: MRC path or (y, x) array. picks: optional coordinate table in pixels of the micrograph whose
    shape is `image_shape` (default: the map's shape); coordinates are scaled onto the map when the shapes
    differ. Returns `out`.
    """
    from matplotlib import cm, colors
    if isinstance(prob, np.ndarray):
        data = prob.astype(np.float32, copy=False)
    else:
        data = np.asarray(open_volume(prob, ndim=2)[0], dtype=np.float32)
    if data.ndim != 2:
        raise InputError('probability map', f"expected a 2D map, got shape {data.shape}")
    h, w = data.shape
    fig = _new_figure(9.0, 8.0 * h / w + 0.8)
    ax = fig.subplots()
    factor = _display_factor(data.shape, max_side)
    lo, hi = float(np.nanmin(data)), float(np.nanmax(data))
    if 0.0 <= lo and hi <= 1.0:
        lo, hi = 0.0, 1.0  # probabilities: a fixed scale makes maps comparable
    ax.imshow(bin_image(data, factor), cmap='magma', vmin=lo, vmax=hi if hi > lo else lo + 1,
              extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation='nearest')
    fig.colorbar(cm.ScalarMappable(norm=colors.Normalize(lo, hi if hi > lo else lo + 1), cmap='magma'), ax=ax,
                 fraction=0.04, pad=0.02)
    n = 0
    if picks is not None:
        df = _as_frame(picks, 2)
        n = len(df)
        if n:
            sy, sx = (h / image_shape[0], w / image_shape[1]) if image_shape else (1.0, 1.0)
            xy = df[[star.X, star.Y]].to_numpy() * np.array([sx, sy])
            _circles(ax, xy, _radii(df, radius) * 0.5 * (sx + sy), ['cyan'] * n, linewidth=1.2)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_title(title + (f', {n} picks' if picks is not None else ''), fontsize=10)
    fig.tight_layout()
    return _save(fig, out)
