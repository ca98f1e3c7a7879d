"""The turning test on the true classes, with either rotation-invariant view: does one molecule's split fold
and do two molecules stay apart when every member is turned at random with the missing wedge put back?

For each molecule alone, its members are split by the best two-Gaussian fit on the view's features (the
split an EM loop or the split check would make: at ±40° mostly by orientation to the wedge); for each pair
of molecules, the sides are the true classes — or, with --pair-sides fit, the view's best two-Gaussian fit
too (what a split test on that view would propose for a cluster holding both; its agreement with the true
classes and its separation D, `checks.split_cluster`'s statistic, are recorded). Each group's members are turned twice
(`features.random_rotations` with the condition's tilt range) and the separation of the two sides
(`checks._side_separation`, the split check's statistic) is measured on the members and on the copies.
A rule that joins two clusters because their sides fold when turned needs one molecule's 'turned' values
below every pair's. Views: 'spectral' (`features.spectral_features`, what `checks.survives_turning` uses)
and 'invariants' (`features.invariant_features`: with the spherical-harmonic shell energies).

  .venv/bin/python bench/bench_disca_turned.py --out bench/results/disca_turned --conditions snr0.1_w40,snr0.01_w40 --seeds 0,1
  .venv/bin/python bench/bench_disca_turned.py --out bench/results/disca_turned_fit --conditions snr0.01_w40 --seeds 0,1 --views invariants --pair-sides fit
"""
import argparse
import itertools
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_disca  # noqa: E402
from bench_disca_split import two_gaussian_side  # noqa: E402
from cryopick_plugin.engine.disca import checks, em, features  # noqa: E402

VIEWS = {'spectral': features.spectral_features, 'invariants': features.invariant_features}


def turned_separations(name, seed, n_per_class, box=32, copies=2, views=tuple(VIEWS), pair_sides='truth'):
    snr, tilt, _, _ = bench_disca.CONDITIONS[name]
    sim = bench_disca.simulate(n_per_class, snr, tilt, box, seed)
    options = dict(em.TRAINING['cpu'])
    n_classes = len(sim.class_names)
    groups = [((c,), 'one molecule') for c in range(n_classes)]
    groups += [(pair, 'two molecules') for pair in itertools.combinations(range(n_classes), 2)]
    rows = []
    for view_name in views:
        view = VIEWS[view_name]
        values = view(sim.stack)
        for classes, kind in groups:
            members = np.flatnonzero(np.isin(sim.labels, classes))
            truth_side = (sim.labels[members] != classes[0]).astype(int)
            _, fit_side, _, split = checks.split_cluster(values[members], options, seed, min_separation=0.0,
                                                         min_size=int(options['min_per_cluster']))
            if kind == 'two molecules' and pair_sides == 'truth':
                side = truth_side
            else:   # split_cluster's fit, which it returns only when BIC prefers two groups
                side = fit_side if fit_side is not None else two_gaussian_side(values[members], options, seed)
            original = checks._side_separation(values[members], side, seed=seed)
            rng = np.random.default_rng(seed + 15485863)
            copies_values = np.concatenate([view(features.random_rotations(sim.stack[members], rng,
                                                                           tilt_range=float(tilt)))
                                            for _ in range(copies)])
            turned = checks._side_separation(copies_values, np.tile(side, copies), seed=seed)
            row = {'view': view_name, 'classes': [sim.class_names[c] for c in classes], 'kind': kind,
                   'original': round(original, 3), 'turned': round(turned, 3), 'ratio': round(turned / original, 3),
                   'split_separation': round(split.get('separation', 0.0), 3), 'sizes': np.bincount(side, minlength=2).tolist()}
            if kind == 'two molecules':
                row['agreement'] = round(float(max(np.mean(side == truth_side), np.mean(side != truth_side))), 3)
            rows.append(row)
            print(name, seed, row, flush=True)
    summary = {}
    for view_name in views:
        one = [r['turned'] for r in rows if r['view'] == view_name and r['kind'] == 'one molecule']
        two = [r['turned'] for r in rows if r['view'] == view_name and r['kind'] == 'two molecules']
        summary[view_name] = {'one_molecule_max': max(one), 'two_molecules_min': min(two)}
    print(name, seed, summary, flush=True)
    return {'condition': name, 'seed': seed, 'n_per_class': n_per_class, 'pair_sides': pair_sides, 'views': list(views),
            'rows': rows, 'summary': summary}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', required=True)
    parser.add_argument('--conditions', required=True, help='comma-separated condition names (bench_disca.py)')
    parser.add_argument('--seeds', default='0')
    parser.add_argument('--n-per-class', type=int, default=200)
    parser.add_argument('--views', default=','.join(VIEWS), help=f"comma-separated views ({', '.join(VIEWS)})")
    parser.add_argument('--pair-sides', choices=('truth', 'fit'), default='truth',
                        help="a pair's sides: the true classes, or the view's best two-Gaussian fit")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for name in args.conditions.split(','):
        for seed in (int(s) for s in args.seeds.split(',')):
            result = turned_separations(name, seed, args.n_per_class, views=args.views.split(','),
                                        pair_sides=args.pair_sides)
            path = os.path.join(args.out, f"{name}_seed{seed}{'_fit' if args.pair_sides == 'fit' else ''}.json")
            with open(path + '.part', 'w') as fh:
                json.dump(result, fh, indent=1)
            os.replace(path + '.part', path)
    return 0


if __name__ == '__main__':
    sys.exit(main())
