"""DISCA's start, scored: the first labels of the EM loop from each rotation-invariant view of the data.

The 'cpu' preset's EM loop begins with a Gaussian mixture (BIC over K, `mixtures.fit_mixtures`, the same
call and options as `em.disca_cluster`'s first iteration) on rotation-invariant features instead of an
untrained network's; the network then learns from those labels. This bench computes that start on the
simulated sets of `bench_disca.py` (same condition, size and seed — `bench_disca.simulate`) for each start
option and scores it against the true classes, without training anything:

  spectral    `features.spectral_embedding` at the loop's PCA dimension (option `init` 'spectral')
  invariants  `features.invariant_embedding`: spherical-harmonic shell energies and the spectral
              features, at `--invariant-dims` dimensions (option `init` 'invariants', `init_dim`)

and, as the ceiling of each view, a logistic regression on the standardised features trained on the true
classes and scored by 5-fold cross-validation. One line and one JSON record per condition and seed.

  .venv/bin/python bench/bench_disca_start.py --out bench/results/disca_start --conditions snr0.1_w60,snr0.01_w40 --seeds 0,1
"""
import argparse
import json
import os
import sys
import time

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, v_measure_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_disca  # noqa: E402
from cryopick_plugin.engine.disca import em, features, mixtures, yopo  # noqa: E402


def loop_pca_dim(n, k_range, opts, arch):
    """The PCA dimension `em.disca_cluster` uses for N subtomograms (the spectral start's too)."""
    ks = mixtures.candidate_ks(n, k_range, opts['min_per_cluster'])
    return ks, int(max(2, min(opts['pca_dim'], arch['feature_dim'], n // ks[-1] - 1, n - 1, mixtures.bic_dim(n))))


def start_scores(x, truth, ks, opts, seed):
    labels, _, _, bics = mixtures.fit_mixtures(x, ks, opts, seed)
    scores = mixtures.clustering_scores(truth, labels)
    return {'k': int(labels.max()) + 1, 'v_measure': scores['v_measure'], 'homogeneity': scores['homogeneity'],
            'completeness': scores['completeness'], 'sizes': np.bincount(labels).tolist(),
            'bic_by_k': {str(k): float(v) for k, v in bics.items()}}


def supervised(x, truth, seed):
    z = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-8)
    predicted = cross_val_predict(LogisticRegression(max_iter=3000, C=0.1), z, truth,
                                  cv=StratifiedKFold(5, shuffle=True, random_state=seed))
    return {'accuracy': float(accuracy_score(truth, predicted)), 'v_measure': float(v_measure_score(truth, predicted))}


def run(name, seed, args):
    snr, tilt, n_cond, _ = bench_disca.CONDITIONS[name]
    sim = bench_disca.simulate(n_cond or args.n_per_class, snr, tilt, args.box, seed)
    truth = sim.labels
    opts = dict(em.TRAINING['cpu'])
    ks, pca_dim = loop_pca_dim(len(sim.stack), (args.k_min, args.k_max), opts, yopo.make_arch('cpu'))
    record = {'condition': name, 'seed': seed, 'n': len(sim.stack), 'snr': snr, 'tilt_range': tilt,
              'date': time.strftime('%Y-%m-%d %H:%M')}
    t0 = time.time()
    spectral = features.spectral_features(sim.stack)
    record['spectral'] = dict(start_scores(features.spectral_embedding(sim.stack, pca_dim, seed), truth, ks, opts,
                                           seed), dim=pca_dim, supervised=supervised(spectral, truth, seed),
                              features_s=time.time() - t0)
    t0 = time.time()
    invariants = features.invariant_features(sim.stack)
    features_s = time.time() - t0
    record['invariants'] = {'supervised': supervised(invariants, truth, seed), 'features_s': features_s}
    for dim in args.invariant_dims:
        record['invariants'][f'dim{dim}'] = dict(
            start_scores(features.invariant_embedding(sim.stack, dim, seed), truth, ks, opts, seed), dim=dim)
    line = [f"{name} seed {seed}: spectral (dim {pca_dim}) K {record['spectral']['k']} "
            f"V {record['spectral']['v_measure']:.3f}"]
    line += [f"invariants dim {d} K {record['invariants'][f'dim{d}']['k']} "
             f"V {record['invariants'][f'dim{d}']['v_measure']:.3f}" for d in args.invariant_dims]
    line.append(f"supervised V spectral {record['spectral']['supervised']['v_measure']:.3f}, "
                f"invariants {record['invariants']['supervised']['v_measure']:.3f}")
    print(' | '.join(line), flush=True)
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', required=True, help='folder of the JSON results (start.json)')
    parser.add_argument('--conditions', required=True, help='comma-separated condition names of bench_disca.py')
    parser.add_argument('--seeds', default='0', help='comma-separated simulation seeds (0)')
    parser.add_argument('--n-per-class', type=int, default=200, help='subtomograms per molecule (200)')
    parser.add_argument('--box', type=int, default=32)
    parser.add_argument('--k-min', type=int, default=2)
    parser.add_argument('--k-max', type=int, default=20)
    parser.add_argument('--invariant-dims', default=str(features.INVARIANT_DIM),
                        help=f'comma-separated PCA dimensions of the invariants start ({features.INVARIANT_DIM})')
    args = parser.parse_args(argv)
    args.invariant_dims = [int(d) for d in args.invariant_dims.split(',')]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, 'start.json')
    records = json.load(open(path)) if os.path.exists(path) else []
    for name in args.conditions.split(','):
        for seed in (int(s) for s in args.seeds.split(',')):
            records = [r for r in records if (r['condition'], r['seed']) != (name, seed)] + [run(name, seed, args)]
            with open(path, 'w') as fh:
                json.dump(records, fh, indent=1)


if __name__ == '__main__':
    main()
