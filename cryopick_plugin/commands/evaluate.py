"""Evaluate picks against reference coordinates (one-to-one matching within a radius), or a clustering.

Picks and reference positions are paired one to one (Hungarian algorithm) when they lie within the
matching radius, separately in each tomogram (rlnTomoName) or micrograph (rlnMicrographName). Reported:
localisation (any class), classification (class must match), per-class numbers, the confusion of classes
and, when the picks have rlnAutopickFigureOfMerit, average precision and the best-F1 score threshold.
Positions are 3D when both files have rlnCoordinateZ, 2D otherwise.

Radius: --radius R in voxels (pixels), or --diameter D, the particle diameter in voxels, with
--radius-convention half (R = D/4, default: a pick must sit within half a particle radius of the centre)
or full (R = D/2, about DeepETPicker's occupancy criterion).

--clusters compares class labels instead: the two files describe the same particles (rows paired by
position, within --radius, 1 voxel by default) and rlnClassNumber of the second file is the reference;
reported are accuracy after Hungarian alignment, homogeneity, completeness, V-measure and adjusted Rand
index.

Examples:
  cryopick evaluate picks.star truth.star --diameter 12 --json scores.json
  cryopick evaluate deepet.star disca.star --radius 4 --out-prefix cmp   # cmp_intersection.star, ...
  cryopick evaluate clusters.star truth.star --clusters
"""
import json
import logging
import math
import os

import numpy as np

from ..engine import evaluate
from ..engine.io import star
from ..engine.errors import InputError
from ..engine.io.mrc import atomic_path

log = logging.getLogger(__name__)


def add_args(parser):
    parser.add_argument('picks', help='STAR file with the picks (or the clustering, with --clusters)')
    parser.add_argument('truth', help='STAR file with the reference coordinates (and classes)')
    size = parser.add_mutually_exclusive_group()
    size.add_argument('--diameter', type=float, help='particle diameter in voxels (pixels)')
    size.add_argument('--radius', type=float, help='matching radius in voxels (pixels)')
    parser.add_argument('--radius-convention', choices=('half', 'full'), default='half',
                        help='with --diameter: radius D/4 (half, default) or D/2 (full)')
    parser.add_argument('--pr-method', choices=('ranking', 'hungarian'), default='ranking',
                        help='how the precision-recall curve is computed (default ranking)')
    parser.add_argument('--json', metavar='OUT.json', help='write every number as JSON')
    parser.add_argument('--out-prefix', metavar='P', help='write P_intersection.star, P_only_picks.star, '
                                                         'P_only_truth.star')
    parser.add_argument('--clusters', action='store_true', help='compare class labels of the same particles')


def matching_radius(diameter=None, radius=None, convention='half'):
    """The matching radius from a radius or a diameter and a convention (half: D/4, full: D/2)."""
    if radius is not None:
        if not radius > 0:
            raise InputError('--radius', f"must be positive, got {radius:g}")
        return float(radius)
    if diameter is None:
        raise InputError('--diameter', "give --diameter D or --radius R")
    if not diameter > 0:
        raise InputError('--diameter', f"must be positive, got {diameter:g}")
    return float(diameter) / (4.0 if convention == 'half' else 2.0)


def read_table(path):
    """Read a coordinate STAR file as 3D when it has rlnCoordinateZ, else as 2D."""
    blocks = star.read_star_blocks(path)
    dims = 2
    for block in blocks.values():
        cols = getattr(block, 'columns', ())
        if star.X in cols and star.Y in cols:
            dims = 3 if star.Z in cols else 2
            break
    return star.read_coordinates(path, dims=dims)


def _clean(obj):
    """JSON-safe copy: NaN -> None, numpy scalars -> Python, dict keys -> str."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _row(name, m):
    return (f"{name:<16}{m['tp']:>7}{m['fp']:>7}{m['fn']:>7}{m['precision']:>10.3f}{m['recall']:>9.3f}"
            f"{m['f1']:>8.3f}{m['mean_distance']:>10.2f}")


def format_report(result):
    lines = [f"matching radius {result['radius']:g} ({result['dims']}D"
             + (f", per {result['volume_column']})" if result['volume_column'] else ")"),
             f"{'':<16}{'TP':>7}{'FP':>7}{'FN':>7}{'precision':>10}{'recall':>9}{'F1':>8}{'mean dist':>10}",
             _row('localisation', result['localisation']),
             _row('classification', result['classification'])]
    if len(result['per_class']) > 1:
        for c, m in result['per_class'].items():
            lines.append(_row(f'  class {c}', m))
    if 'average_precision' in result:
        b = result['best']
        lines.append(f"average precision {result['average_precision']:.3f}; best F1 {b['f1']:.3f} at score "
                     f">= {b['threshold']:.4g} (precision {b['precision']:.3f}, recall {b['recall']:.3f})")
    return '\n'.join(lines)


def _write_json(path, data):
    with atomic_path(path, suffix='.json') as tmp:
        with open(tmp, 'w') as fh:
            json.dump(_clean(data), fh, indent=1)


def main(args):
    picks = read_table(args.picks)
    truth = read_table(args.truth)
    if args.clusters:
        radius = 1.0 if args.radius is None and args.diameter is None else \
            matching_radius(args.diameter, args.radius, args.radius_convention)
        a_rows, b_rows = evaluate.pair_rows(picks, truth, radius)
        if len(a_rows) == 0:
            raise InputError(args.picks, f"no row lies within {radius:g} of a row of {args.truth}")
        result = evaluate.clustering_scores(truth[star.CLASS].to_numpy()[b_rows],
                                            picks[star.CLASS].to_numpy()[a_rows])
        result.update(unpaired_picks=len(picks) - len(a_rows), unpaired_truth=len(truth) - len(b_rows))
        print('\n'.join(f'{k:<22}{v:.4f}' if isinstance(v, float) else f'{k:<22}{v}'
                        for k, v in result.items()))
    else:
        radius = matching_radius(args.diameter, args.radius, args.radius_convention)
        result = evaluate.evaluate_picks(picks, truth, radius, pr_method=args.pr_method)
        print(format_report(result))
        if args.out_prefix:
            inter, only_a, only_b, _ = evaluate.compare_sets(picks, truth, radius)
            for suffix, df in (('intersection', inter), ('only_picks', only_a), ('only_truth', only_b)):
                path = f'{args.out_prefix}_{suffix}.star'
                star.write_coordinates(path, df)
                log.info('%d rows -> %s', len(df), path)
    result['picks'] = os.path.abspath(args.picks)
    result['truth'] = os.path.abspath(args.truth)
    if args.json:
        _write_json(args.json, result)
    return 0
