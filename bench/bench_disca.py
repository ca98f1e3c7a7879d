"""Benchmark of DISCA clustering on simulated subtomograms of real macromolecules.

Each condition is one run: 5 templates (4v4r, 3j9i, 4v94, 4cr2, 1qvr from shared/data/templates_10A),
`--n-per-class` copies each at uniformly random orientations with a small random shift, white noise at
the given SNR (signal variance / noise variance inside the box) and a missing wedge (tilt axis y, beam
along z, tilt range ±θ) applied to the noisy subtomogram. It compares:

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
from cryopick_plugin.engine.geometry import rotate_volume  # noqa: E402
from cryopick_plugin.engine.mrc import open_volume  # noqa: E402
from cryopick_plugin.engine.settings import default_templates_dir  # noqa: E402

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


def load_templates(box, folder=None):
    """Each template centred on its centre of mass and cropped / padded to box³ (10 Å voxels)."""
    from scipy.ndimage import center_of_mass, shift
    folder = folder or default_templates_dir()
    refs = []
    for name in TEMPLATES:
        vol, _ = open_volume(os.path.join(folder, f'{name}.mrc'))
        vol = np.clip(np.asarray(vol, dtype=np.float32), 0, None)
        centre = np.array(center_of_mass(vol))
        vol = shift(vol, (np.array(vol.shape) - 1) / 2.0 - centre, order=1)
        out = np.zeros((box,) * 3, np.float32)
        src = [slice(max(0, (s - box) // 2), max(0, (s - box) // 2) + min(s, box)) for s in vol.shape]
        dst = [slice(max(0, (box - s) // 2), max(0, (box - s) // 2) + min(s, box)) for s in vol.shape]
        out[tuple(dst)] = vol[tuple(src)]
        refs.append(out)
    return refs


def wedge_mask(box, tilt):
    """Fourier mask (fftn layout) of a tilt series about y with range ±tilt; beam along z."""
    f = np.fft.fftfreq(box)
    kz, _, kx = np.meshgrid(f, f, f, indexing='ij')
    return np.abs(kz) <= np.abs(kx) * np.tan(np.radians(tilt)) + 1e-9


def simulate(refs, n_per_class, snr, tilt, seed, max_shift=2):
    """(stack, truth): rotated, shifted copies + noise at `snr`, then the missing wedge."""
    from scipy.spatial.transform import Rotation
    from scipy.ndimage import shift as nd_shift
    rng = np.random.default_rng(seed)
    box = refs[0].shape[0]
    signal_var = np.mean([r.var() for r in refs])
    mask = wedge_mask(box, tilt) if tilt else None
    stack = np.empty((len(refs) * n_per_class, box, box, box), np.float32)
    truth = np.repeat(np.arange(len(refs)), n_per_class)
    i = 0
    for ref in refs:
        for m in Rotation.random(n_per_class, random_state=rng).as_matrix():
            v = rotate_volume(ref, m, order=1)
            v = nd_shift(v, rng.uniform(-max_shift, max_shift, 3), order=1)
            v = v + rng.normal(0, np.sqrt(signal_var / snr), v.shape)
            if mask is not None:
                v = np.fft.ifftn(np.fft.fftn(v) * mask).real
            stack[i] = v
            i += 1
    order = rng.permutation(len(stack))
    return stack[order], truth[order]


def run_condition(name, args):
    snr, tilt, n_cond, kind = CONDITIONS[name]
    n_per_class = n_cond or args.n_per_class
    refs = load_templates(args.box)
    t0 = time.time()
    stack, truth = simulate(refs, n_per_class, snr, tilt, args.seed)
    record = {'condition': name, 'snr': snr, 'tilt_range': tilt, 'n_per_class': n_per_class,
              'n': len(stack), 'box': args.box, 'templates': TEMPLATES, 'preset': args.preset,
              'seed': args.seed, 'simulation_s': time.time() - t0}
    k_range = (args.k_min, args.k_max)
    if kind == 'time':
        result = disca.disca_cluster(stack, preset=args.preset, k_range=k_range, max_iter=2, seed=args.seed,
                                     device=args.device, log=print)
        record['time_per_iteration_s'] = result.history[0]['time_s']  # features + GMMs + one training epoch
        record['history'] = result.history
        return record
    t0 = time.time()
    result = disca.disca_cluster(stack, preset=args.preset, k_range=k_range, max_iter=args.max_iter,
                                 seed=args.seed, device=args.device, log=print)
    record['disca'] = dict(disca.clustering_scores(truth, result.labels), time_s=time.time() - t0,
                           best_iteration=result.best_iteration,
                           time_per_iteration_s=float(np.mean([h['time_s'] for h in result.history])),
                           per_iteration=[dict(disca.clustering_scores(truth, lab), ddbi=h['ddbi'])
                                          for lab, h in zip(result.iteration_labels, result.history)])
    for features in ('raw', 'spectral'):
        t0 = time.time()
        labels, _ = disca.baseline_cluster(stack, k_range, seed=args.seed, features=features)
        record[features] = dict(disca.clustering_scores(truth, labels), time_s=time.time() - t0)
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
    args = parser.parse_args(argv)
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
