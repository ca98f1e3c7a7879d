"""Evaluate picks against reference coordinates (one-to-one matching within a radius), or a clustering.

Picks and reference positions are paired one to one (Hungarian algorithm) when they lie within the
matching radius, separately in each tomogram (rlnTomoName) or micrograph (rlnMicrographName; names are
compared without folder and extension). Reported: localisation (any class) and, when the reference has
rlnClassNumber, classification (class must match), per-class numbers and the confusion of classes; when
the picks have rlnAutopickFigureOfMerit, average precision and the best-F1 score threshold. Positions are
3D when every file has rlnCoordinateZ, 2D otherwise.

Inputs: PICKS TRUTH, each a STAR file, a folder of STAR files (every *.star in it, e.g. one per
micrograph) or a quoted pattern ('picks/*_autopick.star'). With --truth, every positional path is picks:
  cryopick evaluate mic1_picks.star mic2_picks.star --truth truth/ --diameter 108
A file without rlnMicrographName / rlnTomoName read from a folder or among several files is taken to hold
the micrograph (tomogram) its file name names, minus a suffix such as _picks, _autopick or _manualpick.
A warning says when names in the picks and the truth do not overlap.

Radius: --radius R in voxels (pixels), or --diameter D, the particle diameter, with --radius-convention
half (R = D/4) or full (R = D/2). The default convention is full (D/2) in 2D, the usual criterion of 2D
picking benchmarks, and half (D/4: a pick must sit within half a particle radius of the centre) in 3D;
the first line of the report says which radius was used and why. Per class: --radius-per-class 1:10,2:6
or --diameter-per-class 1:33.6,2:20.4 (classes of the reference; --radius / --diameter is the default for
the classes not named).

--clusters compares class labels instead: the two files describe the same particles (rows paired by
position, within --radius, 1 voxel by default) and rlnClassNumber of the second file is the reference;
reported are accuracy after Hungarian alignment, homogeneity, completeness, V-measure and adjusted Rand
index.

Examples:
  cryopick evaluate picks.star truth.star --diameter 12 --json scores.json
  cryopick evaluate picks/ truth/ --diameter 108                      # per-micrograph STAR files
  cryopick evaluate picks.star truth.star --radius 3 --radius-per-class 1:8,2:5
  cryopick evaluate deepet.star disca.star --radius 4 --out-prefix cmp   # cmp_intersection.star, ...
  cryopick evaluate clusters.star truth.star --clusters
"""
import glob
import json
import logging
import math
import os

import numpy as np
import pandas as pd

from ..engine import evaluate
from ..engine.io import star
from ..engine.errors import InputError
from ..engine.io.mrc import atomic_path

log = logging.getLogger(__name__)

# File-name endings that name what a per-micrograph STAR file holds rather than the micrograph itself
# (RELION's _autopick / _manualpick, cryopick's _picks, common hand-made ones).
FILE_SUFFIXES = ('_autopick', '_manualpick', '_picks', '_pick', '_coords', '_coordinates', '_truth',
                 '_particles', '_mask')


def add_args(parser):
    parser.add_argument('picks', nargs='+', metavar='PICKS',
                        help='STAR file(s), folder(s) or quoted pattern(s) with the picks (or the clustering, '
                             'with --clusters); without --truth the last one is the reference')
    parser.add_argument('--truth', nargs='+', default=None, metavar='TRUTH',
                        help='reference coordinates (and classes): STAR file(s), folder(s) or pattern(s); '
                             'then every positional path is picks')
    size = parser.add_mutually_exclusive_group()
    size.add_argument('--diameter', type=float, help='particle diameter in voxels (pixels)')
    size.add_argument('--radius', type=float, help='matching radius in voxels (pixels)')
    per_class = parser.add_mutually_exclusive_group()
    per_class.add_argument('--diameter-per-class', default='', metavar='C:D,...',
                           help='per-class particle diameters (classes of the reference), e.g. 1:33.6,2:20.4')
    per_class.add_argument('--radius-per-class', default='', metavar='C:R,...',
                           help='per-class matching radii (classes of the reference), e.g. 1:8,2:5')
    parser.add_argument('--radius-convention', choices=('half', 'full'), default=None,
                        help='with a diameter: radius D/4 (half) or D/2 (full); default full in 2D, half in 3D')
    parser.add_argument('--pr-method', choices=('ranking', 'hungarian'), default='ranking',
                        help='how the precision-recall curve is computed (default ranking)')
    parser.add_argument('--json', metavar='OUT.json', help='write every number as JSON')
    parser.add_argument('--out-prefix', metavar='P', help='write P_intersection.star, P_only_picks.star, '
                                                         'P_only_truth.star')
    parser.add_argument('--clusters', action='store_true', help='compare class labels of the same particles')


# ------------------------------------------------------------------------------------------- radius

def default_convention(dims):
    """'full' (D/2) in 2D, the usual 2D criterion; 'half' (D/4), the strict one, in 3D."""
    return 'full' if dims == 2 else 'half'


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


def _parse_pairs(text, option):
    out = {}
    for pair in str(text or '').replace(' ', '').split(','):
        if not pair:
            continue
        try:
            cls_, value = pair.split(':')
            value = float(value)
            key = 'default' if cls_ == 'default' else int(cls_)
        except ValueError:
            raise InputError(option, f"expected class:value pairs like '1:8,2:5', got {text!r}") from None
        if not value > 0:
            raise InputError(option, f"class {cls_}: must be positive, got {value:g}")
        out[key] = value
    return out


def radius_spec(args, dims):
    """(radius: number or {class: radius}, one line saying which radius is used and why)."""
    convention = args.radius_convention or default_convention(dims)
    divisor = 4.0 if convention == 'half' else 2.0
    conv_text = (f"{'D/4' if convention == 'half' else 'D/2'} ({convention} convention"
                 + ('' if args.radius_convention else f", the {dims}D default") + ')')
    unit = 'pixels' if dims == 2 else 'voxels'
    per_class = {}
    if args.radius_per_class:
        per_class = _parse_pairs(args.radius_per_class, '--radius-per-class')
    elif args.diameter_per_class:
        per_class = {c: d / divisor for c, d in _parse_pairs(args.diameter_per_class, '--diameter-per-class').items()}
    base = None
    if args.radius is not None or args.diameter is not None:
        base = matching_radius(args.diameter, args.radius, convention)
    elif not per_class:
        raise InputError('--diameter', "give --diameter D or --radius R (or per-class radii)")
    from_diameter = args.diameter is not None or bool(args.diameter_per_class)
    why = f" = {conv_text}" if from_diameter else ''
    if not per_class:
        return base, f"matching radius {base:g} {unit}{why}"
    if base is not None:
        per_class.setdefault('default', base)
    shown = ', '.join(f'class {c}: {r:g}' for c, r in sorted(per_class.items(), key=lambda kv: str(kv[0])))
    return per_class, f"matching radius per class of the reference ({shown}) {unit}{why}"


# ------------------------------------------------------------------------------------------- inputs

def expand_paths(specs, option):
    """Files named by files, folders (*.star inside) or glob patterns; (paths, True when more than one
    file was meant: a folder, a pattern or several paths)."""
    paths, several = [], len(specs) > 1
    for spec in specs:
        if os.path.isdir(spec):
            found = sorted(glob.glob(os.path.join(spec, '*.star')))
            if not found:
                raise InputError(spec, "folder holds no .star file")
            paths += found
            several = True
        elif os.path.exists(spec):
            paths.append(spec)
        elif glob.has_magic(spec):
            found = sorted(p for p in glob.glob(spec) if os.path.isfile(p))
            if not found:
                raise InputError(spec, "pattern matches no file")
            paths += found
            several = True
        else:
            raise InputError(spec, f"file not found ({option})")
    return paths, several


def _file_volume_name(path):
    stem = evaluate.volume_key(path)
    for suffix in FILE_SUFFIXES:
        if stem.lower().endswith(suffix) and len(stem) > len(suffix):
            return stem[:-len(suffix)]
    return stem


def read_table(path):
    """Read a coordinate STAR file as 3D when it has rlnCoordinateZ, else as 2D."""
    return _read_one(path)[0]


def _read_one(path):
    """(table, dims, whether the file has rlnClassNumber)."""
    blocks = star.read_star_blocks(path)
    dims, has_class = 2, False
    for block in blocks.values():
        cols = getattr(block, 'columns', ())
        if star.X in cols and star.Y in cols:
            dims = 3 if star.Z in cols else 2
            has_class = star.CLASS in cols
            break
    return star.read_coordinates(path, dims=dims), dims, has_class


def read_tables(specs, option):
    """One table from files, folders or patterns: (table, dims, any file has classes, paths).

    Files read from a folder or among several that do not name their volume get the volume named by their
    file name (rlnMicrographName in 2D, rlnTomoName in 3D)."""
    paths, several = expand_paths(specs, option)
    read = [_read_one(p) for p in paths]
    dims = min(d for _, d, _ in read)
    tables = []
    for path, (table, d, _) in zip(paths, read):
        if d != dims:
            table = table.drop(columns=[star.Z])
        column = star.TOMO if dims == 3 else star.MIC
        if several and star.TOMO not in table.columns and star.MIC not in table.columns:
            table = table.assign(**{column: _file_volume_name(path)})
        tables.append(table)
    table = tables[0] if len(tables) == 1 else pd.concat(tables, ignore_index=True)
    return table, dims, any(c for _, _, c in read), paths


def warn_about_names(picks, truth, what_picks='picks', what_truth='truth'):
    """Log warnings when the volume names of the picks and the truth do not (all) overlap; return them."""
    info = evaluate.volume_overlap(picks, truth)
    warnings = []

    def some(names):
        return ', '.join(names[:4]) + (f' and {len(names) - 4} more' if len(names) > 4 else '')
    kind = 'tomogram' if star.TOMO in (info['column'] or '') else 'micrograph'
    if info['column'] is None:
        for names, has, lacks in ((info['only_a'], what_picks, what_truth), (info['only_b'], what_truth, what_picks)):
            if len(names) > 1:
                warnings.append(f"the {has} name {len(names)} volumes ({some(names)}) but the {lacks} name none: "
                                f"every row is matched as if all came from one volume")
    elif not info['common']:
        warnings.append(f"no {kind} name is shared by the {what_picks} ({some(info['only_a'])}) and the "
                        f"{what_truth} ({some(info['only_b'])}): every pick counts as false and every particle as "
                        f"missed; check the {info['column']} values")
    else:
        if info['only_a']:
            warnings.append(f"{len(info['only_a'])} {kind}(s) of the {what_picks} are not in the {what_truth} "
                            f"({some(info['only_a'])}): their picks count as false")
        if info['only_b']:
            warnings.append(f"{len(info['only_b'])} {kind}(s) of the {what_truth} have no {what_picks} "
                            f"({some(info['only_b'])}): their particles count as missed")
    for w in warnings:
        log.warning('%s', w)
    return warnings


# ------------------------------------------------------------------------------------------- report

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


def format_report(result, radius_line=None):
    radius = result['radius']
    if radius_line is None:
        radius_line = (f"matching radius {radius:g}" if not isinstance(radius, dict) else
                       'matching radius per class ' + ', '.join(f'{k}: {v:g}' for k, v in radius.items()))
    lines = [radius_line + f" ({result['dims']}D"
             + (f", per {result['volume_column']})" if result['volume_column'] else ")"),
             f"{'':<16}{'TP':>7}{'FP':>7}{'FN':>7}{'precision':>10}{'recall':>9}{'F1':>8}{'mean dist':>10}",
             _row('localisation', result['localisation'])]
    if 'classification' in result:
        lines.append(_row('classification', result['classification']))
        if len(result['per_class']) > 1:
            for c, m in result['per_class'].items():
                lines.append(_row(f'  class {c}', m))
    else:
        lines.append('(the reference has no rlnClassNumber: no classification scores)')
    if 'average_precision' in result:
        b = result['best']
        lines.append(f"average precision {result['average_precision']:.3f}; best F1 {b['f1']:.3f} at score "
                     f">= {b['threshold']:.4g} (precision {b['precision']:.3f}, recall {b['recall']:.3f})")
    return '\n'.join(lines)


def _write_json(path, data):
    with atomic_path(path, suffix='.json') as tmp:
        with open(tmp, 'w') as fh:
            json.dump(_clean(data), fh, indent=1)


def _split_inputs(args):
    if args.truth:
        return args.picks, args.truth
    if len(args.picks) != 2:
        raise InputError('evaluate', f"give PICKS TRUTH, or the reference with --truth when there are several "
                                     f"pick files (got {len(args.picks)} paths)")
    return args.picks[:1], args.picks[1:]


def main(args):
    pick_specs, truth_specs = _split_inputs(args)
    picks, p_dims, _, pick_paths = read_tables(pick_specs, 'picks')
    truth, t_dims, truth_has_classes, truth_paths = read_tables(truth_specs, '--truth')
    dims = min(p_dims, t_dims)
    if args.clusters:
        if len(pick_paths) != 1 or len(truth_paths) != 1:
            raise InputError('--clusters', "compares one clustering file with one reference file")
        radius = 1.0 if args.radius is None and args.diameter is None else \
            matching_radius(args.diameter, args.radius, args.radius_convention or default_convention(dims))
        a_rows, b_rows = evaluate.pair_rows(picks, truth, radius)
        if len(a_rows) == 0:
            raise InputError(pick_paths[0], f"no row lies within {radius:g} of a row of {truth_paths[0]}")
        result = evaluate.clustering_scores(truth[star.CLASS].to_numpy()[b_rows],
                                            picks[star.CLASS].to_numpy()[a_rows])
        result.update(unpaired_picks=len(picks) - len(a_rows), unpaired_truth=len(truth) - len(b_rows))
        print('\n'.join(f'{k:<22}{v:.4f}' if isinstance(v, float) else f'{k:<22}{v}'
                        for k, v in result.items()))
    else:
        radius, radius_line = radius_spec(args, dims)
        if isinstance(radius, dict) and not truth_has_classes and 'default' not in radius:
            raise InputError(truth_paths[0], "has no rlnClassNumber: per-class radii need classes in the "
                                             "reference (or give --radius / --diameter too)")
        warnings = warn_about_names(picks, truth)
        result = evaluate.evaluate_picks(picks, truth, radius, pr_method=args.pr_method,
                                         with_classes=truth_has_classes)
        result['radius_used'] = radius_line
        result['warnings'] = warnings
        print(format_report(result, radius_line))
        if args.out_prefix:
            inter, only_a, only_b, _ = evaluate.compare_sets(picks, truth, radius)
            for suffix, df in (('intersection', inter), ('only_picks', only_a), ('only_truth', only_b)):
                path = f'{args.out_prefix}_{suffix}.star'
                star.write_coordinates(path, df)
                log.info('%d rows -> %s', len(df), path)
    result['picks'] = os.path.abspath(pick_paths[0]) if len(pick_paths) == 1 else \
        [os.path.abspath(p) for p in pick_paths]
    result['truth'] = os.path.abspath(truth_paths[0]) if len(truth_paths) == 1 else \
        [os.path.abspath(p) for p in truth_paths]
    if args.json:
        _write_json(args.json, result)
    return 0
