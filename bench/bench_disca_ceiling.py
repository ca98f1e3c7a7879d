"""How well DISCA's inputs can tell the molecules apart at all: supervised ceilings on a simulated set.

DISCA is unsupervised; when it mixes molecules at a noise level and wedge (bench/README.md §2, SNR 0.01
±40°), the question is whether the clustering fails or the data and the network cannot hold the
difference. This bench answers it with the truth in hand, on the same simulated set as `bench_disca.py`
(same condition, size and seed — `bench_disca.simulate`):

  network    the 'cpu' preset's YOPO network and head (`yopo`, same binning and normalisation as DISCA)
             trained on the true classes of a stratified 80 % (with DISCA's augmentation: one uniformly
             random rotation of every subtomogram per epoch, corners filled with matching noise), scored on
             the other 20 % after every epoch
  spectral   logistic regression on the rotation-invariant spectral features DISCA starts from and splits
             on (`features.spectral_features`), same split

For each: held-out accuracy and V-measure of the predicted classes against the true ones. An unsupervised
method cannot be expected to beat these by much; when they sit below the V-measure an issue asks for, the
shortfall is in the data (or in what this network can learn from it), not in the clustering.

  .venv/bin/python bench/bench_disca_ceiling.py --out bench/results/disca_ceiling --conditions snr0.01_w40,snr0.01_w60 --n-per-class 200 --seed 0 --threads 1
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, confusion_matrix, v_measure_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_disca  # noqa: E402
from cryopick_plugin.engine.disca import features, yopo  # noqa: E402


def _scores(truth, predicted):
    classes = np.arange(int(max(truth.max(), predicted.max())) + 1)
    return {'accuracy': float(accuracy_score(truth, predicted)),
            'v_measure': float(v_measure_score(truth, predicted)),
            'confusion': confusion_matrix(truth, predicted, labels=classes).tolist()}


def network_ceiling(stack, labels, train_idx, test_idx, epochs, seed, lr=5e-4, batch_size=16, say=print):
    """Train the cpu preset's network + head on the true classes; held-out scores after every epoch.

    Unlike DISCA's self-training (`em._train_epoch`: smoothed pseudo-labels, categorical hinge) the loss is
    the likelihood of the true class, the best a supervised classifier can be given for a ceiling."""
    arch = yopo.make_arch('cpu')
    data = yopo.prepare_stack(stack, arch)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    k = int(labels.max()) + 1
    net, head = yopo.build_features(arch), yopo.YOPOHead(arch['feature_dim'], k)
    opt = torch.optim.NAdam(list(net.parameters()) + list(head.parameters()), lr=lr)
    per_epoch = []
    for epoch in range(epochs):
        t0 = time.time()
        x_train = np.concatenate([data[train_idx], features.random_rotations(data[train_idx], rng)])
        y_train = np.tile(labels[train_idx], 2)
        net.train()
        head.train()
        order = torch.randperm(len(x_train), generator=generator).numpy()
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2:
                continue
            p = head(net(torch.from_numpy(x_train[idx][:, None])))
            loss = torch.nn.functional.nll_loss(torch.log(p + 1e-8), torch.from_numpy(y_train[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        net.eval()
        head.eval()
        with torch.no_grad():
            probabilities = head(torch.from_numpy(yopo.extract_features(net, data[test_idx]))).numpy()
        scores = _scores(labels[test_idx], probabilities.argmax(axis=1))
        scores.update({'epoch': epoch, 'loss': total / len(order), 'time_s': time.time() - t0})
        per_epoch.append(scores)
        say(f"  epoch {epoch}: loss {scores['loss']:.3f}, held-out accuracy {scores['accuracy']:.3f}, "
            f"V {scores['v_measure']:.3f} ({scores['time_s']:.0f} s)")
    return per_epoch


def spectral_ceiling(stack, labels, train_idx, test_idx):
    x = features.spectral_features(stack)
    scaler = StandardScaler().fit(x[train_idx])
    model = LogisticRegression(max_iter=5000, C=1.0).fit(scaler.transform(x[train_idx]), labels[train_idx])
    return _scores(labels[test_idx], model.predict(scaler.transform(x[test_idx])))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', required=True)
    parser.add_argument('--conditions', default='snr0.01_w40,snr0.01_w60')
    parser.add_argument('--n-per-class', type=int, default=200)
    parser.add_argument('--box', type=int, default=32)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--epochs', type=int, default=15)
    parser.add_argument('--threads', type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    for name in args.conditions.split(','):
        snr, tilt, n_cond, _ = bench_disca.CONDITIONS[name]
        t0 = time.time()
        sim = bench_disca.simulate(n_cond or args.n_per_class, snr, tilt, args.box, args.seed)
        stack, labels = np.asarray(sim.stack, dtype=np.float32), np.asarray(sim.labels)
        train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels,
                                               random_state=args.seed)
        print(f'{name}: {len(train_idx)} training, {len(test_idx)} held out', flush=True)
        spectral = spectral_ceiling(stack, labels, train_idx, test_idx)
        print(f"  spectral, logistic regression: accuracy {spectral['accuracy']:.3f}, V {spectral['v_measure']:.3f}",
              flush=True)
        network = network_ceiling(stack, labels, train_idx, test_idx, args.epochs, args.seed,
                                  say=lambda line: print(line, flush=True))
        record = {'condition': name, 'snr': snr, 'tilt_range': tilt, 'n': int(len(labels)), 'seed': args.seed,
                  'threads': args.threads, 'date': time.strftime('%Y-%m-%d %H:%M'), 'epochs': args.epochs,
                  'spectral_logistic': spectral, 'network': network,
                  'network_best_epoch': max(network, key=lambda s: s['accuracy']), 'time_s': time.time() - t0}
        with open(os.path.join(args.out, f'{name}_seed{args.seed}.json'), 'w') as fh:
            json.dump(record, fh, indent=1)


if __name__ == '__main__':
    main()
