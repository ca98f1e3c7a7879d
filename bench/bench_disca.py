"""Benchmark of DISCA clustering on simulated subtomograms of real macromolecules.

Each condition is one run: 5 templates (4v4r, 3j9i, 4v94, 4cr2, 1qvr from shared/data/templates_10A),
`--n-per-class` copies each, simulated by `engine.simulate_subtomo.simulate_subtomograms` (the realistic
model: random RELION orientations, |CTF| of a phase-flipped tomogram at 4 µm underfocus, missing wedge about
the Y axis at ±θ applied to signal and noise, dark contrast, SNR = var(filtered signal) / var(filtered
noise) over the box, as issue 4 defines it; templates binned together until the largest fits the box).
It compares:

  disca      `disca_cluster` with the chosen preset (K estimated by BIC over --k-min..--k-max)
  raw        PCA + Gaussian mixtures with BIC on the voxels (non-deep baseline)
  spectral   the same on rotation-invariant features (radial power spectrum + radial profile)

and records estimated K, accuracy (Hungarian), homogeneity, completeness, V-measure and time per
iteration. Timing conditions (time_1k, time_2k, time_5k) run two DISCA iterations on N subtomograms.

Resumable: every finished condition is appended to <out>/<condition>.json and skipped next time (delete the
file to rerun it). Run one condition at a time, e.g.

  .venv/bin/python bench/bench_disca.py --out bench/results_disca --conditions snr0.1_w60
  .venv/bin/python bench/bench_disca.py --out /tmp/disca_smoke --conditions smoke
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cryopick_plugin.engine import disca  # noqa: E402
from cryopick_plugin.engine.simulate_subtomo import simulate_subtomograms  # noqa: E402

TEMPLATES = ['4v4r', '3j9i', '4v94', '4cr2', '1qvr']

# name: (SNR, tilt range in degrees or None for no wedge, N per class or None for --n-per-class, kind)
CONDITIONS = {
    'snr0.1_w60': (0.1, 60, None, 'cluster'),
    'snr0.03_w60': (0.03, 60, None, 'cluster'),
    'snr0.01_w60': (0.01, 60, None, 'cluster'),
    'snr0.03_w40': (0.03, 40, None, 'cluster'),
    'time_1k': (0.1, 60, 200, 'time'),
    'time_2k': (0.1, 60, 400, 'time'),
    'time_5k': (0.1, 60, 1000, 'time'),
    'smoke': (0.1, 60, 12, 'cluster'),
}


def simulate(n_per_class, snr, tilt, box, seed):
    """(stack, truth labels 0..4, simulator meta) from the realistic subtomogram simulator."""
    sim = simulate_subtomograms(classes=tuple(TEMPLATES), n_per_class=n_per_class, box=box, snr=snr,
                                tilt_range=tilt or 90.0, seed=seed)
    return sim.stack, sim.labels, sim.meta


def run_condition(name, args):
    snr, tilt, n_cond, kind = CONDITIONS[name]
    n_per_class = n_cond or args.n_per_class
    t0 = time.time()
    stack, truth, meta = simulate(n_per_class, snr, tilt, args.box, args.seed)
    record = {'condition': name, 'snr': snr, 'tilt_range': tilt, 'n_per_class': n_per_class,
              'n': len(stack), 'box': args.box, 'templates': TEMPLATES, 'preset': args.preset,
              'seed': args.seed, 'simulation_s': time.time() - t0, 'simulator': 'simulate_subtomograms',
              'simulated_voxel_size': meta['voxel_size'], 'binning': meta['binning'],
              'defocus_um': meta['defocus_um'], 'threads': args.threads, 'date': time.strftime('%Y-%m-%d %H:%M'),
              'disca_options': {k: disca.TRAINING[args.preset].get(k) for k in ('init', 'min_iter', 'lr')}}
    k_range = (args.k_min, args.k_max)
    if kind == 'time':
        result = disca.disca_cluster(stack, preset=args.preset, k_range=k_range, max_iter=2, seed=args.seed,
                                     device=args.device, log=print)
        record['time_per_iteration_s'] = result.history[0]['time_s']  # features + GMMs + one training epoch
        record['history'] = result.history
        return record
    t0, c0 = time.time(), time.process_time()
    result = disca.disca_cluster(stack, preset=args.preset, k_range=k_range, max_iter=args.max_iter,
                                 seed=args.seed, device=args.device, log=print)
    record['disca'] = dict(disca.clustering_scores(truth, result.labels), time_s=time.time() - t0,
                           cpu_s=time.process_time() - c0, iterations=len(result.history),
                           best_iteration=result.best_iteration,
                           time_per_iteration_s=float(np.mean([h['time_s'] for h in result.history])),
                           per_iteration=[dict(disca.clustering_scores(truth, lab), ddbi=h['ddbi'])
                                          for lab, h in zip(result.iteration_labels, result.history)])
    for features in ('raw', 'spectral'):
        t0, c0 = time.time(), time.process_time()
        labels, _ = disca.baseline_cluster(stack, k_range, seed=args.seed, features=features)
        record[features] = dict(disca.clustering_scores(truth, labels), time_s=time.time() - t0,
                                cpu_s=time.process_time() - c0)
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', required=True, help='folder of per-condition JSON results')
    parser.add_argument('--conditions', default=','.join(c for c in CONDITIONS if c != 'smoke'),
                        help=f"comma-separated, from {', '.join(CONDITIONS)}")
    parser.add_argument('--n-per-class', type=int, default=200)
    parser.add_argument('--box', type=int, default=32)
    parser.add_argument('--preset', default='cpu', choices=['cpu', 'paper'])
    parser.add_argument('--k-min', type=int, default=2)
    parser.add_argument('--k-max', type=int, default=20)
    parser.add_argument('--max-iter', type=int, default=None)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--device', default='auto')
    parser.add_argument('--threads', type=int, default=None, help='torch threads (the machine is shared)')
    args = parser.parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    for name in args.conditions.split(','):
        if name not in CONDITIONS:
            parser.error(f'unknown condition {name}')
        path = os.path.join(args.out, f'{name}.json')
        done = json.load(open(path)) if os.path.exists(path) else []
        if any(r.get('preset') == args.preset and r.get('seed') == args.seed for r in done):
            print(f'{name}: done already ({path})')
            continue
        record = run_condition(name, args)
        done.append(record)
        with open(path + '.part', 'w') as fh:
            json.dump(done, fh, indent=1)
        os.replace(path + '.part', path)
        summary = {k: record[k] for k in ('disca', 'raw', 'spectral') if k in record}
        print(name, json.dumps({k: {m: v[m] for m in ('k', 'accuracy', 'homogeneity', 'completeness')}
                                for k, v in summary.items()}) if summary else record.get('time_per_iteration_s'))
    return 0


if __name__ == '__main__':
    sys.exit(main())
