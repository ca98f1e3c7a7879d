"""2D picking benchmark on the β-gal micrographs (EMPIAR-10017, CryoPPP expert masks): DeepCryoPicker and
a Laplacian-of-Gaussian baseline.

Ground truth: circle centres recovered from the masks (engine/pick2d/betagal.py), in the JPG's array frame,
which is the frame the pickers see (they read the JPGs). Matching: one to one (Hungarian) within 54 px,
half the 108 px particle diameter. The 10 micrographs are split by sorted name: the first --n-train are
the training split (DeepCryoPicker trains on them without labels; thresholds are tuned on them against the
truth), the rest the test split.

Reported per method on the test split: F1 / precision / recall at the picker's own threshold
(DeepCryoPicker: the model's, calibrated without labels at training, and the fixed 0.5; LoG has none,
so only tuned) and at the threshold that maximises F1 on the training
split; and seconds per 4096² micrograph per stage. The JPGs are already denoised by CryoSegNet's chain;
the CryoSegNet chain is timed on one of them as if it were raw, for the time figure only.

Usage:
  python bench/bench_2d.py [--n-train 5] [--per-class 600] [--epochs 12] [--json out.json]
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cryopick_plugin.engine.pick2d import betagal, preprocess as preprocess2d  # noqa: E402
from cryopick_plugin.engine.pick2d.deepcryopicker import picker as dcp
from cryopick_plugin.engine.evaluate import match_points  # noqa: E402
from cryopick_plugin.engine.pick2d.micrograph_io import (EDGE_MARGIN, away_from_edge, downsample, read_micrograph, to_original_coordinates)


def prf(pred, truth, radius):
    pairs, _ = match_points(pred, truth, radius) if len(pred) and len(truth) else (np.zeros((0, 2)), None)
    tp = len(pairs)
    p = tp / len(pred) if len(pred) else 0.0
    r = tp / len(truth) if len(truth) else 0.0
    return {'f1': 2 * tp / max(len(pred) + len(truth), 1), 'precision': p, 'recall': r, 'tp': tp,
            'n_pred': int(len(pred)), 'n_true': int(len(truth))}


def pooled(results):
    tp = sum(r['tp'] for r in results)
    n_pred = sum(r['n_pred'] for r in results)
    n_true = sum(r['n_true'] for r in results)
    return {'f1': 2 * tp / max(n_pred + n_true, 1), 'precision': tp / max(n_pred, 1),
            'recall': tp / max(n_true, 1), 'tp': tp, 'n_pred': n_pred, 'n_true': n_true}


def at_threshold(picks, truths, thr, radius):
    return pooled([prf(xy[s >= thr], t, radius) for (xy, s), t in zip(picks, truths)])


def best_threshold(picks, truths, radius):
    scores = np.concatenate([s for _, s in picks])
    grid = np.unique(np.quantile(scores, np.linspace(0, 0.98, 50))) if len(scores) else [0.5]
    best = max(grid, key=lambda t: at_threshold(picks, truths, t, radius)['f1'])
    return float(best)


def log_picks(image, diameter, bin_factor=4, edge_margin=0.0):
    """LoG blobs (skimage.blob_log) on the inverted, downsampled image; returns (xy, scores). With
    `edge_margin` (diameters), blobs closer than that to the edge are dropped, as cryopick's pickers do."""
    from skimage.feature import blob_log
    small = downsample(image, bin_factor)
    small = -(small - small.mean()) / small.std()
    sigma = diameter / bin_factor / 2 / np.sqrt(2)
    blobs = blob_log(small, min_sigma=0.7 * sigma, max_sigma=1.3 * sigma, num_sigma=5, threshold=0.0,
                     overlap=0.3, exclude_border=False)
    if len(blobs) == 0:
        return np.zeros((0, 2)), np.zeros(0)
    # blob_log scores: the scale-normalised LoG response at each blob
    from scipy import ndimage as ndi
    resp = -ndi.gaussian_laplace(small, sigma) * sigma ** 2
    ys, xs = blobs[:, 0].astype(int), blobs[:, 1].astype(int)
    xy = to_original_coordinates(np.stack([xs, ys], 1), small.shape, image.shape)
    keep = away_from_edge(xy, image.shape, edge_margin * diameter)
    return xy[keep], resp[ys, xs][keep]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--n-train', type=int, default=5)
    ap.add_argument('--per-class', type=int, default=None)
    ap.add_argument('--epochs', type=int, default=None)
    ap.add_argument('--clustering', default='ibc')
    ap.add_argument('--self-training', type=int, default=None,
                    help="rounds of retraining on DeepCryoPicker's own confident picks (default: the engine's)")
    ap.add_argument('--json')
    args = ap.parse_args()
    radius = betagal.DIAMETER / 2
    t0 = time.time()
    records = betagal.load_betagal()
    t_truth = (time.time() - t0) / len(records)
    train, test = records[:args.n_train], records[args.n_train:]
    images = {r.name: read_micrograph(r.micrograph)[0] for r in records}
    out = {'n_train': len(train), 'n_test': len(test), 'radius_px': radius,
           'truth_per_micrograph': {r.name: len(r.centres) for r in records},
           'times_s_per_micrograph': {'truth_from_mask': t_truth}}

    t = time.time()
    preprocess2d.cryosegnet_chain(images[records[0].name])
    out['times_s_per_micrograph']['cryosegnet_chain_4096'] = time.time() - t
    t = time.time()
    preprocess2d.run_chain(images[records[0].name], 'cryosegnet', bin_factor=4)
    out['times_s_per_micrograph']['cryosegnet_chain_bin4'] = time.time() - t

    # LoG baseline
    t = time.time()
    log_tr = [log_picks(images[r.name], betagal.DIAMETER) for r in train]
    log_te = [log_picks(images[r.name], betagal.DIAMETER) for r in test]
    out['times_s_per_micrograph']['log_baseline'] = (time.time() - t) / len(records)
    thr = best_threshold(log_tr, [r.centres for r in train], radius)
    out['log'] = {'tuned_threshold': thr,
                  'test_at_tuned': at_threshold(log_te, [r.centres for r in test], thr, radius),
                  'train_at_tuned': at_threshold(log_tr, [r.centres for r in train], thr, radius)}
    print('LoG', json.dumps(out['log'], indent=1), flush=True)
    # the same with cryopick's edge margin (blobs of particles cut by the edge dropped)
    log_tr = [log_picks(images[r.name], betagal.DIAMETER, edge_margin=EDGE_MARGIN) for r in train]
    log_te = [log_picks(images[r.name], betagal.DIAMETER, edge_margin=EDGE_MARGIN) for r in test]
    thr = best_threshold(log_tr, [r.centres for r in train], radius)
    out['log_edge'] = {'edge_margin': EDGE_MARGIN, 'tuned_threshold': thr,
                       'test_at_tuned': at_threshold(log_te, [r.centres for r in test], thr, radius)}
    print('LoG with the edge margin', json.dumps(out['log_edge'], indent=1), flush=True)

    # DeepCryoPicker: train without labels on the training split, pick everything
    t = time.time()
    model, info = dcp.train_deepcryopicker([images[r.name] for r in train], betagal.DIAMETER, 'cpu',
                                           clustering=args.clustering, per_class=args.per_class,
                                           epochs=args.epochs, seed=0, log=print,
                                           **({} if args.self_training is None
                                              else {'self_training': args.self_training}))
    out['times_s_per_micrograph']['dcp_train_total'] = time.time() - t
    out['dcp_training'] = {k: v for k, v in info.items() if k != 'raw_counts'}
    stage_times = []
    dcp_picks = {}
    for r in records:
        df, _, diag = dcp.deepcryopicker_pick(images[r.name], betagal.DIAMETER, model=model, threshold=0.01)
        dcp_picks[r.name] = (df[['rlnCoordinateX', 'rlnCoordinateY']].to_numpy(),
                             df['rlnAutopickFigureOfMerit'].to_numpy())
        stage_times.append(diag['times'])
    for k in stage_times[0]:
        out['times_s_per_micrograph'][f'dcp_{k}'] = float(np.mean([s[k] for s in stage_times]))
    tr = [dcp_picks[r.name] for r in train]
    te = [dcp_picks[r.name] for r in test]
    thr = best_threshold(tr, [r.centres for r in train], radius)
    own = float(model.meta['threshold'])
    out['deepcryopicker'] = {
        'own_threshold': own, 'own_threshold_source': model.meta.get('threshold_source'),
        'tuned_threshold': thr,
        'test_at_own': at_threshold(te, [r.centres for r in test], own, radius),
        'test_at_tuned': at_threshold(te, [r.centres for r in test], thr, radius),
        'train_at_own': at_threshold(tr, [r.centres for r in train], own, radius),
        'test_at_fixed_0.5': at_threshold(te, [r.centres for r in test], dcp.DEFAULT_THRESHOLD, radius)}
    calib = model.meta.get('threshold_calibration') or {}
    if 'robust_value' in calib:
        robust = float(np.clip(calib['robust_value'], dcp.CALIBRATION_MIN, dcp.DEFAULT_THRESHOLD))
        out['deepcryopicker'].update(
            calibration=calib, robust_threshold=robust,
            test_at_robust=at_threshold(te, [r.centres for r in test], robust, radius),
            train_at_robust=at_threshold(tr, [r.centres for r in train], robust, radius))
    out['deepcryopicker']['test_f1_by_threshold'] = {
        f'{t:g}': round(at_threshold(te, [r.centres for r in test], t, radius)['f1'], 4)
        for t in (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)}
    print('DeepCryoPicker', json.dumps(out['deepcryopicker'], indent=1))
    print('times', json.dumps(out['times_s_per_micrograph'], indent=1))
    if args.json:
        with open(args.json, 'w') as fh:
            json.dump(out, fh, indent=2, default=float)
    return 0


if __name__ == '__main__':
    sys.exit(main())
