"""3D picking F1 of the DeepETPicker engine against a DoG baseline on simulated tomograms (issue 3).

One condition = one projection SNR. For each condition:

1. simulate four tomograms (`simulate_tomo.simulate_tomogram`, default 96×256×256 at 10 Å/voxel, seeds
   101..104, the same placement at every SNR: only the noise changes) holding four template classes
   (4v4r ribosome, 3j9i proteasome, 4v94 TRiC, 1bxn rubisco), unlabelled distractor proteins (1qvr,
   3cf3), gold beads and vesicles;
2. weak labels (`labels.write_label_map`, truncated balls of about half the particle diameter, odd);
3. train on tomograms 1-2, validate on 3 (`train3d.train`, CPU preset, epochs × max_steps_per_epoch
   batches), pick tomogram 4 (`pick3d.pick`);
4. baseline: `dog.dog_pick` on the same test tomogram with the median class diameter, its threshold
   chosen on the validation tomogram (`dog.choose_threshold`);
5. score with `evaluate.evaluate_picks`:
   - strict (the issue's convention): per class, that class's picks against that class's truth within
     D/4 (half the particle radius of the class); classification F1 summed over classes; localisation
     F1 (classes ignored) with each true particle's own D/4 (computed per true class against all picks,
     counts summed — a pick is credited once);
   - full: the same with D/2 (the particle radius, DeepETPicker's own occupancy test).
   DoG has no classes: only its localisation figures are meaningful.

Resumable: every stage writes its files under --out/<condition>/ and is skipped when they exist; a
condition whose result JSON (--out/pick3d_f1_<condition>.json) exists is skipped entirely.
Wall and CPU time (time.process_time of this process) are recorded for each stage.

Example (from the repository root):
  .venv/bin/python bench/bench_pick3d_f1.py --snr 0.02 0.008 --threads 1
  .venv/bin/python bench/bench_pick3d_f1.py --snr 0.02 --shape 64 160 160 --epochs 4 --steps-per-epoch 20
"""
import argparse
import json
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cryopick_plugin.engine.disca import dog  # noqa: E402
from cryopick_plugin.engine import evaluate
from cryopick_plugin.engine.pick3d import labels, picking as pick3d, training as train3d
from cryopick_plugin.engine.io import mrc, star
from cryopick_plugin.engine.sim.tomograms import simulate_tomogram  # noqa: E402

CLASSES = ('4v4r', '3j9i', '4v94', '1bxn')
NAMES = {'4v4r': 'ribosome', '3j9i': 'proteasome', '4v94': 'TRiC', '1bxn': 'rubisco'}
DISTRACTORS = ('1qvr', '3cf3')
SEEDS = (101, 102, 103, 104)          # train, train, validation, test
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Clock:
    """Wall and CPU seconds of a stage."""

    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = round(time.perf_counter() - self.w, 1)
        self.cpu = round(time.process_time() - self.c, 1)

    def as_dict(self):
        return {'wall_s': self.wall, 'cpu_s': self.cpu}


def _metrics(m):
    return {k: (round(float(m[k]), 4) if isinstance(m[k], float) else int(m[k]))
            for k in ('precision', 'recall', 'f1', 'tp', 'n_pred', 'n_true')}


def _json_ready(obj):
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    return obj


def simulate_set(out, shape, snr, n_distractor, n_beads, n_vesicles):
    """Write (or reuse) the four tomograms, their truth tables and label maps; return items + diameters."""
    os.makedirs(out, exist_ok=True)
    items, info_path = [], os.path.join(out, 'simulation.json')
    info = json.load(open(info_path)) if os.path.exists(info_path) else {}
    for seed in SEEDS:
        name = f'sim{seed}'
        tomo, lab, tru = (os.path.join(out, f'{name}{s}') for s in ('.mrc', '_labels.mrc', '_truth.star'))
        if not all(os.path.exists(p) for p in (tomo, lab, tru)) or name not in info:
            with Clock() as c:
                sim = simulate_tomogram(shape=tuple(shape), classes=CLASSES, distractors=DISTRACTORS,
                                        n_per_distractor={d: n_distractor for d in DISTRACTORS},
                                        n_beads=n_beads, n_vesicles=n_vesicles, snr=snr, seed=seed, name=name)
                diam = {i + 1: float(sim.meta['diameters_vox'][n]) for i, n in enumerate(sim.class_names)}
                d_lab = {c: label_diameter(d) for c, d in diam.items()}
                mrc.write_mrc(tomo, sim.volume, sim.voxel_size)
                labels.write_label_map(lab, sim.volume.shape, sim.truth, d_lab, 'tball', sim.voxel_size)
                star.write_coordinates(tru, sim.truth)
            info[name] = {'diameters_vox': diam, 'label_diameters': d_lab, 'placed': sim.meta['placed'],
                          'n_particles': int(len(sim.truth)), 'seconds': c.as_dict()}
            with mrc.atomic_path(info_path) as tmp:
                json.dump(_json_ready(info), open(tmp, 'w'), indent=1)
            del sim
        items.append((tomo, lab, star.read_coordinates(tru)))
    diam = {int(c): float(d) for c, d in info[f'sim{SEEDS[0]}']['diameters_vox'].items()}
    return items, diam, info


LABEL_FACTOR = 0.5   # --label-factor


def label_diameter(d):
    """About LABEL_FACTOR (half) of the particle diameter, odd, at least 3 voxels."""
    return max(3, int(round(d * LABEL_FACTOR)) | 1)


def score_picks(picks, truth, diam, factor):
    """Per-class, classification and localisation figures with radius = factor × each class's diameter."""
    per_class, c_tp, c_pred, l_tp = {}, 0, 0, 0
    for c, d in sorted(diam.items()):
        r = factor * d
        t_c = truth[truth[star.CLASS] == c]
        p_c = picks[picks[star.CLASS] == c] if star.CLASS in picks.columns else picks.iloc[:0]
        m = evaluate.evaluate_picks(p_c, t_c, r)['localisation']
        per_class[c] = {'radius': round(r, 2), **_metrics(m)}
        c_tp += int(m['tp'])
        c_pred += int(m['n_pred'])
    # localisation with each true particle's own radius: match class by class against the picks not yet
    # used, largest particles first (their radius is the most lenient; a pick is credited once)
    free = picks.reset_index(drop=True)
    for c, d in sorted(diam.items(), key=lambda kv: -kv[1]):
        t_c = truth[truth[star.CLASS] == c]
        if len(free) and len(t_c):
            pi, _ = evaluate.pair_rows(free, t_c, factor * d)
            l_tp += len(pi)
            free = free.drop(index=free.index[np.asarray(pi, dtype=int)]).reset_index(drop=True)
    n_true = len(truth)
    cls = evaluate.counts_to_metrics(c_tp, len(picks), n_true)
    loc = evaluate.counts_to_metrics(l_tp, len(picks), n_true)
    return {'radius_factor_of_diameter': factor, 'per_class': per_class,
            'classification': _metrics(cls), 'localisation': _metrics(loc)}


def run_condition(args, snr):
    tag = f"snr{snr:g}_{'x'.join(map(str, args.shape))}" + (f'_{args.tag}' if args.tag else '')
    result_path = os.path.join(args.out, f"pick3d_f1_{tag}{'_retuned' if args.retune else ''}"
                                         f"{'_flips' if args.flip_average else ''}.json")
    if os.path.exists(result_path):
        print(f'{tag}: result exists ({result_path}), skipped')
        return json.load(open(result_path))
    work = os.path.join(args.out, tag)
    with Clock() as c_sim:
        items, diam, info = simulate_set(work, args.shape, snr, args.distractors, args.beads, args.vesicles)
    print(f'{tag}: simulated', {k: v['placed'] for k, v in info.items()}, flush=True)
    d_lab = {c: label_diameter(d) for c, d in diam.items()}

    model = os.path.join(work, 'deepet_cpu.pt')
    meta_path = model + '.bench.json'
    if os.path.exists(meta_path):
        train_rec = json.load(open(meta_path))
    elif args.from_checkpoint:
        # a training stopped before its end leaves its best checkpoint so far (saved atomically at each
        # validation that improved); evaluate that one, with thresholds tuned on the validation tomogram
        if not os.path.exists(model):
            raise SystemExit(f'{model}: no checkpoint to evaluate')
        meta = json.load(open(model + '.json'))['meta']
        train_rec = {'interrupted': True, 'precision': meta.get('precision'), 'batch_size': meta.get('batch_size'),
                     'lr': meta.get('lr'), 'epochs_planned': args.epochs, 'best_epoch': meta.get('best_epoch'),
                     'steps_per_epoch': args.steps_per_epoch, 'thresholds': meta.get('thresholds'),
                     'best_val': meta.get('best_val')}
    else:
        with Clock() as c_train:
            meta = train3d.train(items[:2], items[2:3], model, preset=args.preset, epochs=args.epochs, device=args.device,
                                 seed=0, val_every=args.val_every, patience=args.epochs, diameters=d_lab,
                                 max_steps_per_epoch=args.steps_per_epoch,
                                 class_balance=not args.no_class_balance, bg_fraction=args.bg_fraction,
                                 hard_fraction=args.hard_fraction, batch_size=args.batch_size, lr=args.lr,
                                 precision=args.precision, widths=args.widths, patch=args.patch,
                                 time_budget=args.time_budget)
        train_rec = {'time_budget_min': args.time_budget, 'stop_reason': meta.get('stop_reason'),
                     'steps_run': meta.get('steps_run'), 'train_seconds': meta.get('train_seconds'),'precision': meta.get('precision'), 'batch_size': meta.get('batch_size'), 'lr': meta.get('lr'),
                     'widths': args.widths, 'patch': meta.get('patch'), 'epochs_run': meta['epochs_run'], 'best_epoch': meta['best_epoch'],
                     'steps_per_epoch': args.steps_per_epoch, 'thresholds': meta['thresholds'],
                     'best_val': meta['best_val'], 'tuned_val': meta.get('tuned_val'),
                     **c_train.as_dict()}
        with mrc.atomic_path(meta_path) as tmp:
            json.dump(_json_ready(train_rec), open(tmp, 'w'), indent=1)
    print(f'{tag}: trained', train_rec, flush=True)

    test_tomo, _, truth = items[3]
    val_tomo, _, val_truth = items[2]
    if args.retune:
        # thresholds chosen again on the validation tomogram with the current peak finder
        retuned = os.path.join(work, 'deepet_cpu_retuned_flips.pt' if args.flip_average else 'deepet_cpu_retuned.pt')
        with Clock() as c_tune:
            meta = train3d.retune(model, items[2:3], retuned, device=args.device, flip_average=args.flip_average)
        train_rec = dict(train_rec, retuned={'thresholds': meta['thresholds'], 'tuned_val': meta['tuned_val'],
                                             **c_tune.as_dict()})
        model = retuned
        print(f'{tag}: retuned', train_rec['retuned'], flush=True)
    with Clock() as c_pick:
        picks = pick3d.pick(test_tomo, model, device=args.device, tomo_name=f'sim{SEEDS[3]}', work_dir=work,
                            precision=args.precision, flip_average=args.flip_average)
    star.write_coordinates(os.path.join(work, 'test_picks.star'), picks) if len(picks) else None

    d_dog = float(np.median(list(diam.values())))
    loc_r = 0.25 * min(diam.values())
    with Clock() as c_dog:
        v_val, _ = mrc.open_volume(val_tomo)
        dog_val = dog.dog_pick(v_val, d_dog, volume_name=f'sim{SEEDS[2]}')
        thr = dog.choose_threshold(dog_val, val_truth, 0.25 * d_dog)
        v_test, _ = mrc.open_volume(test_tomo)
        dog_test = dog.dog_pick(v_test, d_dog, threshold=thr, volume_name=f'sim{SEEDS[3]}')
    dog_test = dog_test.assign(**{star.CLASS: 0})  # no classes: never counted by the per-class scores

    result = {
        'condition': {'snr': snr, 'shape_zyx': list(args.shape), 'voxel_size_A': 10.0, 'classes': list(CLASSES),
                      'distractors': list(DISTRACTORS), 'n_per_distractor': args.distractors,
                      'beads': args.beads, 'vesicles': args.vesicles, 'seeds_train_val_test': list(SEEDS),
                      'preset': args.preset, 'device': args.device, 'epochs': args.epochs, 'steps_per_epoch': args.steps_per_epoch, 'tag': args.tag,
                      'class_balance': not args.no_class_balance, 'bg_fraction': args.bg_fraction,
                      'hard_fraction': args.hard_fraction},
        'particle_diameters_vox': {NAMES[CLASSES[c - 1]]: d for c, d in diam.items()},
        'label_diameters_vox': {NAMES[CLASSES[c - 1]]: d for c, d in d_lab.items()},
        'placed': {k: v['placed'] for k, v in info.items()},
        'train': train_rec,
        'deepetpicker': {'n_picks': int(len(picks)), 'pick': c_pick.as_dict(),
                         'strict_D/4': score_picks(picks, truth, diam, 0.25),
                         'full_D/2': score_picks(picks, truth, diam, 0.5)},
        'dog': {'diameter_vox': d_dog, 'threshold_from_validation': round(thr, 3), 'n_picks': int(len(dog_test)),
                'time': c_dog.as_dict(),
                'strict_D/4': score_picks(dog_test, truth, diam, 0.25)['localisation'],
                'full_D/2': score_picks(dog_test, truth, diam, 0.5)['localisation']},
        'note_localisation_radius_min_class_D/4': round(loc_r, 2),
        'simulate': c_sim.as_dict(),
        'threads': args.threads,
        'peak_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0),
        'date': time.strftime('%Y-%m-%d %H:%M'),
    }
    for key in ('strict_D/4', 'full_D/2'):
        pc = result['deepetpicker'][key]['per_class']
        result['deepetpicker'][key]['per_class'] = {NAMES[CLASSES[c - 1]]: v for c, v in pc.items()}
    result = _json_ready(result)
    with mrc.atomic_path(result_path) as tmp:
        json.dump(result, open(tmp, 'w'), indent=1)
    return result


def main(argv=None):
    import logging
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--snr', type=float, nargs='+', default=[0.02, 0.008], help='one condition per value, in order')
    p.add_argument('--shape', type=int, nargs=3, default=[96, 256, 256], help='Z Y X voxels')
    p.add_argument('--epochs', type=int, default=10)
    p.add_argument('--steps-per-epoch', type=int, default=60)
    p.add_argument('--val-every', type=int, default=5)
    p.add_argument('--distractors', type=int, default=15, help='copies of each distractor protein')
    p.add_argument('--beads', type=int, default=8)
    p.add_argument('--vesicles', type=int, default=2)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--preset', default='cpu', choices=('cpu', 'paper'),
                   help='network preset (paper: widths 24/48/72/108, 72³ patches — for GPUs; use a new --tag)')
    p.add_argument('--device', default='cpu', help="torch device for training and picking ('cpu', 'cuda', 'auto')")
    p.add_argument('--no-class-balance', action='store_true', help='draw each particle once per epoch (the reference)')
    p.add_argument('--bg-fraction', type=float, default=0.1, help='background patches per particle patch')
    p.add_argument('--hard-fraction', type=float, default=0.0, help='share of them on hard negatives')
    p.add_argument('--batch-size', type=int, default=None, help='patches per step (default: the cpu preset, 1)')
    p.add_argument('--lr', type=float, default=None, help='peak learning rate (default: the cpu preset)')
    p.add_argument('--widths', type=int, nargs=4, default=None,
                   help="the network's four channel widths (default: the cpu preset, 8 16 24 36)")
    p.add_argument('--patch', type=int, default=None, help='training patch side (default: the cpu preset, 48)')
    p.add_argument('--precision', default='auto', choices=('auto', 'fp32', 'bf16'),
                   help='network arithmetic (auto: bf16 where the CPU has it natively)')
    p.add_argument('--time-budget', type=float, default=None, metavar='MIN',
                   help='wall-clock minutes for the whole training call (train3d --time-budget); epochs then only bound it')
    p.add_argument('--tag', default='', help='suffix of the condition name (e.g. a longer training of the same SNR)')
    p.add_argument('--retune', action='store_true',
                   help='choose t_seg / t_lm of the trained model again on the validation tomogram with the '
                        'current peak finder before picking (result file *_retuned.json)')
    p.add_argument('--from-checkpoint', action='store_true',
                   help='no training: evaluate the best checkpoint an interrupted training of this condition left '
                        '(thresholds tuned on the validation tomogram; implies --retune)')
    p.add_argument('--label-factor', type=float, default=0.5,
                   help='weak-label diameter as a fraction of the particle diameter (use a new --tag: the '
                        'label maps of a condition folder are reused)')
    p.add_argument('--flip-average', action='store_true',
                   help='average the maps over the eight mirror images of every tile, for the threshold tuning '
                        '(implies --retune) and the test picks (result file *_flips.json)')
    p.add_argument('--out', default=os.path.join(ROOT, 'bench', 'results'))
    args = p.parse_args(argv)
    args.retune = args.retune or args.from_checkpoint or args.flip_average
    global LABEL_FACTOR
    LABEL_FACTOR = args.label_factor
    import torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for snr in args.snr:
        res = run_condition(args, snr)
        print(json.dumps({k: res[k] for k in ('condition', 'train', 'deepetpicker', 'dog')}, indent=1), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
