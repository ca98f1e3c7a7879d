"""Alignment refinement (`engine.disca.align`) of a finished DISCA run's clusters, scored on the truth.

Reads `<run>/<condition>_labels.npz` (written by `bench_disca.py`), simulates the same set again (same
condition, size and seed), refines the kept labels (or the true classes, `--start truth`, or a random
partition, `--start random K`) and records K and V-measure per iteration.

  .venv/bin/python bench/bench_disca_align.py --run bench/results/s31/seed1 --condition snr0.01_w40 --seed 1 --out bench/results/disca_align
"""
import argparse
import json
import os
import sys
import time

import numpy as np
from sklearn.metrics import homogeneity_completeness_v_measure

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_disca  # noqa: E402
from cryopick_plugin.engine.disca import align  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--run', help="a bench_disca.py output folder (its <condition>_labels.npz)")
    p.add_argument('--condition', default='snr0.01_w40')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--n-per-class', type=int, default=200)
    p.add_argument('--start', default='run', help="run | truth | random:K")
    p.add_argument('--box', type=int, default=16)
    p.add_argument('--rotations', type=int, default=2000)
    p.add_argument('--fixed', type=int, default=6)
    p.add_argument('--free', type=int, default=6)
    p.add_argument("--local-step", type=float, default=10.0)
    p.add_argument("--lowpass-start", type=float, default=0.25)
    p.add_argument('--anneal', type=float, default=1.0)
    p.add_argument('--top', type=int, default=1)
    p.add_argument('--true-orientations', action='store_true', help="start from the simulated orientations")
    p.add_argument('--split-tests', action='store_true', help="after refining, test every cluster for two molecules")
    p.add_argument('--split-start', default='random', help="random | features (the run's network features, 2-GMM)")
    p.add_argument('--split-ab-initio', type=int, default=0, help="fixed (annealed) iterations growing each side's reference afresh")
    p.add_argument('--pipeline', action='store_true', help="align.align_refine: references, split tests, classification")
    p.add_argument('--no-wedge', action='store_true')
    p.add_argument('--out', required=True)
    p.add_argument('--tag', default='')
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    snr, tilt = bench_disca.CONDITIONS[args.condition][:2]
    sim = bench_disca.simulate(args.n_per_class, snr, tilt, 32, args.seed)
    if args.start == 'run':
        saved = np.load(os.path.join(args.run, f'{args.condition}_labels.npz'))
        if not np.array_equal(saved['truth'], sim.labels):
            raise SystemExit("the run's truth does not match this simulation (condition, size or seed differ)")
        start = saved['labels']
    elif args.start == 'truth':
        start = sim.labels
    elif args.start.startswith('merge:'):
        a, b = (int(v) for v in args.start.split(':')[1].split(','))
        start = np.where(sim.labels == b, a, sim.labels)
    else:
        k = int(args.start.split(':')[1])
        start = np.random.default_rng(args.seed).integers(0, k, len(sim.labels))
    h, c, v = homogeneity_completeness_v_measure(sim.labels, start)
    print(f"start: K {len(np.unique(start))}, V {v:.4f}", flush=True)
    t0 = time.time()
    data = align.prepare(sim.stack, args.box)
    if args.pipeline:
        feats = saved['features'] if args.start == 'run' and 'features' in saved.files else None
        cache = os.path.join(args.out, f"{args.condition}_seed{args.seed}_{args.start.replace(':', '').replace(',', '')}_base_f{args.fixed}.npz")
        base = None
        if os.path.exists(cache):
            c = np.load(cache)
            base = {'references': c['references'], 'orientations': c['orientations'], 'tau2': float(c['tau2'])}
            print('references from', cache, flush=True)
        else:
            base = align.refine(data, start, tilt_range=None if args.no_wedge else tilt, n_rotations=args.rotations,
                                fixed_iterations=args.fixed, free_iterations=0, anneal=10.0, top=5, lowpass_start=0.5,
                                seed=args.seed, truth=sim.labels, say=lambda r: print(json.dumps(r), flush=True))
            np.savez_compressed(cache, references=base['references'], orientations=base['orientations'], tau2=base['tau2'])
        res = align.align_refine(data, start, features=feats, tilt_range=None if args.no_wedge else tilt,
                                 n_rotations=args.rotations, fixed_iterations=args.fixed, free_iterations=args.free,
                                 seed=args.seed, truth=sim.labels, say=lambda r: print(json.dumps(r), flush=True),
                                 base=base)
        out = {'condition': args.condition, 'seed': args.seed, 'start': args.start, 'tests': res['tests'],
               'seconds': round(time.time() - t0, 1)}
        for key in ('split_labels', 'labels'):
            h, c, v = homogeneity_completeness_v_measure(sim.labels, res[key])
            out[key] = {'k': int(len(np.unique(res[key]))), 'homogeneity': round(h, 4), 'completeness': round(c, 4),
                        'v_measure': round(v, 4)}
        print(json.dumps({k: out[k] for k in ('split_labels', 'labels', 'seconds')}), flush=True)
        name = f"{args.condition}_seed{args.seed}_{args.start.replace(':', '').replace(',', '')}{args.tag}_pipeline"
        with open(os.path.join(args.out, name + '.json'), 'w') as fh:
            json.dump(out, fh, indent=1)
        np.savez_compressed(os.path.join(args.out, name + '.npz'), labels=res['labels'], truth=sim.labels,
                            split_labels=res['split_labels'])
        return
    res = align.refine(data, start, tilt_range=None if args.no_wedge else tilt, n_rotations=args.rotations,
                       fixed_iterations=args.fixed, free_iterations=args.free, seed=args.seed,
                       start_eulers=sim.eulers if args.true_orientations else None,
                       local_step=args.local_step, anneal=args.anneal, top=args.top, lowpass_start=args.lowpass_start,
                       truth=sim.labels, say=lambda r: print(json.dumps(r), flush=True))
    h, c, v = homogeneity_completeness_v_measure(sim.labels, res['labels'])
    out = {'condition': args.condition, 'seed': args.seed, 'start': args.start, 'box': args.box,
           'rotations': args.rotations, 'wedge': not args.no_wedge,
           'start_v': round(float(homogeneity_completeness_v_measure(sim.labels, start)[2]), 4),
           'final': {'k': int(len(np.unique(res['labels']))), 'homogeneity': round(h, 4),
                     'completeness': round(c, 4), 'v_measure': round(v, 4)},
           'history': res['history'], 'seconds': round(time.time() - t0, 1)}
    print(json.dumps(out['final']), f"{out['seconds']} s", flush=True)
    name = f"{args.condition}_seed{args.seed}_{args.start.replace(':', '').replace(',', '')}{args.tag}"
    if args.split_tests:
        tests = []
        ks = np.unique(res['labels'])
        for j, k in enumerate(ks):
            members = np.flatnonzero(res['labels'] == k)
            t1 = time.time()
            start_sides = None
            if args.split_start == 'features':
                from sklearn.mixture import GaussianMixture
                from cryopick_plugin.engine.disca.features import standardised_pca
                z = standardised_pca(saved['features'][members], 6, seed=args.seed)
                start_sides = GaussianMixture(2, random_state=args.seed, n_init=3).fit_predict(z)
            t = align.split_test(data, members, res['orientations'][:, j], tilt_range=None if args.no_wedge else tilt,
                                 n_rotations=args.rotations, tau2=res['tau2'], seed=args.seed,
                                 start_sides=start_sides, ab_initio_iterations=args.split_ab_initio)
            held_truth = sim.labels[t['second_half']]
            side = t['delta'] > np.median(t['delta'])
            row = {'cluster': int(k), 'size': int(len(members)),
                   'truth': np.bincount(sim.labels[members], minlength=5).tolist(),
                   'bic_two_better': t['bic_two_better'], 'separation': round(t['separation'], 3),
                   'weights': t['weights'], 'means': t['means'], 'first_half_sizes': t['first_half_sizes'],
                   'delta_by_true_class': {int(c): round(float(np.mean(t['delta'][held_truth == c])), 2)
                                           for c in np.unique(held_truth)},
                   'seconds': round(time.time() - t1, 1)}
            print(json.dumps(row), flush=True)
            tests.append(row)
        out['split_tests'] = tests
    with open(os.path.join(args.out, name + '.json'), 'w') as fh:
        json.dump(out, fh, indent=1)
    np.savez_compressed(os.path.join(args.out, name + '.npz'), labels=res['labels'], truth=sim.labels,
                        gamma=res['gamma'], references=res['references'], orientations=res['orientations'],
                        tau2=res['tau2'])


if __name__ == '__main__':
    main()
