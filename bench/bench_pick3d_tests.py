"""More test tomograms for the 3D picking benchmark: how much of a per-class F1 is the draw of one test
tomogram. `--dog` adds the benchmark's DoG baseline (localisation only).

`bench_pick3d_f1.py` tests each model on one tomogram (seed 104, 283 particles; rubisco 160), so a
difference of a few particles moves a class's F1 by several hundredths. This script simulates further test
tomograms with the same recipe (`bench_pick3d_f1.simulate_set`'s parameters: same shape, classes,
distractors, beads, vesicles and SNR; seeds 105, 106, ...), picks them with saved models — thresholds as
stored in the model (tuned on validation tomogram 103), no retuning on test data — and reports per
tomogram and pooled (counts summed over the tomograms before the F1) the strict D/4 figures of
`bench_pick3d_f1.score_picks`. Before simulating, seed 104 is simulated again and compared with the stored
test tomogram, so the new tomograms are known to follow the benchmark's recipe.

  .venv/bin/python bench/bench_pick3d_tests.py --snr 0.02 --n-extra 4 \\
      snr0.02_96x256x256_bf16b4hard120/deepet_cpu_retuned.pt snr0.02_96x256x256_w12p40/deepet_cpu.pt

Tomograms go to <results>/tests_snr<snr>_<shape>/ (reused); the result JSON to
<results>/pick3d_tests_snr<snr>.json.
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_pick3d_f1 as f1  # noqa: E402
from cryopick_plugin.engine.disca import dog  # noqa: E402
from cryopick_plugin.engine import evaluate
from cryopick_plugin.engine.io import mrc, star
from cryopick_plugin.engine.pick3d import picking as pick3d
from cryopick_plugin.engine.sim.tomograms import simulate_tomogram  # noqa: E402


def simulate(folder, seed, shape, snr, n_distractor, n_beads, n_vesicles):
    """(tomogram path, truth table) of seed `seed`, simulated once into `folder` with the benchmark's recipe."""
    tomo = os.path.join(folder, f'sim{seed}.mrc')
    truth = os.path.join(folder, f'sim{seed}_truth.star')
    if not (os.path.exists(tomo) and os.path.exists(truth)):
        sim = simulate_tomogram(shape=tuple(shape), classes=f1.CLASSES, distractors=f1.DISTRACTORS,
                                n_per_distractor={d: n_distractor for d in f1.DISTRACTORS}, n_beads=n_beads,
                                n_vesicles=n_vesicles, snr=snr, seed=seed, name=f'sim{seed}')
        # the truth last, each file renamed into place whole: an interrupted run is simulated again
        with mrc.atomic_path(tomo, '.mrc') as tmp:
            mrc.write_mrc(tmp, sim.volume, sim.voxel_size)
        with mrc.atomic_path(truth, '.star') as tmp:
            star.write_coordinates(tmp, sim.truth)
    return tomo, star.read_coordinates(truth)


def check_recipe(run_dir, folder, args):
    """Simulate seed 104 again and compare it with the run's stored test tomogram."""
    stored, _ = mrc.open_volume(os.path.join(run_dir, 'sim104.mrc'))
    again, _ = simulate(folder, 104, stored.shape, args.snr, args.distractors, args.beads, args.vesicles)
    again, _ = mrc.open_volume(again)
    diff = float(np.max(np.abs(np.asarray(again, np.float32) - np.asarray(stored, np.float32))))
    scale = float(np.std(np.asarray(stored, np.float32)))
    if diff > 1e-3 * scale:
        raise SystemExit(f'{run_dir}: seed 104 simulated again differs from sim104.mrc (max |diff| {diff:.3g}, '
                         f'std {scale:.3g}) — check --snr / --distractors / --beads / --vesicles')
    return list(stored.shape)


def pooled(records):
    """F1 / precision / recall of counts summed over tomograms."""
    tp = sum(r['tp'] for r in records)
    n_pred = sum(r['n_pred'] for r in records)
    n_true = sum(r['n_true'] for r in records)
    m = evaluate.counts_to_metrics(tp, n_pred, n_true)
    return {k: round(float(m[k]), 4) for k in ('precision', 'recall', 'f1')} | {'tp': tp, 'n_pred': n_pred,
                                                                                'n_true': n_true}


def evaluate_model(model, tests, diam, work, padding='zero', device='cpu'):
    per_tomo = {}
    for seed, (tomo, truth) in tests.items():
        picks = pick3d.pick(tomo, model, device=device, tomo_name=f'sim{seed}', work_dir=work,
                             padding=padding)
        sc = f1.score_picks(picks, truth, diam, 0.25)
        rec = {f1.NAMES[f1.CLASSES[c - 1]]: v for c, v in sc['per_class'].items()}
        rec['classification'] = sc['classification']
        rec['localisation'] = sc['localisation']
        per_tomo[seed] = {k: {m: v[m] for m in ('tp', 'n_pred', 'n_true', 'precision', 'recall', 'f1')}
                          for k, v in rec.items()}
        print(os.path.basename(os.path.dirname(model)), seed,
              {k: round(v['f1'], 3) for k, v in per_tomo[seed].items()}, flush=True)
    keys = list(next(iter(per_tomo.values())))
    summary = {}
    for k in keys:
        f1s = [per_tomo[s][k]['f1'] for s in per_tomo]
        summary[k] = {'pooled': pooled([per_tomo[s][k] for s in per_tomo]),
                      'per_tomogram_f1': [round(float(x), 4) for x in f1s],
                      'min': round(float(np.min(f1s)), 4), 'max': round(float(np.max(f1s)), 4),
                      'sd': round(float(np.std(f1s, ddof=1)), 4) if len(f1s) > 1 else 0.0}
    return {'per_tomogram': per_tomo, 'summary': summary}


def dog_baseline(run_dir, tests, diam):
    """The benchmark's DoG baseline on every test tomogram: median class diameter, dark polarity, threshold
    chosen on validation tomogram sim103 (as `bench_pick3d_f1.run_condition`); localisation figures only."""
    d_dog = float(np.median(list(diam.values())))
    v_val, _ = mrc.open_volume(os.path.join(run_dir, 'sim103.mrc'))
    val_truth = star.read_coordinates(os.path.join(run_dir, 'sim103_truth.star'))
    thr = dog.choose_threshold(dog.dog_pick(v_val, d_dog, volume_name='sim103'), val_truth, 0.25 * d_dog)
    per_tomo = {}
    for seed, (tomo, truth) in tests.items():
        v, _ = mrc.open_volume(tomo)
        picks = dog.dog_pick(v, d_dog, threshold=thr, volume_name=f'sim{seed}').assign(**{star.CLASS: 0})
        per_tomo[seed] = {name: {m: f1.score_picks(picks, truth, diam, factor)['localisation'][m]
                                 for m in ('tp', 'n_pred', 'n_true', 'precision', 'recall', 'f1')}
                          for name, factor in (('localisation', 0.25), ('localisation_full_D/2', 0.5))}
    summary = {k: pooled([per_tomo[s][k] for s in per_tomo]) for k in ('localisation', 'localisation_full_D/2')}
    print('DoG pooled', {k: v['f1'] for k, v in summary.items()}, flush=True)
    return {'diameter_vox': d_dog, 'threshold_from_validation': float(thr), 'per_tomogram': per_tomo,
            'summary': summary}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('models', nargs='+', help='model files under --results (<condition>/<model>.pt)')
    p.add_argument('--snr', type=float, required=True, help='projection SNR of the conditions the models come from')
    p.add_argument('--n-extra', type=int, default=4, help='test tomograms besides sim104 (seeds 105, 106, ...)')
    p.add_argument('--distractors', type=int, default=15)
    p.add_argument('--beads', type=int, default=8)
    p.add_argument('--vesicles', type=int, default=2)
    p.add_argument('--padding', default='zero', choices=pick3d.PADDINGS,
                   help="overlap-tile padding at the tomogram's faces for every model (pick3d.pick)")
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--device', default='cpu', help="torch device for picking ('cpu', 'cuda', 'auto')")
    p.add_argument('--results', default=os.path.join(f1.ROOT, 'bench', 'results'))
    p.add_argument('--dog', action='store_true', help="also the DoG baseline (threshold from validation tomogram sim103)")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    run0 = os.path.join(args.results, os.path.dirname(args.models[0]))
    info = json.load(open(os.path.join(run0, 'simulation.json')))
    diam = {int(c): float(v) for c, v in info['sim101']['diameters_vox'].items()}
    shape = list(mrc.open_volume(os.path.join(run0, 'sim104.mrc'))[0].shape)
    folder = os.path.join(args.results, f"tests_snr{args.snr:g}_{'x'.join(map(str, shape))}")
    os.makedirs(folder, exist_ok=True)
    check_recipe(run0, folder, args)
    tests = {104: (os.path.join(run0, 'sim104.mrc'), star.read_coordinates(os.path.join(run0, 'sim104_truth.star')))}
    for seed in range(105, 105 + args.n_extra):
        tests[seed] = simulate(folder, seed, shape, args.snr, args.distractors, args.beads, args.vesicles)
    result = {'snr': args.snr, 'padding': args.padding, 'shape_zyx': shape, 'seeds': list(tests), 'radius': 'strict D/4', 'models': {}}
    with tempfile.TemporaryDirectory() as work:
        for model in args.models:
            result['models'][model] = evaluate_model(os.path.join(args.results, model), tests, diam, work,
                                                      args.padding, args.device)
            s = result['models'][model]['summary']
            print(model, 'pooled F1', {k: v['pooled']['f1'] for k, v in s.items()},
                  'per-tomogram range', {k: (v['min'], v['max']) for k, v in s.items()}, flush=True)
    if args.dog:
        result['dog'] = dog_baseline(run0, tests, diam)
    path = os.path.join(args.results, f'pick3d_tests_snr{args.snr:g}'
                        + ('' if args.padding == 'zero' else f'_{args.padding}') + '.json')
    with mrc.atomic_path(path) as tmp:
        json.dump(f1._json_ready(result), open(tmp, 'w'), indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
