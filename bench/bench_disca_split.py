"""The DISCA split check (`checks.split_mixed`) applied again to finished `bench_disca.py` runs.

The split check runs after the EM loop and only reads the kept iteration's labels and the subtomograms, so
its effect on a finished condition can be measured without clustering again: the simulated set is made
anew (`bench_disca.simulate`, same seed — deterministic), the kept iteration's labels are read from
<condition>_labels.npz (before any orientation-check merge), and the engine's own split check runs on them
with the preset's options (optionally with the condition's tilt range, which turns on the orientation
guard `checks.split_crossing`). Scores before and after against the true classes go to
<out>/<condition>_split.json.

  .venv/bin/python bench/bench_disca_split.py --runs bench/results/disca_check --conditions snr0.03_w60,snr0.03_w40

With --truth (no finished run needed) it applies the split rule (`checks.split_decision`: BIC, separation
and, with the condition's tilt range, the orientation guard) to the true classes of a simulated set: each
molecule alone (should not be split) and every pair of molecules (should be: that is also the test that
keeps the orientation check from merging two clusters) — the rule's error rates on known truth, per
condition, in <out>/<condition>_truth_seed<seed>.json.

  .venv/bin/python bench/bench_disca_split.py --truth --conditions snr0.01_w60,snr0.01_w40 --n-per-class 50 --seed 0 --out bench/results/disca_truth

With --truth --turned each group also gets the refinement's turning test (`checks.survives_turning`, the
condition's tilt range): the two sides of its split — or, for a group the rule keeps whole, of the best
two-Gaussian fit, so that one molecule's halves by orientation are measured too — with every member
turned at random and the wedge put back. Separation of the copies, its ratio to the members', and the
decision, per group.

With --orientation the orientation check's rule (`checks.orientation_groups`) is applied again to the
transfer matrices the finished runs stored (meta 'orientation_merge': turned copies and half-turn control,
per cluster), without the network or the data: for every pair of clusters that crosses by either bar, its
gains over the half-turn control, the half turns' exchange, the decision, and whether the two clusters are one molecule (their most
common true class, from the labels they had when the check ran). The spectral veto on a union
(`checks.split_decision`) and the nearest-cluster join of a cluster that keeps too few of its copies need
the data: with --with-data the set is simulated anew and `checks.orientation_decision` runs whole, then
the split check and the straggler step on the merged labels; else a stored run's own vetoes are listed.

  .venv/bin/python bench/bench_disca_split.py --orientation --runs bench/results/disca_issue21_n60_v3,bench/results/disca_issue21_n60_v3_seed1 --conditions snr0.1_w60,snr0.01_w40

With --views (a run made since `bench_disca.py` stores the kept iteration's network features) each kept
cluster's best two-Gaussian split (`checks.split_cluster`, BIC and separation reported, the separation bar
not applied) is measured on every view: spectral (the split check's), invariants
(`features.invariant_features`), network (the stored features) and joint — each of network and invariants
reduced by its own standardised PCA to --joint-dims dimensions, side by side (whitened by the split
test's own standardisation). Per cluster and view:
BIC's choice, separation D, sizes, the share of the members of the cluster's two most common true classes
on their own side, and the V-measure of the run's labels with that one cluster split.

  .venv/bin/python bench/bench_disca_split.py --views --runs bench/results/s31/iter40_seed0 --conditions snr0.01_w40 --joint-dims 4,6,8,12
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_disca  # noqa: E402
from cryopick_plugin.engine.disca import checks, em, mixtures  # noqa: E402


def resplit(runs, name, preset='cpu', with_tilt=False, n_per_class=200, box=32, seed=0):
    snr, tilt, n_cond, _ = bench_disca.CONDITIONS[name]
    record = json.load(open(os.path.join(runs, f'{name}.json')))[-1]
    saved = np.load(os.path.join(runs, f'{name}_labels.npz'))
    kept = saved['iteration_labels'][record['disca']['best_iteration']]
    truth = saved['truth']
    sim = bench_disca.simulate(n_cond or n_per_class, snr, tilt, box, seed)
    if not np.array_equal(sim.labels, truth):
        raise SystemExit(f'{name}: the simulated set does not match the saved run')
    options = dict(em.TRAINING[preset], wedge_tilt=float(tilt) if with_tilt else None)
    k = int(kept.max()) + 1
    best = {'labels': kept, 'k': k, 'state': {}, 'probabilities': np.eye(k)[kept]}
    k_max = mixtures.candidate_ks(len(kept), (2, 20), options['min_per_cluster'])[-1]
    after, tests = checks.split_mixed(best, sim.stack, options, k_max, seed, print)
    contingency = {f'cluster {c}': np.bincount(truth[after['labels'] == c], minlength=len(bench_disca.TEMPLATES))
                   .tolist() for c in range(after['k'])}
    return {'condition': name, 'runs': runs, 'kept_iteration': int(record['disca']['best_iteration']),
            'tilt_given': bool(with_tilt), 'before': mixtures.clustering_scores(truth, kept),
            'after': mixtures.clustering_scores(truth, after['labels']), 'tests': tests,
            'contingency_after': contingency}


def restraggle(runs, name, n_per_class, seed, box=32, preset='cpu'):
    """`checks.move_stragglers` on a finished run's final labels (the last step of a run, so what the run
    would have ended with): scores before and after, and what moved."""
    snr, tilt, _, _ = bench_disca.CONDITIONS[name]
    sim = bench_disca.simulate(n_per_class, snr, tilt, box, seed)
    final = np.load(os.path.join(runs, f'{name}_labels.npz'))['labels'].astype(int)
    k = int(final.max()) + 1
    best = {'labels': final, 'k': k, 'state': {}, 'probabilities': np.eye(k)[final]}
    moved, tests = checks.move_stragglers(best, sim.stack, dict(em.TRAINING[preset]), seed, print)
    return {'condition': name, 'seed': seed, 'n_per_class': n_per_class, 'runs': runs,
            'before': mixtures.clustering_scores(sim.labels, final),
            'after': mixtures.clustering_scores(sim.labels, moved['labels']), 'tests': tests,
            'moved': int(np.sum(moved['labels'] != final))}


def replay_with_data(runs, name, record, merge, checked, preset='cpu', box=32):
    """The run's orientation check with its spectral judges (`checks.orientation_decision`) on the stored
    matrices and the simulated set made anew, then the steps after it that need no network: the split
    check on the merged labels and the straggler step. When the split check accepts a split the run would
    refine (network needed): reported, not replayed."""
    snr, tilt, _, _ = bench_disca.CONDITIONS[name]
    sim = bench_disca.simulate(record['n_per_class'], snr, tilt, box, record['seed'])
    saved = np.load(os.path.join(runs, f'{name}_labels.npz'))
    if not np.array_equal(sim.labels, saved['truth']):
        raise SystemExit(f'{name}: the simulated set does not match the saved run')
    options = dict(em.TRAINING[preset], wedge_tilt=float(tilt))
    groups, vetoed, folded = checks.orientation_decision(np.array(merge['transfer']), np.array(merge['control']),
                                                 sim.stack, checked, options, record['seed'], print, min_k=2)
    merged = checks.group_index(groups)[checked]
    k = len(groups)
    best = {'labels': merged, 'k': k, 'state': {}, 'probabilities': np.eye(k)[merged]}
    k_max = mixtures.candidate_ks(len(merged), (2, 20), options['min_per_cluster'])[-1]
    after, tests = checks.split_mixed(best, sim.stack, options, k_max, record['seed'], print, rejected=folded)
    refine = any(t.get('accepted') for t in tests)
    if not refine:
        after, _ = checks.move_stragglers(after, sim.stack, options, record['seed'], print)
    return {'groups': groups, 'vetoed': vetoed, 'folded': [[len(p), len(q)] for p, q in folded], 'merged': mixtures.clustering_scores(sim.labels, merged),
            'split_accepted': refine,
            'final': None if refine else mixtures.clustering_scores(sim.labels, after['labels'])}


def replay_orientation(runs, name, with_data=False):
    """`checks.orientation_groups` on the transfer matrices a finished run stored; see the module doc."""
    path = os.path.join(runs, f'{name}.json')
    if not os.path.exists(path):
        return None
    record = json.load(open(path))[-1]
    merge = record['disca'].get('orientation_merge')
    if not merge:
        return {'runs': runs, 'condition': name, 'seed': record['seed'], 'note': 'no orientation check stored'}
    transfer, control = np.array(merge['transfer']), np.array(merge['control'])
    k = len(transfer)
    saved = np.load(os.path.join(runs, f'{name}_labels.npz'))
    truth = saved['truth']
    # the labels the check ran on: the run's final ones when it merged nothing and the straggler step moved
    # nobody out of a cluster's majority; else the kept iteration's when K matches
    candidates = [saved['labels']] + [saved['iteration_labels'][record['disca']['best_iteration']]]
    checked = next((c for c in candidates if int(c.max()) + 1 == k), None)
    dominant = None if checked is None else [int(np.bincount(truth[checked == c]).argmax()) for c in range(k)]
    gain = transfer - control
    pairs = []
    for a in range(k):
        for b in range(a + 1, k):
            exchange = float(control[a, b] + control[b, a])
            both = bool(gain[a, b] >= checks.ORIENTATION_MIN_SHARE and gain[b, a] >= checks.ORIENTATION_MIN_SHARE)
            if not (both or exchange >= 0.1):
                continue
            # the pair first, so that its decision reads as whether groups hold [0, 1]
            order = [a, b] + [c for c in range(k) if c not in (a, b)]
            groups = checks.orientation_groups(transfer[np.ix_(order, order)], control[np.ix_(order, order)],
                                               min_groups=1)
            pairs.append({'pair': [a, b], 'gains': [round(float(gain[a, b]), 3), round(float(gain[b, a]), 3)],
                          'exchange': round(exchange, 3), 'joined_by_rule': [0, 1] in groups,
                          'one_molecule': None if dominant is None else dominant[a] == dominant[b]})
    return {'runs': runs, 'condition': name, 'seed': record['seed'], 'k_before': k, 'stored_groups': merge['groups'],
            'groups_now': checks.orientation_groups(transfer, control, min_groups=2),   # bench_disca's --k-min
            'vetoed_in_run': merge.get('vetoed', []), 'pairs': pairs,
            'keep': [round(float(transfer[c, c]), 3) for c in range(k)],
            'with_data': replay_with_data(runs, name, record, merge, checked) if with_data and checked is not None
            else None}


def two_gaussian_side(features, options, seed):
    """Sides of the best two-Gaussian fit (as `checks.split_cluster` fits it), whatever BIC says."""
    from sklearn.decomposition import PCA
    x = np.asarray(features, dtype=np.float64)
    z = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-8)
    p = PCA(n_components=checks.SPLIT_DIM, random_state=seed).fit_transform(z)
    return mixtures._gmm(2, options, seed, 1e-4).fit(p).predict(p)


def truth_decisions(name, n_per_class, seed, box=32, preset='cpu', with_tilt=True, turned=False, view='spectral'):
    """`checks.split_decision` on each true class and on the union of every pair of true classes; view:
    the features the split is tested on, 'spectral' (the split check's) or 'invariants' (with the
    spherical-harmonic shell energies, `features.harmonic_features`)."""
    import itertools
    from cryopick_plugin.engine.disca import features
    snr, tilt, _, _ = bench_disca.CONDITIONS[name]
    sim = bench_disca.simulate(n_per_class, snr, tilt, box, seed)
    spectra = features.spectral_features(sim.stack)
    if view == 'invariants':
        spectra = np.concatenate([features.harmonic_features(sim.stack), spectra], axis=1)
    options = dict(em.TRAINING[preset], wedge_tilt=float(tilt) if with_tilt else None)
    rng = np.random.default_rng(seed + 7919)
    rows = []
    groups = [((c,), 'one molecule') for c in range(len(sim.class_names))]
    groups += [(pair, 'two molecules') for pair in itertools.combinations(range(len(sim.class_names)), 2)]
    for classes, kind in groups:
        members = np.flatnonzero(np.isin(sim.labels, classes))
        split, side, _, info = checks.split_decision(sim.stack, spectra, members, options, seed, rng)
        row = {'classes': [sim.class_names[c] for c in classes], 'kind': kind, 'split': bool(split),
               'right': bool(split) == (kind == 'two molecules'),
               **{k: info.get(k) for k in ('separation', 'crossing', 'sizes', 'reason')}}
        if side is not None:
            row['side_purity'] = float(max(np.mean(sim.labels[members][side == 0] == classes[0]),
                                           np.mean(sim.labels[members][side == 0] != classes[0])))
        if turned:
            sides = side if side is not None else two_gaussian_side(spectra[members], options, seed)
            _, row['turned'] = checks.survives_turning(sim.stack, (members[sides == 0], members[sides == 1]),
                                                       float(tilt), seed)
            # what the refinement would decide for a split the network never kept apart: one molecule
            # should fold back (not kept), two molecules should stay apart (kept)
            row['turned']['right'] = row['turned']['kept'] == (kind == 'two molecules')
        rows.append(row)
        print(name, seed, row, flush=True)
    return {'condition': name, 'seed': seed, 'n_per_class': n_per_class, 'tilt_given': with_tilt, 'view': view,
            'rows': rows, 'wrong': [r for r in rows if not r['right']]}


def split_views(runs, name, joint_dims=(8,), box=32):
    """The kept clusters of a finished run, each split on every view (see the module doc)."""
    from cryopick_plugin.engine.disca import features
    snr, tilt, n_cond, _ = bench_disca.CONDITIONS[name]
    record = json.load(open(os.path.join(runs, f'{name}.json')))[-1]
    saved = np.load(os.path.join(runs, f'{name}_labels.npz'))
    if 'features' not in saved.files:
        raise SystemExit(f'{runs}/{name}_labels.npz holds no network features (a run older than --views)')
    seed = int(record['seed'])
    best = int(record['disca']['best_iteration'])
    kept, truth = saved['iteration_labels'][best], saved['truth']
    sim = bench_disca.simulate(n_cond or record['n_per_class'], snr, tilt, box, seed)
    if not np.array_equal(sim.labels, truth):
        raise SystemExit(f'{name}: the simulated set does not match the saved run')
    network = saved['features'].astype(np.float64)
    invariants = features.invariant_features(sim.stack)
    options = dict(em.TRAINING['cpu'])

    def joint(members, dim):
        # split_cluster standardises every column over the members, so each view's PCA is whitened there
        return np.concatenate([features.standardised_pca(v[members], dim, seed) for v in (network, invariants)],
                              axis=1)

    views = {'spectral': lambda m: features.spectral_features(sim.stack[m]), 'invariants': lambda m: invariants[m],
             'network': lambda m: network[m]}
    views.update({f'joint{d}': (lambda m, d=d: joint(m, d)) for d in joint_dims})
    rows = []
    for c in range(int(kept.max()) + 1):
        members = np.flatnonzero(kept == c)
        composition = np.bincount(truth[members], minlength=len(sim.class_names))
        major = np.argsort(composition)[::-1][:2]
        for view_name, view in views.items():
            _, side, _, info = checks.split_cluster(view(members), options, seed, min_separation=0.0,
                                                    min_size=int(options['min_per_cluster']))
            row = {'cluster': c, 'members': int(len(members)), 'composition': composition.tolist(), 'view': view_name,
                   'bic': 'two' if info.get('bic_two', np.inf) < info.get('bic_one', -np.inf) else 'one',
                   'separation': info.get('separation'), 'sizes': info.get('sizes')}
            if side is not None:
                t = truth[members]
                pair = np.isin(t, major)
                right = np.mean((t[pair] == major[0]) == (side[pair] == 0))
                row['right_side'] = round(float(max(right, 1.0 - right)), 3)
                labels = kept.copy()
                labels[members[side == 1]] = kept.max() + 1
                row['v_measure_split'] = round(float(mixtures.clustering_scores(truth, labels)['v_measure']), 4)
            rows.append(row)
            print(name, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return {'condition': name, 'runs': runs, 'seed': seed, 'kept_iteration': best,
            'v_measure_kept': mixtures.clustering_scores(truth, kept)['v_measure'], 'rows': rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--runs', help='folder of a bench_disca.py run (<condition>.json and '
                                       '<condition>_labels.npz); with --orientation, comma-separated folders')
    parser.add_argument('--with-data', action='store_true',
                        help='with --orientation: simulate the set anew and replay the spectral judges too')
    parser.add_argument('--orientation', action='store_true',
                        help='with --runs: the orientation check\'s rule on the transfer matrices the runs stored')
    parser.add_argument('--truth', action='store_true',
                        help='apply the split rule to the true classes and pairs of a fresh simulation instead')
    parser.add_argument('--n-per-class', type=int, default=50, help='with --truth (50)')
    parser.add_argument('--seed', type=int, default=0, help='with --truth (0)')
    parser.add_argument('--conditions', required=True, help='comma-separated condition names')
    parser.add_argument('--stragglers', action='store_true',
                        help='with --runs: the straggler step (checks.move_stragglers) on each run\'s final labels')
    parser.add_argument('--turned', action='store_true',
                        help='with --truth: also the turning test of each group (checks.survives_turning)')
    parser.add_argument('--with-tilt', action='store_true',
                        help="give the condition's tilt range (turns on the orientation guard of each split)")
    parser.add_argument('--view', choices=('spectral', 'invariants'), default='spectral',
                        help="with --truth: the features the split is tested on (spectral: the split check's)")
    parser.add_argument('--views', action='store_true',
                        help="with --runs: each kept cluster's split on every view (needs the run's stored features)")
    parser.add_argument('--joint-dims', default='8', help='with --views: comma-separated PCA dimensions per view (8)')
    parser.add_argument('--out', default=None, help='where the results go (default: --runs)')
    args = parser.parse_args(argv)
    if args.views:
        if not args.runs:
            parser.error('--views needs --runs')
        out = args.out or args.runs
        os.makedirs(out, exist_ok=True)
        for name in args.conditions.split(','):
            result = split_views(args.runs, name, [int(d) for d in args.joint_dims.split(',')])
            path = os.path.join(out, f'{name}_views.json')
            with open(path + '.part', 'w') as fh:
                json.dump(result, fh, indent=1)
            os.replace(path + '.part', path)
        return 0
    if args.truth:
        out = args.out or 'bench/results/disca_truth'
        os.makedirs(out, exist_ok=True)
        for name in args.conditions.split(','):
            result = truth_decisions(name, args.n_per_class, args.seed, turned=args.turned, view=args.view)
            path = os.path.join(out, f"{name}_truth{'_turned' if args.turned else ''}"
                                     f"{'_' + args.view if args.view != 'spectral' else ''}_seed{args.seed}.json")
            with open(path + '.part', 'w') as fh:
                json.dump(result, fh, indent=1)
            os.replace(path + '.part', path)
            print(name, 'wrong decisions:', [(r['classes'], r['reason'] or 'split') for r in result['wrong']])
            if args.turned:
                print(name, 'turning test wrong:', [(r['classes'], r['turned']) for r in result['rows']
                                                    if not r['turned']['right']])
        return 0
    if not args.runs:
        parser.error('--runs is needed (or --truth)')
    if args.orientation:
        results = [r for runs in args.runs.split(',') for name in args.conditions.split(',')
                   for r in [replay_orientation(runs, name, args.with_data)] if r is not None]
        for r in results:
            print(os.path.basename(r['runs']), r['condition'], 'seed', r['seed'], r.get('note', ''),
                  *([f"K {r['k_before']}: stored {r['stored_groups']} -> now {r['groups_now']}"] if 'pairs' in r else []))
            for p in r.get('pairs', []):
                print('   ', p)
            if 'keep' in r:
                print('    share of its turned copies each cluster keeps:', r['keep'])
            if r.get('with_data'):
                print('    with the data:', r['with_data'])
            if r.get('vetoed_in_run'):
                print('    vetoed in the run:', r['vetoed_in_run'])
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, 'orientation_replay.json'), 'w') as fh:
                json.dump(results, fh, indent=1)
        return 0
    out = args.out or args.runs
    os.makedirs(out, exist_ok=True)
    if args.stragglers:
        for name in args.conditions.split(','):
            run = json.load(open(os.path.join(args.runs, f'{name}.json')))[-1]
            result = restraggle(args.runs, name, run['n_per_class'], run['seed'])
            path = os.path.join(out, f'{name}_stragglers.json')
            with open(path + '.part', 'w') as fh:
                json.dump(result, fh, indent=1)
            os.replace(path + '.part', path)
            print(name, result['moved'], 'moved', {k: {m: round(result[k][m], 3) for m in ('k', 'v_measure')}
                                                   for k in ('before', 'after')})
        return 0
    for name in args.conditions.split(','):
        result = resplit(args.runs, name, with_tilt=args.with_tilt)
        path = os.path.join(out, f"{name}_split{'_tilt' if args.with_tilt else ''}.json")
        with open(path + '.part', 'w') as fh:
            json.dump(result, fh, indent=1)
        os.replace(path + '.part', path)
        print(name, {k: {m: round(result[k][m], 3) for m in ('k', 'accuracy', 'homogeneity', 'completeness')}
                     for k in ('before', 'after')})
    return 0


if __name__ == '__main__':
    sys.exit(main())
