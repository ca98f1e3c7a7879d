"""CryoSegNet benchmark on the 10 real β-gal micrographs (EMPIAR-10017, CryoPPP annotation).

Split: the first 6 micrographs (sorted by name) train the 'cpu' preset (one of the 6 is held out for
validation and checkpoint choice), the last 4 are the test set. The JPGs are already denoised by
CryoSegNet's chain, so the chain is skipped for them (it is only timed, on one micrograph). No SAM
checkpoint can be had offline: picking is the U-Net-only path (threshold + distance-transform maxima).

Reported on the test micrographs:
* F1 / precision / recall, picks matched one-to-one to annotated centres within 54 px (half the
  diameter), at the model's own threshold (chosen by the training on its held-out micrograph), at 0.5 and
  at the threshold with the best F1 on the training micrographs;
* pixel Dice of the thresholded U-Net map against the expert masks (JPEG masks thresholded at 128), the
  CryoSegNet paper's metric, mean over micrographs (the paper reports the per-set maximum; given too);
* seconds per 4096² micrograph per stage: preprocessing chain, network (scaling, forward, upsampling),
  post-processing.

Usage:
  .venv/bin/python bench/bench_cryosegnet.py --out /tmp/csn_bench [--input-size 512] [--epochs 15]
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cryopick_plugin.engine.pick2d.cryosegnet import picker as cs  # noqa: E402
from cryopick_plugin.engine.io import star
from cryopick_plugin.engine.evaluate import match_points  # noqa: E402
from cryopick_plugin.engine.settings import default_data_dir  # noqa: E402

THRESHOLDS = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def f1_counts(picks, centres, radius):
    pairs, _ = match_points(star.xyz_array(picks), centres, radius)
    return len(pairs), len(picks), len(centres)


def summarise(tp, n_pred, n_true):
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_true if n_true else 0.0
    return {'precision': round(p, 3), 'recall': round(r, 3),
            'f1': round(2 * p * r / (p + r), 3) if p + r else 0.0, 'picks': n_pred, 'true': n_true}


def pixel_dice(prob, mask, threshold):
    pred = prob >= threshold
    denom = pred.sum() + mask.sum()
    return 2.0 * np.logical_and(pred, mask).sum() / denom if denom else 1.0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', default=os.path.join(default_data_dir() or '', 'betagal'))
    parser.add_argument('--out', required=True)
    parser.add_argument('--input-size', type=int, default=512)
    parser.add_argument('--crop-size', type=int, default=256)
    parser.add_argument('--epochs', type=int, default=15)
    parser.add_argument('--batch-size', type=int, default=4)
    parser.add_argument('--lr', type=float, default=1e-3)
    parser.add_argument('--n-train', type=int, default=6)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--schedule', default='cosine', help='learning-rate schedule (cosine, constant)')
    args = parser.parse_args()
    import cv2
    from cryopick_plugin.engine.pick2d.betagal import load_betagal
    from cryopick_plugin.engine.pick2d.micrograph_io import read_micrograph

    os.makedirs(args.out, exist_ok=True)
    records = [(r.micrograph, r.mask, np.asarray(r.centres, dtype=float)) for r in load_betagal(args.data)]
    diameter, radius = 108.0, 54.0
    images = [read_micrograph(m)[0] for m, _, _ in records]
    masks = [cv2.imread(str(k), cv2.IMREAD_GRAYSCALE) >= 128 for _, k, _ in records]
    train, test = list(range(args.n_train)), list(range(args.n_train, len(records)))
    model_path = os.path.join(args.out, 'cryosegnet_betagal_cpu.pt')

    t0 = time.time()
    history = cs.train_cryosegnet([images[i] for i in train], [records[i][2] for i in train], diameter, model_path,
                                  preset='cpu', epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                  val_fraction=1 / args.n_train, input_size=args.input_size,
                                  crop_size=args.crop_size, device='cpu', seed=args.seed, preprocess=False,
                                  lr_schedule=args.schedule,
                                  pixel_size=1.77, names=[os.path.basename(str(records[i][0])) for i in train],
                                  log=lambda msg: print(msg, flush=True))
    train_seconds = time.time() - t0
    model = cs.load_cryosegnet(model_path, 'cpu')

    probs, t_net = {}, []
    for i in train + test:
        t = time.time()
        probs[i] = cs.predict_map(images[i], model)
        t_net.append(time.time() - t)

    def scores(indices, thr):
        tp = n_pred = n_true = 0
        t_post = []
        for i in indices:
            t = time.time()
            picks = cs.picks_from_map(probs[i], diameter, threshold=thr)
            t_post.append(time.time() - t)
            a, b, c = f1_counts(picks, records[i][2], radius)
            tp, n_pred, n_true = tp + a, n_pred + b, n_true + c
        return summarise(tp, n_pred, n_true), t_post

    sweep = {thr: scores(train, thr)[0] for thr in THRESHOLDS}
    best_thr = max(THRESHOLDS, key=lambda t: sweep[t]['f1'])
    own_thr = float(model.meta.get('threshold', 0.5))
    test_own, _ = scores(test, own_thr)
    test_default, t_post = scores(test, 0.5)
    test_best, _ = scores(test, best_thr)
    dice_default = [pixel_dice(probs[i], masks[i], 0.5) for i in test]
    dice_best = [pixel_dice(probs[i], masks[i], best_thr) for i in test]

    t_chain = None
    try:
        from cryopick_plugin.engine.pick2d import preprocess as preprocess2d
        t = time.time()
        preprocess2d.cryosegnet_chain(images[test[0]], blur=True, nlmeans=True, wiener=True, clahe=True, guided=True)
        t_chain = round(time.time() - t, 2)
    except ImportError:
        pass

    result = {
        'split': {'train': [os.path.basename(str(records[i][0])) for i in train],
                  'test': [os.path.basename(str(records[i][0])) for i in test]},
        'settings': vars(args), 'train_seconds': round(train_seconds, 1),
        'best_epoch': model.meta['best_epoch'], 'best_val_dice': round(model.meta['best_val_dice'], 3),
        'train_threshold_sweep': {str(k): v for k, v in sweep.items()}, 'best_threshold': best_thr,
        'own_threshold': own_thr, 'own_threshold_source': model.meta.get('threshold_source'),
        'own_threshold_val_f1': model.meta.get('threshold_val_f1'), 'test_at_own': test_own,
        'test_at_0.5': test_default, f'test_at_{best_thr}': test_best,
        'test_pixel_dice_mean_at_0.5': round(float(np.mean(dice_default)), 3),
        'test_pixel_dice_max_at_0.5': round(float(np.max(dice_default)), 3),
        f'test_pixel_dice_mean_at_{best_thr}': round(float(np.mean(dice_best)), 3),
        'seconds_per_micrograph': {'preprocessing_chain': t_chain,
                                   'network': round(float(np.mean(t_net)), 2),
                                   'postprocessing': round(float(np.mean(t_post)), 2)},
        'learning_curve': [(h['epoch'], h['train_loss'], round(h['val_dice'], 3)) for h in history],
    }
    with open(os.path.join(args.out, 'bench_cryosegnet.json'), 'w') as fh:
        json.dump(result, fh, indent=2, default=float)
    print(json.dumps(result, indent=2, default=float))


if __name__ == '__main__':
    main()
