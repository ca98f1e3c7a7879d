"""DoG candidate picking: which score threshold to use when the user gives none (issue 20, item 7).

For each condition, two simulated tomograms (`simulate_tomogram`, 96×256×256 at 10 Å/voxel, seeds S and
S+1: validation and test) are picked with `dog.dog_pick` without a threshold (diameter: the median
particle diameter of the condition's classes, dark polarity, defaults otherwise), and the test picks are
scored at every threshold of a grid and at the threshold rules compared here:

- fixed thresholds (scores are robust noise standard deviations of the DoG map);
- 'auto': `dog.default_threshold`, the rule `cryopick dog-pick` applies when no --threshold is given;
- 'validation': `dog.choose_threshold` on the validation tomogram and its truth (`--validation`).

Scores: localisation F1 (`evaluate.evaluate_picks`, one-to-one matching) with each true particle's own
radius, D/4 (strict) and D/2 (full) of its class diameter.

Example (from the repository root; the tomograms are cached under --out):
  .venv/bin/python bench/bench_dog_threshold.py --threads 1
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cryopick_plugin.engine import evaluate  # noqa: E402
from cryopick_plugin.engine.disca import dog  # noqa: E402
from cryopick_plugin.engine.io import mrc, star  # noqa: E402
from cryopick_plugin.engine.sim.tomograms import simulate_tomogram  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIXED = ('4v4r', '3j9i', '4v94', '1bxn')
# name: (classes, n_per_class (None: the simulator's crowded default), distractors, beads, vesicles, SNR)
CONDITIONS = {
    'mixed_snr0.05': (MIXED, None, ('1qvr', '3cf3'), 8, 2, 0.05),
    'mixed_snr0.02': (MIXED, None, ('1qvr', '3cf3'), 8, 2, 0.02),
    'mixed_snr0.008': (MIXED, None, ('1qvr', '3cf3'), 8, 2, 0.008),
    'sparse_snr0.02': (MIXED, 8, (), 4, 1, 0.02),
    'very_sparse_snr0.02': (MIXED, 2, (), 4, 1, 0.02),
    'ribosome_snr0.02': (('4v4r',), None, ('3cf3',), 8, 2, 0.02),
    'rubisco_snr0.02': (('1bxn',), None, ('3cf3',), 8, 2, 0.02),
}
GRID = tuple(np.round(np.arange(0.0, 6.01, 0.25), 2))


def simulate(out, name, seed, spec, shape):
    classes, n_per_class, distractors, beads, vesicles, snr = spec
    tomo, truth_path, info_path = (os.path.join(out, f'{name}_{seed}{s}') for s in ('.mrc', '_truth.star', '.json'))
    if not all(os.path.exists(p) for p in (tomo, truth_path, info_path)):
        sim = simulate_tomogram(shape=shape, classes=classes, n_per_class=n_per_class, distractors=distractors,
                                n_beads=beads, n_vesicles=vesicles, snr=snr, seed=seed, name=f'{name}_{seed}')
        diam = {i + 1: float(sim.meta['diameters_vox'][n]) for i, n in enumerate(sim.class_names)}
        mrc.write_mrc(tomo, sim.volume, sim.voxel_size)
        star.write_coordinates(truth_path, sim.truth)
        with mrc.atomic_path(info_path) as tmp:
            json.dump({'diameters_vox': diam, 'placed': sim.meta['placed']}, open(tmp, 'w'), indent=1)
    info = json.load(open(info_path))
    return tomo, star.read_coordinates(truth_path), {int(c): d for c, d in info['diameters_vox'].items()}, info


def f1_at(picks, truth, radii, threshold):
    kept = picks[picks[star.SCORE] >= threshold]
    return evaluate.evaluate_picks(kept, truth, radii, with_classes=False)['localisation']


def run(args):
    rows = {}
    for name in args.conditions:
        spec = CONDITIONS[name]
        t0 = time.perf_counter()
        sets = [simulate(args.out, name, args.seed + k, spec, tuple(args.shape)) for k in (0, 1)]
        diam = sets[0][2]
        d_dog = float(np.median(list(diam.values())))
        picked = []
        for tomo, truth, _, _ in sets:
            volume, _, _ = mrc.open_checked(tomo)
            picked.append(dog.dog_pick(volume, d_dog, volume_name=os.path.splitext(os.path.basename(tomo))[0]))
        (val_picks, test_picks), (val_truth, test_truth) = picked, (sets[0][1], sets[1][1])
        strict = {c: d / 4 for c, d in diam.items()}
        full = {c: d / 2 for c, d in diam.items()}
        curve = {float(t): (round(f1_at(test_picks, test_truth, strict, t)['f1'], 3),
                            round(f1_at(test_picks, test_truth, full, t)['f1'], 3),
                            int((test_picks[star.SCORE] >= t).sum())) for t in GRID}
        t_val = dog.choose_threshold(val_picks, val_truth, d_dog / 4)
        t_auto = dog.default_threshold(test_picks[star.SCORE].to_numpy())
        best = max(curve, key=lambda t: curve[t][0])
        row = {'diameter': d_dog, 'n_true': int(len(test_truth)), 'n_candidates': int(len(test_picks)),
               'placed': sets[1][3]['placed'], 'curve_strict_full_npicks': curve,
               'best_fixed': {'threshold': best, 'strict': curve[best][0], 'full': curve[best][1]}}
        for rule, t in (('auto', t_auto), ('validation', t_val)):
            row[rule] = {'threshold': round(float(t), 3), 'n_picks': int((test_picks[star.SCORE] >= t).sum()),
                         'strict': round(f1_at(test_picks, test_truth, strict, t)['f1'], 3),
                         'full': round(f1_at(test_picks, test_truth, full, t)['f1'], 3)}
        row['seconds'] = round(time.perf_counter() - t0, 1)
        rows[name] = row
        print(name, json.dumps({k: row[k] for k in ('diameter', 'n_true', 'n_candidates', 'best_fixed', 'auto',
                                                      'validation', 'seconds')}), flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--conditions', nargs='+', default=list(CONDITIONS), choices=list(CONDITIONS))
    p.add_argument('--shape', type=int, nargs=3, default=(96, 256, 256))
    p.add_argument('--seed', type=int, default=201)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--out', default=os.path.join(ROOT, 'bench', 'results', 'dog_threshold'))
    args = p.parse_args(argv)
    from threadpoolctl import threadpool_limits
    threadpool_limits(args.threads)
    os.makedirs(args.out, exist_ok=True)
    rows = run(args)
    path = os.path.join(args.out, f'dog_threshold_seed{args.seed}.json')
    with mrc.atomic_path(path) as tmp:
        json.dump(rows, open(tmp, 'w'), indent=1)
    print('→', path)


if __name__ == '__main__':
    main()
