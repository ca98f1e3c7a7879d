"""2D picking F1 on simulated micrographs at several SNRs: DeepCryoPicker, CryoSegNet (U-Net only) and a
Laplacian-of-Gaussian baseline.

One condition = one SNR (`simulate_micrograph`'s definition: variance of the CTF-filtered particle signal
inside the particles' bounding discs over the noise variance). For each condition:

1. simulate --count micrographs (default 6 × 768² px, template 1bxn at 5 Å/px, i.e. a particle diameter of
   about 33 px, 80 particles requested; CTF at 2 µm underfocus uncorrected, carbon edge, ice gradient and
   contamination as the simulator draws them) with seeds --seed, --seed + 1, ...: the same seeds at every
   SNR, so placements, orientations and distractors are the same and only the noise level changes;
2. split: the first --n-train micrographs are the training split, the rest the test split;
3. pickers, all reading the raw simulated image (particles dark):
   - LoG (`bench_2d.log_picks`, binned --log-bin), threshold tuned on the training split;
   - DeepCryoPicker (`deepcryopicker.train_deepcryopicker`, cpu preset) trained on the training
     micrographs WITHOUT labels (diameter given), then every micrograph picked at a score threshold of 0.01
     so that all peaks carry a score: reported at the model's own threshold (calibrated at training
     without labels) and at the best training-split threshold;
   - CryoSegNet U-Net only (`cryosegnet.train_cryosegnet`, cpu preset, CryoSegNet's preprocessing chain)
     trained on the training micrographs WITH their true centres (one of them held out for checkpoint and
     threshold choice), picked by `cryosegnet_pick` without SAM (no checkpoint offline): reported at the
     model's own threshold (chosen on its held-out micrograph), at the best training-split threshold on the
     picks' score (the smoothed map at the pick; picks taken at the low segmentation threshold --csn-low,
     0.3: lower, on a weakly trained map the foreground regions merge and the radius filter drops them),
     and at the best training-split segmentation threshold (the picker's own knob, swept over a grid).

Ground truth: the simulator's exact particle centres (rlnCoordinateX = column, rlnCoordinateY = row of the
image array), the same frame as every picker's output. A frame check runs first (LoG on one micrograph at
SNR 10 must match the truth far better than with x and y swapped). Matching: one to one (Hungarian,
`evaluate.match_points`) within half the particle diameter; F1 / precision / recall pooled over the test
micrographs. Times: wall seconds per micrograph per method (picking), and training wall seconds.

Results go to --json, one entry per SNR; an SNR already in that file is skipped (resumable).

Usage:
  .venv/bin/python bench/bench_2d_sim.py [--snr 0.1 0.03 0.01] [--count 6] [--dcp-per-class 600]
      [--dcp-epochs 12] [--csn-epochs 50] [--json bench/results/bench_2d_sim.json]
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import bench_2d  # noqa: E402
from bench_2d import at_threshold, best_threshold, log_picks  # noqa: E402
from cryopick_plugin.engine.pick2d.cryosegnet import picker as cs  # noqa: E402
from cryopick_plugin.engine.pick2d.deepcryopicker import picker as dcp
from cryopick_plugin.engine.io import star
from cryopick_plugin.engine.evaluate import match_points  # noqa: E402
from cryopick_plugin.engine.pick2d.micrograph_io import EDGE_MARGIN, away_from_edge  # noqa: E402
from cryopick_plugin.engine.sim.micrographs import simulate_micrograph  # noqa: E402

# Segmentation thresholds swept for CryoSegNet's tuned figure: wider than the 0.3-0.8 of its own
# held-out tuning (cryosegnet.THRESHOLD_GRID), so that the tuned figure is not limited by the grid's ends.
# On a weakly trained map a low threshold joins neighbouring discs into regions wider than the radius
# filter keeps, so picks can vanish there.
CSN_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def simulate(args, snr):
    sims = []
    for i in range(args.count):
        sims.append(simulate_micrograph((args.size, args.size), template=args.template,
                                        n_particles=args.particles, snr=snr, pixel_size=args.pixel_size,
                                        seed=args.seed + i, name=f'mic_{i:03d}'))
    return sims


def truth_xy(sim):
    return sim.truth[[star.X, star.Y]].to_numpy(dtype=float)


def xy_scores(df):
    return df[[star.X, star.Y]].to_numpy(dtype=float), df[star.SCORE].to_numpy(dtype=float)


def frame_check(args):
    """LoG against the truth on one micrograph at SNR 10, with x = column (as assumed) and swapped.

    Without carbon and contamination, whose edges and blobs LoG also finds: a frame mismatch should be
    the only thing that can keep the F1 low."""
    sim = simulate_micrograph((args.size, args.size), template=args.template, n_particles=args.particles,
                              snr=10.0, pixel_size=args.pixel_size, seed=args.seed, carbon_edge=False,
                              contamination=False)
    d = float(sim.meta['particle_diameter_px'])
    truth = truth_xy(sim)
    picks = log_picks(sim.image, d, bin_factor=args.log_bin)
    thr = best_threshold([picks], [truth], d / 2)
    xy = picks[0][picks[1] >= thr]
    as_assumed = at_threshold([picks], [truth], thr, d / 2)['f1']
    swapped = at_threshold([(picks[0][:, ::-1], picks[1])], [truth], thr, d / 2)['f1']
    pairs, _ = match_points(xy, truth, d / 2)
    offset = xy[pairs[:, 0]] - truth[pairs[:, 1]]
    out = {'snr': 10.0, 'carbon_edge': False, 'contamination': False, 'log_f1_x_column': round(as_assumed, 3), 'log_f1_x_row': round(swapped, 3),
           'median_offset_xy_px': np.median(offset, axis=0).round(2).tolist()}
    if not (as_assumed > 0.8 and as_assumed > 2 * swapped):
        print(f"WARNING: frame check failed {out}: the truth and the picks may not share a frame", flush=True)
    return out


def run_log(args, sims, d, radius, train, test):
    t = time.perf_counter()
    picks = [log_picks(s.image, d, bin_factor=args.log_bin) for s in sims]
    seconds = (time.perf_counter() - t) / len(sims)
    truths = [truth_xy(s) for s in sims]
    tr, te = [picks[i] for i in train], [picks[i] for i in test]
    thr = best_threshold(tr, [truths[i] for i in train], radius)
    # the same blobs with cryopick's edge margin (blobs of particles cut by the edge dropped)
    keep = [away_from_edge(xy, s.image.shape, EDGE_MARGIN * d) for (xy, _), s in zip(picks, sims)]
    edged = [(xy[k], sc[k]) for (xy, sc), k in zip(picks, keep)]
    thr_e = best_threshold([edged[i] for i in train], [truths[i] for i in train], radius)
    return {'bin_factor': args.log_bin, 'seconds_per_micrograph': round(seconds, 3),
            'tuned_threshold': thr,
            'test_at_tuned': at_threshold(te, [truths[i] for i in test], thr, radius),
            'train_at_tuned': at_threshold(tr, [truths[i] for i in train], thr, radius),
            'edge_margin': EDGE_MARGIN, 'tuned_threshold_edge': thr_e,
            'test_at_tuned_edge': at_threshold([edged[i] for i in test], [truths[i] for i in test], thr_e, radius)}


def run_dcp(args, sims, d, radius, train, test):
    t = time.perf_counter()
    model, info = dcp.train_deepcryopicker([sims[i].image for i in train], d, 'cpu', per_class=args.dcp_per_class,
                                           epochs=args.dcp_epochs, seed=0, device='cpu',
                                           log=lambda m: print('  dcp:', m, flush=True),
                                           clustering=args.dcp_clustering,
                                           **({} if args.dcp_self_training is None
                                              else {'self_training': args.dcp_self_training}))
    train_seconds = time.perf_counter() - t
    picks, seconds = [], []
    for s in sims:
        t = time.perf_counter()
        # 0.01: every score peak comes back with its score, so any threshold can be applied afterwards.
        df, _, _ = dcp.deepcryopicker_pick(s.image, d, model=model, threshold=0.01)
        seconds.append(time.perf_counter() - t)
        picks.append(xy_scores(df))
    truths = [truth_xy(s) for s in sims]
    tr, te = [picks[i] for i in train], [picks[i] for i in test]
    t_tr, t_te = [truths[i] for i in train], [truths[i] for i in test]
    own = float(model.meta['threshold'])
    thr = best_threshold(tr, t_tr, radius)
    calib = model.meta.get('threshold_calibration') or {}
    robust = {}
    if 'robust_value' in calib:
        r = float(np.clip(calib['robust_value'], dcp.CALIBRATION_MIN, dcp.DEFAULT_THRESHOLD))
        robust = {'calibration': calib, 'robust_threshold': r, 'test_at_robust': at_threshold(te, t_te, r, radius)}
    return {**robust, 'per_class': int(info.get('per_class', 0)), 'epochs': int(model.meta['training']['epochs']),
            'training_set': {k: v for k, v in info.items() if k != 'raw_counts'},
            'train_seconds': round(train_seconds, 1), 'seconds_per_micrograph': round(float(np.mean(seconds)), 3),
            'own_threshold': own, 'own_threshold_source': model.meta.get('threshold_source'),
            'tuned_threshold': thr,
            'test_at_own': at_threshold(te, t_te, own, radius),
            'test_at_tuned': at_threshold(te, t_te, thr, radius),
            'train_at_own': at_threshold(tr, t_tr, own, radius),
            'train_at_tuned': at_threshold(tr, t_tr, thr, radius)}


def run_csn(args, sims, d, radius, train, test, work_dir):
    model_path = os.path.join(work_dir, 'cryosegnet_sim.pt')
    t = time.perf_counter()
    history = cs.train_cryosegnet([sims[i].image for i in train], [truth_xy(sims[i]) for i in train], d, model_path,
                                  preset='cpu', epochs=args.csn_epochs, batch_size=args.csn_batch, lr=args.csn_lr,
                                  val_fraction=1 / len(train), input_size=args.csn_input_size,
                                  crop_size=args.csn_crop, device='cpu', seed=0, preprocess=True,
                                  lr_schedule=args.csn_schedule,
                                  pixel_size=args.pixel_size, names=[sims[i].name for i in train],
                                  log=lambda m: print('  csn:', m, flush=True))
    train_seconds = time.perf_counter() - t
    model = cs.load_cryosegnet(model_path, 'cpu')
    own_picks, low_picks, maps, seconds = [], [], [], []
    for s in sims:
        t = time.perf_counter()
        df, diag = cs.cryosegnet_pick(s.image, model, d, threshold=None)
        seconds.append(time.perf_counter() - t)
        own_picks.append(xy_scores(df))
        maps.append(diag['prob'])
        # Same as cryosegnet_pick(..., threshold=csn_low) without running the chain and network again.
        low_picks.append(xy_scores(cs.picks_from_map(diag['prob'], d, threshold=args.csn_low)))
    truths = [truth_xy(s) for s in sims]
    t_tr, t_te = [truths[i] for i in train], [truths[i] for i in test]
    own = float(model.meta.get('threshold', 0.5))
    # Own threshold: the picks as cryosegnet_pick returns them (scores all pass, so threshold -inf).
    test_own = at_threshold([own_picks[i] for i in test], t_te, -np.inf, radius)
    train_own = at_threshold([own_picks[i] for i in train], t_tr, -np.inf, radius)
    lo_tr, lo_te = [low_picks[i] for i in train], [low_picks[i] for i in test]
    thr_score = best_threshold(lo_tr, t_tr, radius)

    def seg(indices, thr):
        return at_threshold([xy_scores(cs.picks_from_map(maps[i], d, threshold=thr)) for i in indices],
                            [truths[i] for i in indices], -np.inf, radius)

    sweep = {thr: seg(train, thr)['f1'] for thr in CSN_GRID}
    thr_seg = max(CSN_GRID, key=lambda k: sweep[k])
    return {'epochs': args.csn_epochs, 'input_size': args.csn_input_size, 'crop_size': args.csn_crop,
            'batch_size': args.csn_batch, 'lr': args.csn_lr, 'preprocess': 'cryosegnet chain',
            'train_micrographs': model.meta['train_micrographs'], 'val_micrographs': model.meta['val_micrographs'],
            'best_epoch': model.meta['best_epoch'], 'best_val_dice': round(model.meta['best_val_dice'], 4),
            'learning_curve': [(h['epoch'], h['train_loss'] and round(h['train_loss'], 4), round(h['val_dice'], 4))
                               for h in history],
            'train_seconds': round(train_seconds, 1), 'seconds_per_micrograph': round(float(np.mean(seconds)), 3),
            'own_threshold': own, 'own_threshold_source': model.meta.get('threshold_source', 'fixed default'),
            'own_threshold_val_f1': model.meta.get('threshold_val_f1'),
            'test_at_own': test_own, 'train_at_own': train_own,
            'low_segmentation_threshold': args.csn_low, 'score': f'{star.SCORE} (smoothed map at the pick)',
            'tuned_score_threshold': thr_score,
            'test_at_tuned_score': at_threshold(lo_te, t_te, thr_score, radius),
            'train_segmentation_sweep_f1': {str(k): round(v, 4) for k, v in sweep.items()},
            'tuned_segmentation_threshold': thr_seg,
            'test_at_tuned_segmentation': seg(test, thr_seg)}


def run_condition(args, snr, work_dir):
    t = time.perf_counter()
    sims = simulate(args, snr)
    sim_seconds = (time.perf_counter() - t) / len(sims)
    d = float(sims[0].meta['particle_diameter_px'])
    radius = d / 2
    train, test = list(range(args.n_train)), list(range(args.n_train, len(sims)))
    out = {'snr': snr, 'measured_snr': [round(s.meta['measured_snr'], 4) for s in sims],
           'particle_diameter_px': d, 'radius_px': radius,
           'particles': [int(s.meta['placed']) for s in sims],
           'carbon_fraction': [round(s.meta['carbon_fraction'], 3) for s in sims],
           'contamination_blobs': [int(s.meta['contamination_blobs']) for s in sims],
           'train': [sims[i].name for i in train], 'test': [sims[i].name for i in test],
           'simulate_seconds_per_micrograph': round(sim_seconds, 2),
           'settings': {k: v for k, v in vars(args).items() if k not in ('snr', 'json')}}
    print(f'SNR {snr}: {sum(out["particles"])} particles, diameter {d} px', flush=True)
    out['log'] = run_log(args, sims, d, radius, train, test)
    print('  LoG test F1 %.3f' % out['log']['test_at_tuned']['f1'], flush=True)
    if not args.skip_deepcryopicker:
        out['deepcryopicker'] = run_dcp(args, sims, d, radius, train, test)
        print('  DeepCryoPicker test F1 own %.3f tuned %.3f' % (out['deepcryopicker']['test_at_own']['f1'],
                                                                 out['deepcryopicker']['test_at_tuned']['f1']),
              flush=True)
    if args.skip_cryosegnet:
        return out
    out['cryosegnet'] = run_csn(args, sims, d, radius, train, test, work_dir)
    print('  CryoSegNet test F1 own %.3f tuned score %.3f tuned segmentation %.3f' % (
        out['cryosegnet']['test_at_own']['f1'], out['cryosegnet']['test_at_tuned_score']['f1'],
        out['cryosegnet']['test_at_tuned_segmentation']['f1']), flush=True)
    return out


def rows(cond):
    """(method, threshold kind, threshold, metrics, seconds per micrograph) for the table."""
    lg, dc, cn = cond['log'], cond.get('deepcryopicker'), cond.get('cryosegnet')
    out = [('LoG', 'tuned (train)', lg['tuned_threshold'], lg['test_at_tuned'], lg['seconds_per_micrograph'])]
    if 'test_at_tuned_edge' in lg:
        out.append(('LoG', 'tuned, edge margin', lg['tuned_threshold_edge'], lg['test_at_tuned_edge'],
                    lg['seconds_per_micrograph']))
    if dc is not None:
        out += [('DeepCryoPicker', 'own (calibrated)', dc['own_threshold'], dc['test_at_own'],
                 dc['seconds_per_micrograph'])]
        if 'test_at_robust' in dc:
            out.append(('DeepCryoPicker', 'robust background', dc['robust_threshold'], dc['test_at_robust'],
                        dc['seconds_per_micrograph']))
        out.append(('DeepCryoPicker', 'tuned (train)', dc['tuned_threshold'], dc['test_at_tuned'],
                    dc['seconds_per_micrograph']))
    if cn is None:
        return out
    return out + [('CryoSegNet U-Net', 'own (held-out)', cn['own_threshold'], cn['test_at_own'],
                   cn['seconds_per_micrograph']),
                  ('CryoSegNet U-Net', f"tuned score (seg {cn['low_segmentation_threshold']:g})",
                   cn['tuned_score_threshold'], cn['test_at_tuned_score'], cn['seconds_per_micrograph']),
                  ('CryoSegNet U-Net', 'tuned segmentation', cn['tuned_segmentation_threshold'],
                   cn['test_at_tuned_segmentation'], cn['seconds_per_micrograph'])]


def print_table(results):
    print(f"{'SNR':>6} {'method':<17} {'threshold kind':<24} {'thr':>7} {'F1':>6} {'P':>6} {'R':>6} "
          f"{'picks':>6} {'true':>5} {'s/mic':>6}")
    for key in sorted(results['snr'], key=float, reverse=True):
        for method, kind, thr, m, sec in rows(results['snr'][key]):
            print(f"{key:>6} {method:<17} {kind:<24} {thr:7.3f} {m['f1']:6.3f} {m['precision']:6.3f} "
                  f"{m['recall']:6.3f} {m['n_pred']:6d} {m['n_true']:5d} {sec:6.2f}")


def save(path, results):
    tmp = path + '.tmp'
    with open(tmp, 'w') as fh:
        json.dump(results, fh, indent=1, default=float)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--snr', type=float, nargs='+', default=[0.1, 0.03, 0.01])
    ap.add_argument('--count', type=int, default=6)
    ap.add_argument('--n-train', type=int, default=4)
    ap.add_argument('--size', type=int, default=768)
    ap.add_argument('--template', default='1bxn')
    ap.add_argument('--pixel-size', type=float, default=5.0)
    ap.add_argument('--particles', type=int, default=80)
    ap.add_argument('--seed', type=int, default=100)
    ap.add_argument('--log-bin', type=int, default=2)
    ap.add_argument('--dcp-per-class', type=int, default=None, help='default: the cpu preset (600)')
    ap.add_argument('--dcp-epochs', type=int, default=None, help='default: the cpu preset (12)')
    ap.add_argument('--dcp-self-training', type=int, default=None,
                    help="DeepCryoPicker's rounds of retraining on its own picks (default: the engine's)")
    ap.add_argument('--dcp-clustering', default='ibc', help="DeepCryoPicker's pixel clustering (ibc)")
    ap.add_argument('--csn-epochs', type=int, default=50)
    ap.add_argument('--csn-input-size', type=int, default=768)
    ap.add_argument('--csn-crop', type=int, default=256)
    ap.add_argument('--csn-batch', type=int, default=4)
    ap.add_argument('--csn-lr', type=float, default=1e-3)
    ap.add_argument('--csn-low', type=float, default=0.3)
    ap.add_argument('--csn-schedule', default='cosine', help="CryoSegNet's learning-rate schedule (cosine, constant)")
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--skip-cryosegnet', action='store_true', help='LoG and DeepCryoPicker only')
    ap.add_argument('--skip-deepcryopicker', action='store_true', help='LoG and CryoSegNet only')
    ap.add_argument('--json', default=os.path.join(HERE, 'results', 'bench_2d_sim.json'))
    args = ap.parse_args()
    if not 0 < args.n_train < args.count:
        ap.error('--n-train must leave at least one test micrograph')
    import cv2
    import torch
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)

    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    results = {'snr': {}}
    if os.path.exists(args.json):
        with open(args.json) as fh:
            results = json.load(fh)
    results['log_picks'] = bench_2d.log_picks.__doc__.strip()
    if 'frame_check' not in results:
        results['frame_check'] = frame_check(args)
        print('frame check', results['frame_check'], flush=True)
    with tempfile.TemporaryDirectory(prefix='bench_2d_sim_') as work_dir:
        for snr in args.snr:
            key = f'{snr:g}'
            if key in results['snr']:
                print(f'SNR {key}: already in {args.json}, skipped', flush=True)
                continue
            t = time.perf_counter()
            results['snr'][key] = run_condition(args, snr, work_dir)
            results['snr'][key]['wall_seconds'] = round(time.perf_counter() - t, 1)
            save(args.json, results)
    save(args.json, results)
    print_table(results)
    return 0


if __name__ == '__main__':
    sys.exit(main())
