"""Evaluation of picks against a reference, of two pickers against each other, and of clusterings.

Picks are matched one to one: a predicted position and a true position may be paired only when they
lie within `radius` of each other, and among all such pairings the one with the most pairs, then the
smallest total distance, is chosen (Hungarian algorithm on the sparse set of admissible pairs). This is a
neutral metric that none of the four reference methods use: DeepETPicker counts predictions that land in
a particle's occupancy map, AutoCryoPicker counts centres inside a mask blob, CryoSegNet counts pixels.
One-to-one matching keeps a duplicate pick from counting twice and makes precision and recall symmetric.

Tables are coordinate DataFrames with RELION columns (see `engine/io/star.py`). When both tables carry
rlnTomoName (3D) or rlnMicrographName (2D), rows are matched only within the same volume. Positions are
3D when both tables have rlnCoordinateZ and 2D otherwise.

Radius conventions: the command line takes the particle diameter D and uses, in 3D, D/4 (half the
particle radius) by default, a strict criterion that asks a pick to sit near the centre; ``--radius-convention
full`` uses D/2, the particle radius, which is what DeepETPicker's occupancy test amounts to. In 2D the
default is D/2, the usual criterion of 2D picking benchmarks (CryoPPP, CryoSegNet's F1).

Per-class radii: `radius` may be a dict {class: radius} (with an optional 'default' for classes it does
not name). A pair is admissible when it lies within the radius of the true particle's class, so a small
complex is held to a tighter criterion than a large one in the same tomogram.

Volume names are compared by file name without folder and image extension, so 'TS_01', 'TS_01.mrc' and
'/data/TS_01.mrc' are one tomogram.
"""
import os

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import connected_components, min_weight_full_bipartite_matching
from scipy.spatial import cKDTree
from sklearn import metrics as skm

from .io import star
from .errors import InputError

# Connected components of the candidate graph up to this many cost-matrix entries are solved with a
# dense Hungarian solve; bigger ones (crowded volumes with a generous radius) with the sparse solver.
DENSE_LIMIT = 4_000_000


# ---------------------------------------------------------------------------------------------- matching

def _as_points(xyz, name):
    xyz = np.asarray(xyz, dtype=float)
    if xyz.ndim == 1 and xyz.size == 0:
        xyz = xyz.reshape(0, 3)
    if xyz.ndim != 2:
        raise InputError(name, f"expected an (N, 2|3) array of positions, got shape {xyz.shape}")
    if not np.all(np.isfinite(xyz)):
        raise InputError(name, "positions hold non-finite values")
    return xyz


def match_points(pred_xyz, true_xyz, radius, dense_limit=DENSE_LIMIT):
    """Optimal one-to-one matching of predicted to true positions within `radius`.

    Among all matchings that pair points closer than or at `radius`, returns one with the largest number
    of pairs and, among those, the smallest summed distance. `radius` is a number or one radius per true
    position (a pair is admissible within the radius of its true position).

    Returns (pairs, distances): pairs is a (K, 2) int array of (pred index, true index), sorted by pred
    index; distances is (K,) float.
    """
    pred = _as_points(pred_xyz, 'predicted positions')
    true = _as_points(true_xyz, 'true positions')
    per_true = np.broadcast_to(np.asarray(radius, dtype=float), (len(true),))
    if per_true.size and not np.all(per_true > 0):
        raise InputError('radius', f"must be positive, got {float(np.min(per_true)):g}")
    empty = (np.zeros((0, 2), dtype=int), np.zeros(0))
    if len(pred) == 0 or len(true) == 0:
        return empty
    if pred.shape[1] != true.shape[1]:
        raise InputError('positions', f"predicted are {pred.shape[1]}D, true are {true.shape[1]}D")
    radius = float(per_true.max())
    cand = cKDTree(pred).sparse_distance_matrix(cKDTree(true), radius, output_type='ndarray')
    if len(cand) == 0:
        return empty
    ci, cj, cd = cand['i'].astype(np.int64), cand['j'].astype(np.int64), cand['v'].astype(float)
    if per_true.min() < radius:
        ok = cd <= per_true[cj]
        ci, cj, cd = ci[ok], cj[ok], cd[ok]
        if len(ci) == 0:
            return empty
    n_pred, n_true = len(pred), len(true)
    # Bipartite graph, pred nodes 0..n_pred-1 and true nodes n_pred..; solve each component on its own.
    graph = sparse.coo_matrix((np.ones(len(ci)), (ci, cj + n_pred)), shape=(n_pred + n_true,) * 2)
    _, comp = connected_components(graph, directed=False)
    edge_comp = comp[ci]
    order = np.argsort(edge_comp, kind='stable')
    bounds = np.flatnonzero(np.diff(edge_comp[order])) + 1
    out_i, out_j = [], []
    for edges in np.split(order, bounds):
        pi, inv_i = np.unique(ci[edges], return_inverse=True)
        tj, inv_j = np.unique(cj[edges], return_inverse=True)
        d = cd[edges]
        if len(edges) == 1:
            rows, cols = np.zeros(1, int), np.zeros(1, int)
        elif len(pi) * len(tj) <= dense_limit:
            rows, cols = _solve_dense(inv_i, inv_j, d, len(pi), len(tj), radius)
        else:
            rows, cols = _solve_sparse(inv_i, inv_j, d, len(pi), len(tj), radius)
        out_i.append(pi[rows])
        out_j.append(tj[cols])
    if not out_i:
        return empty
    pi = np.concatenate(out_i)
    tj = np.concatenate(out_j)
    dist = np.linalg.norm(pred[pi] - true[tj], axis=1)
    keep = dist <= per_true[tj]
    order = np.argsort(pi[keep], kind='stable')
    return np.stack([pi[keep], tj[keep]], axis=1)[order], dist[keep][order]


def _big_cost(n_a, n_b, radius):
    # Larger than any sum of admissible distances: leaving one more pair unmatched never pays off.
    return float(radius) * (min(n_a, n_b) + 2) + 1.0


def _solve_dense(ii, jj, d, n_a, n_b, radius):
    big = _big_cost(n_a, n_b, radius)
    cost = np.full((n_a, n_b), big)
    cost[ii, jj] = d
    rows, cols = linear_sum_assignment(cost)
    ok = cost[rows, cols] < big
    return rows[ok], cols[ok]


def _solve_sparse(ii, jj, d, n_a, n_b, radius):
    """Maximum-cardinality, minimum-distance matching on a sparse graph.

    `min_weight_full_bipartite_matching` needs a perfect matching to exist, so the graph is augmented: A
    nodes a, B nodes b, a dummy B node a' per A node (edge a-a' costs `big`), a dummy A node b' per B node
    (b'-b costs `big`), and for every admissible pair (a, b) a free edge b'-a' that lets both dummies pair
    up when a and b are matched. Every perfect matching costs big × (unmatched real nodes) + Σ distances.
    A constant is added to every weight because the solver reads zero entries as missing edges.
    """
    big = _big_cost(n_a, n_b, radius)
    shift = 1.0
    n = n_a + n_b
    # rows: A nodes 0..n_a-1, dummy A nodes (one per B node) n_a..n-1
    # cols: B nodes 0..n_b-1, dummy B nodes (one per A node) n_b..n-1
    rows = np.concatenate([ii, np.arange(n_a), n_a + np.arange(n_b), n_a + jj])
    cols = np.concatenate([jj, n_b + np.arange(n_a), np.arange(n_b), n_b + ii])
    w = np.concatenate([d, np.full(n_a, big), np.full(n_b, big), np.zeros(len(ii))]) + shift
    mat = sparse.csr_matrix((w, (rows, cols)), shape=(n, n))
    r, c = min_weight_full_bipartite_matching(mat)
    ok = (r < n_a) & (c < n_b)
    return r[ok], c[ok]


# ---------------------------------------------------------------------------------------------- tables

# Extensions dropped from volume names before they are compared (see the module doc).
IMAGE_EXTENSIONS = ('.mrc', '.mrcs', '.rec', '.st', '.ali', '.map', '.tif', '.tiff', '.jpg', '.jpeg', '.png',
                    '.eer', '.star')


def volume_key(name):
    """A tomogram / micrograph name as compared between tables: file name without folder and extension."""
    base = os.path.basename(str(name).strip())
    while True:
        stem, ext = os.path.splitext(base)
        if not stem or ext.lower() not in IMAGE_EXTENSIONS:
            return base
        base = stem


def check_radius(radius):
    """A positive number, or a dict {class (int) or 'default': positive number}; InputError otherwise."""
    if isinstance(radius, dict):
        if not radius:
            raise InputError('radius', "no per-class radius given")
        out = {}
        for key, value in radius.items():
            key = 'default' if key in ('default', None) else int(key)
            out[key] = check_radius(value)
        return out
    try:
        value = float(radius)
    except (TypeError, ValueError):
        raise InputError('radius', f"must be a number, got {radius!r}") from None
    if not value > 0:
        raise InputError('radius', f"must be positive, got {value:g}")
    return value


def radii_of(radius, classes):
    """The matching radius of each row from its class: (N,) array (a number applies to every class)."""
    radius = check_radius(radius)
    classes = np.asarray(classes, dtype=int)
    if not isinstance(radius, dict):
        return np.full(len(classes), radius)
    missing = sorted(set(classes.tolist()) - set(radius)) if 'default' not in radius else []
    if missing:
        raise InputError('radius', f"no matching radius for class(es) {missing} (give one per class or a default)")
    return np.array([radius.get(int(c), radius.get('default')) for c in classes], dtype=float)


def volume_overlap(a_df, b_df, volume_col=None):
    """Which volumes the two tables name: dict column, common, only_a, only_b (sorted `volume_key`s).

    column is None when the tables do not both name their volumes; then only_a / only_b list the names of
    the table that has them, if any (its rows are matched against every row of the other).
    """
    col = _volume_column(a_df, b_df, volume_col)

    def names(df, c):
        return set(df[c].map(volume_key)) if c is not None and c in df.columns and len(df) else set()
    if col is None:
        present = [c for c in (star.TOMO, star.MIC) if c in a_df.columns or c in b_df.columns]
        c = present[0] if present else None
        return {'column': None, 'common': [], 'only_a': sorted(names(a_df, c)), 'only_b': sorted(names(b_df, c))}
    a, b = names(a_df, col), names(b_df, col)
    return {'column': col, 'common': sorted(a & b), 'only_a': sorted(a - b), 'only_b': sorted(b - a)}


def _volume_column(a_df, b_df, volume_col=None):
    if volume_col is not None:
        for df, what in ((a_df, 'predictions'), (b_df, 'truth')):
            if volume_col not in df.columns:
                raise InputError(what, f"has no column {volume_col}")
        return volume_col
    for col in (star.TOMO, star.MIC):
        if col in a_df.columns and col in b_df.columns:
            return col
    return None


def _coord_columns(a_df, b_df):
    cols = [star.X, star.Y]
    for df, what in ((a_df, 'predictions'), (b_df, 'truth')):
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise InputError(what, f"has no column {', '.join(missing)}")
    if star.Z in a_df.columns and star.Z in b_df.columns:
        cols.append(star.Z)
    return cols


def _groups(df, volume_col):
    """Mapping volume name -> integer row positions of that volume."""
    if volume_col is None or len(df) == 0:
        return {None: np.arange(len(df))}
    keys = df[volume_col].map(volume_key).to_numpy()
    return {k: np.flatnonzero(keys == k) for k in pd.unique(keys)}


def _match_tables(a_df, b_df, radius, volume_col, cols, by_class=False):
    """One-to-one matching of two tables within each volume (and class). Returns (pairs, distances).

    radius: a number, or a per-class dict applied to the classes of b (the reference)."""
    a_xyz = a_df[cols].to_numpy(dtype=float)
    b_xyz = b_df[cols].to_numpy(dtype=float)
    b_radii = radii_of(radius, _classes(b_df))
    a_keys = _row_keys(a_df, volume_col, by_class)
    b_keys = _row_keys(b_df, volume_col, by_class)
    b_index = {}
    for pos, key in enumerate(b_keys):
        b_index.setdefault(key, []).append(pos)
    a_index = {}
    for pos, key in enumerate(a_keys):
        a_index.setdefault(key, []).append(pos)
    pairs, dists = [np.zeros((0, 2), dtype=int)], [np.zeros(0)]
    for key, a_rows in a_index.items():
        b_rows = b_index.get(key)
        if not b_rows:
            continue
        a_rows, b_rows = np.asarray(a_rows), np.asarray(b_rows)
        p, d = match_points(a_xyz[a_rows], b_xyz[b_rows], b_radii[b_rows])
        pairs.append(np.stack([a_rows[p[:, 0]], b_rows[p[:, 1]]], axis=1))
        dists.append(d)
    pairs, dists = np.concatenate(pairs), np.concatenate(dists)
    order = np.argsort(pairs[:, 0], kind='stable')
    return pairs[order], dists[order]


def _row_keys(df, volume_col, by_class):
    n = len(df)
    vol = df[volume_col].map(volume_key).to_numpy() if volume_col else np.full(n, '')
    if by_class:
        cls = _classes(df)
        return list(zip(vol, cls))
    return list(vol)


def _classes(df):
    if star.CLASS in df.columns:
        return df[star.CLASS].to_numpy(dtype=int)
    return np.ones(len(df), dtype=int)


def counts_to_metrics(tp, n_pred, n_true, distances=()):
    """tp/fp/fn, precision, recall, F1 and mean matched distance. Undefined ratios (0/0) are 0.0."""
    tp, n_pred, n_true = int(tp), int(n_pred), int(n_true)
    fp, fn = n_pred - tp, n_true - tp
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_true if n_true else 0.0
    f1 = 2 * tp / (n_pred + n_true) if (n_pred + n_true) else 0.0
    distances = np.asarray(distances, dtype=float)
    mean_d = float(distances.mean()) if distances.size else float('nan')
    return {'tp': tp, 'fp': fp, 'fn': fn, 'n_pred': n_pred, 'n_true': n_true, 'precision': precision,
            'recall': recall, 'f1': f1, 'mean_distance': mean_d}


def evaluate_picks(pred_df, true_df, radius, volume_col=None, pr_method='ranking', n_thresholds=100,
                   with_classes=True):
    """Compare predicted picks with the truth.

    pred_df, true_df: coordinate tables (RELION columns). radius: matching radius in voxels (pixels), or
    {class: radius} (optional 'default') applied by the class of the true particle.
    volume_col: column naming the volume of each row; by default rlnTomoName, else rlnMicrographName,
    when both tables have it (otherwise every row is taken to belong to one volume).

    Returns a dict:

    - 'localisation': tp, fp, fn, n_pred, n_true, precision, recall, f1, mean_distance (mean distance of
      matched pairs, NaN when there is none), classes ignored;
    - 'classification': the same counts with matching done within each class separately, so a pick
      counts only when its rlnClassNumber is right;
    - 'per_class': {class: metrics} for each class present in either table (class-restricted matching);
    - 'confusion': {true class: {predicted class: count}} over the localisation pairs;
    - with rlnAutopickFigureOfMerit in pred_df: 'pr_curve' {'threshold', 'precision', 'recall', 'f1'}
      (lists, thresholds descending; a pick is kept when score >= threshold), 'average_precision' and
      'best' (threshold, precision, recall, f1 at the best F1).

    pr_method='ranking' (default) is the detection-benchmark (PASCAL VOC) approach: picks are visited in
    decreasing score and each takes the nearest still-free true particle within `radius`; one pass gives
    every threshold, and average precision is the area under the monotone precision envelope. The
    localisation numbers themselves always come from the optimal matching, which can find a few more pairs
    than this greedy pass. pr_method='hungarian' re-runs the optimal matching at up to `n_thresholds`
    score quantiles instead (slower, consistent with 'localisation' at the lowest threshold).

    with_classes=False (a truth without classes) leaves out 'classification', 'per_class' and 'confusion'.
    'radius' in the result is the number, or the per-class dict with int keys.
    """
    radius = check_radius(radius)
    volume_col = _volume_column(pred_df, true_df, volume_col)
    cols = _coord_columns(pred_df, true_df)
    pred_df = pred_df.reset_index(drop=True)
    true_df = true_df.reset_index(drop=True)

    pairs, dists = _match_tables(pred_df, true_df, radius, volume_col, cols)
    result = {'radius': radius, 'dims': len(cols), 'volume_column': volume_col,
              'localisation': counts_to_metrics(len(pairs), len(pred_df), len(true_df), dists)}

    pred_cls, true_cls = _classes(pred_df), _classes(true_df)
    if not with_classes:
        _add_pr_curve(result, pred_df, true_df, radius, volume_col, cols, pr_method, n_thresholds)
        return result
    cpairs, cdists = _match_tables(pred_df, true_df, radius, volume_col, cols, by_class=True)
    result['classification'] = counts_to_metrics(len(cpairs), len(pred_df), len(true_df), cdists)
    per_class = {}
    matched_cls = true_cls[cpairs[:, 1]]
    for c in sorted(set(pred_cls.tolist()) | set(true_cls.tolist())):
        sel = matched_cls == c
        per_class[int(c)] = counts_to_metrics(sel.sum(), (pred_cls == c).sum(), (true_cls == c).sum(),
                                              cdists[sel])
    result['per_class'] = per_class
    confusion = {}
    for t, p in zip(true_cls[pairs[:, 1]], pred_cls[pairs[:, 0]]):
        row = confusion.setdefault(int(t), {})
        row[int(p)] = row.get(int(p), 0) + 1
    result['confusion'] = confusion
    _add_pr_curve(result, pred_df, true_df, radius, volume_col, cols, pr_method, n_thresholds)
    return result


def _add_pr_curve(result, pred_df, true_df, radius, volume_col, cols, pr_method, n_thresholds):
    if star.SCORE in pred_df.columns and len(pred_df):
        scores = pd.to_numeric(pred_df[star.SCORE], errors='coerce').to_numpy(dtype=float)
        if not np.all(np.isfinite(scores)):
            raise InputError('predictions', f"column {star.SCORE} holds non-numeric or non-finite values")
        if pr_method == 'ranking':
            curve = _ranking_curve(pred_df, true_df, scores, radius, volume_col, cols)
        elif pr_method == 'hungarian':
            curve = _hungarian_curve(pred_df, true_df, scores, radius, volume_col, cols, n_thresholds)
        else:
            raise InputError('pr_method', f"unknown method {pr_method!r} (ranking, hungarian)")
        result['pr_curve'] = {k: v.tolist() for k, v in curve.items()}
        result['average_precision'] = average_precision(curve['precision'], curve['recall'])
        best = int(np.argmax(curve['f1']))
        result['best'] = {k: float(v[best]) for k, v in curve.items()}


def _ranking_curve(pred_df, true_df, scores, radius, volume_col, cols):
    pred_xyz = pred_df[cols].to_numpy(dtype=float)
    true_xyz = true_df[cols].to_numpy(dtype=float)
    true_radii = radii_of(radius, _classes(true_df))
    reach = float(true_radii.max()) if len(true_radii) else 1.0
    hit = np.zeros(len(pred_df), dtype=bool)
    true_groups = _groups(true_df, volume_col)
    for key, p_rows in _groups(pred_df, volume_col).items():
        t_rows = true_groups.get(key)
        if t_rows is None or len(t_rows) == 0:
            continue
        tree = cKDTree(true_xyz[t_rows])
        taken = np.zeros(len(t_rows), dtype=bool)
        for r in p_rows[np.argsort(-scores[p_rows], kind='stable')]:
            near = tree.query_ball_point(pred_xyz[r], reach)
            free = np.array([j for j in near if not taken[j]], dtype=np.int64)
            if len(free):
                d = np.linalg.norm(true_xyz[t_rows[free]] - pred_xyz[r], axis=1)
                within = d <= true_radii[t_rows[free]]
                free, d = free[within], d[within]
            if len(free):
                taken[free[int(np.argmin(d))]] = True
                hit[r] = True
    order = np.argsort(-scores, kind='stable')
    s = scores[order]
    cum_tp = np.cumsum(hit[order])
    # one point per distinct score: the last position of each run of equal scores
    last = np.flatnonzero(np.append(s[1:] != s[:-1], True))
    tp = cum_tp[last].astype(float)
    n_kept = last + 1.0
    n_true = len(true_df)
    precision = tp / n_kept
    recall = tp / n_true if n_true else np.zeros_like(tp)
    f1 = 2 * tp / (n_kept + n_true)
    return {'threshold': s[last], 'precision': precision, 'recall': recall, 'f1': f1}


def _hungarian_curve(pred_df, true_df, scores, radius, volume_col, cols, n_thresholds):
    thresholds = candidate_thresholds(scores, n_thresholds)
    rows = {'threshold': [], 'precision': [], 'recall': [], 'f1': []}
    for t in thresholds:
        kept = pred_df[scores >= t]
        pairs, _ = _match_tables(kept, true_df, radius, volume_col, cols)
        m = counts_to_metrics(len(pairs), len(kept), len(true_df))
        rows['threshold'].append(t)
        for k in ('precision', 'recall', 'f1'):
            rows[k].append(m[k])
    return {k: np.asarray(v, dtype=float) for k, v in rows.items()}


def candidate_thresholds(scores, n_max=100):
    """Distinct scores in decreasing order, thinned to at most `n_max` quantiles (always incl. the lowest)."""
    uniq = np.unique(np.asarray(scores, dtype=float))[::-1]
    if len(uniq) > n_max:
        idx = np.unique(np.round(np.linspace(0, len(uniq) - 1, n_max)).astype(int))
        uniq = uniq[idx]
    return uniq


def average_precision(precision, recall):
    """Area under the precision-recall curve with the monotone (interpolated) precision envelope.

    Points must be ordered by decreasing threshold (increasing recall). Perfectly ranked picks that find
    every true particle give 1.0.
    """
    p = np.concatenate([[0.0], np.asarray(precision, float), [0.0]])
    r = np.concatenate([[0.0], np.asarray(recall, float), [np.asarray(recall, float)[-1] if len(recall) else 0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    steps = np.flatnonzero(r[1:] != r[:-1]) + 1
    return float(np.sum((r[steps] - r[steps - 1]) * p[steps]))


def compare_sets(a_df, b_df, radius, volume_col=None):
    """Compare two pickers (DeepETPicker's two-set comparison) with one-to-one matching within `radius`.

    Returns (intersection_df, only_a_df, only_b_df, metrics): intersection_df are the rows of a that
    found a partner in b (with an extra column 'matchDistance'), only_a_df / only_b_df the unmatched rows of
    each. metrics: n_a, n_b, n_both, only_a, only_b, jaccard (n_both / size of the union) and the
    localisation metrics of a taken as predictions against b taken as truth. radius: a number or a
    per-class dict (classes of b).
    """
    radius = check_radius(radius)
    volume_col = _volume_column(a_df, b_df, volume_col)
    cols = _coord_columns(a_df, b_df)
    a_df = a_df.reset_index(drop=True)
    b_df = b_df.reset_index(drop=True)
    pairs, dists = _match_tables(a_df, b_df, radius, volume_col, cols)
    inter = a_df.iloc[pairs[:, 0]].copy()
    inter['matchDistance'] = dists
    only_a = a_df.drop(index=pairs[:, 0])
    only_b = b_df.drop(index=pairs[:, 1])
    n_both = len(pairs)
    union = len(a_df) + len(b_df) - n_both
    metrics = {'n_a': len(a_df), 'n_b': len(b_df), 'n_both': n_both, 'only_a': len(only_a),
               'only_b': len(only_b), 'jaccard': n_both / union if union else 0.0,
               **counts_to_metrics(n_both, len(a_df), len(b_df), dists)}
    return (inter.reset_index(drop=True), only_a.reset_index(drop=True), only_b.reset_index(drop=True),
            metrics)


# ---------------------------------------------------------------------------------------------- clusters

def hungarian_align(ref_labels, labels):
    """Rename the clusters of `labels` to the reference labels they overlap most (one to one).

    The assignment maximises the number of items whose new label equals their reference label
    (Hungarian algorithm on the contingency table). Clusters left without a partner (more clusters than
    reference classes) get fresh labels not used by the reference, so they count as wrong.

    Returns (mapping {label: new label}, relabelled array).
    """
    ref = np.asarray(ref_labels)
    lab = np.asarray(labels)
    if ref.shape != lab.shape or ref.ndim != 1:
        raise InputError('labels', f"need two 1D label arrays of equal length, got {ref.shape} and {lab.shape}")
    ref_u, ref_i = np.unique(ref, return_inverse=True)
    lab_u, lab_i = np.unique(lab, return_inverse=True)
    table = np.zeros((len(lab_u), len(ref_u)), dtype=np.int64)
    np.add.at(table, (lab_i, ref_i), 1)
    rows, cols = linear_sum_assignment(-table)
    mapping = {lab_u[r].item(): ref_u[c].item() for r, c in zip(rows, cols)}
    spare = [u.item() for u in lab_u if u.item() not in mapping]
    if spare:
        numeric = np.issubdtype(ref_u.dtype, np.number)
        start = (int(np.max(ref_u)) + 1) if numeric and len(ref_u) else 0
        for k, u in enumerate(spare):
            mapping[u] = start + k if numeric else f'unmatched_{u}'
    relabelled = np.array([mapping[v.item()] for v in lab]) if len(lab) else lab.copy()
    return mapping, relabelled


def clustering_scores(true_labels, pred_labels):
    """Agreement of a clustering with reference classes (DISCA's evaluation plus the adjusted Rand index).

    Returns homogeneity, completeness, v_measure, adjusted_rand_index, accuracy (fraction right after
    `hungarian_align`), n_items, n_true_classes, n_pred_clusters.
    """
    t = np.asarray(true_labels)
    p = np.asarray(pred_labels)
    if t.shape != p.shape or t.ndim != 1 or t.size == 0:
        raise InputError('labels', f"need two non-empty 1D label arrays of equal length, got {t.shape} and {p.shape}")
    h, c, v = skm.homogeneity_completeness_v_measure(t, p)
    _, aligned = hungarian_align(t, p)
    return {'homogeneity': float(h), 'completeness': float(c), 'v_measure': float(v),
            'adjusted_rand_index': float(skm.adjusted_rand_score(t, p)),
            'accuracy': float(np.mean(aligned == t)), 'n_items': int(t.size),
            'n_true_classes': int(len(np.unique(t))), 'n_pred_clusters': int(len(np.unique(p)))}


def pair_rows(a_df, b_df, radius=1.0, volume_col=None):
    """Pair the rows of two tables describing the same particles by position (one to one within radius).

    Returns (a rows, b rows) as integer position arrays.
    """
    volume_col = _volume_column(a_df, b_df, volume_col)
    cols = _coord_columns(a_df, b_df)
    pairs, _ = _match_tables(a_df.reset_index(drop=True), b_df.reset_index(drop=True), radius, volume_col,
                             cols)
    return pairs[:, 0], pairs[:, 1]
