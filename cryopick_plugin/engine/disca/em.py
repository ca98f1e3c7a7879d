"""DISCA: unsupervised clustering of subtomograms by YOPO features and Gaussian mixtures.

The generalised EM loop of the DISCA paper (PNAS 2023), ported from its Keras code:

1. features of every subtomogram from the YOPO network (`yopo.py`, eval mode);
2. PCA to 16 dimensions, then a full-covariance Gaussian mixture for each candidate K, in increasing
   order until `k_patience` (5) Ks in a row have not lowered the BIC; the lowest BIC wins. For the
   current K a second mixture is started from the current labels and the better of the two is kept, so a
   good solution is not lost to an unlucky random start;
3. empty clusters are dropped and, when K is unchanged, the new labels are matched to the previous ones
   with the Hungarian method so that cluster numbers keep their meaning between iterations;
4. stop when fewer than 0.1 % of the labels change (same K) or after `max_iter` iterations;
5. score the labels with the distortion-based Davies-Bouldin index (DDBI) of the supplementary material and
   keep the iteration with the lowest one;
6. train: smoothed one-hot labels (the smoothing factor shrinks by 0.9 each iteration), the data plus one
   uniformly random 3D rotation of every subtomogram (corners filled with matching noise), categorical
   hinge loss, Nadam with a learning rate decaying by 0.95 per iteration; when K changed, a new head is
   first trained for a few epochs on the fixed features.

The kept result carries the network weights that produced its features together with the PCA and Gaussian
mixture that produced its labels, so `disca_predict` reproduces the labels of the training data exactly and
assigns new subtomograms to the same clusters with a posterior probability.

Departures from the reference, on purpose: the 'cpu' preset starts from the labels of a Gaussian mixture on
rotation-invariant features of the raw subtomograms (option `init` 'invariants': radial power spectrum, radial
profile and spherical-harmonic shell energies, `features.invariant_features`, reduced to `init_dim`
dimensions, `features.INVARIANT_DIM`) rather than on the features of the untrained network — the reference can
afford many slow iterations to climb out of a poor start, a CPU run cannot, and a random network's features
merge whole classes whose labels the training then entrenches — and it fits every iteration's mixture on the
network's features and those invariant features side by side (option `mixture_view` 'joint':
`mixtures.JointProjection`, each view whitened in its own PCA, then one PCA of both), so that the clustering
keeps what the invariant view holds while the network is still learning it. The model file stores the joint
map, and prediction and the orientation check compute both views (`features.mixture_inputs`; the orientation
check turns the raw subtomograms by the same rotations as the network's copies). It does not accept
convergence before iteration `min_iter` (4), because labels are trivially stable while the network has barely
moved. Measured on simulated sets of five real molecules (bench/README.md §2, sixth and seventh passes; the
table there per condition) the joint view with the invariant start is at least as good as the earlier default
(spectral start, network view) on each of the twelve conditions (SNR 0.1 / 0.03 / 0.01, ±60° / ±40°, two
seeds; 10 meet the issue's goal, against 8): it ends K 5 at SNR 0.1 and 0.03 ±40°, where the network view left
a molecule cut by its orientation to the wedge (the turned copies, assigned with both views, find the other
half), lifts SNR 0.01 ±40° from V-measure 0.36–0.41 to 0.70–0.82, and stops on label stability in a third to a
half of the time at SNR 0.1 and 0.03 ±60°. The 'paper' preset keeps the reference's start (`init` 'network')
and view ('network'); `init` 'spectral' (spectral features alone) is the earlier cpu start.
Opt-in (`init_k`, `init_hold`): a rotation-invariant start with a fixed, larger K (over-clustering, as
DeepCluster trains on), held for the first `init_hold` iterations before BIC chooses K again; measured at
SNR 0.01 ±40° it did not lift the clustering (bench/README.md §2), so it is off. Opt-in `init_epochs`: the
start's labels learnt for that many epochs before the network's own features are clustered (one epoch on
them left features that clustered worse than the start in most runs).
Both presets seed each Gaussian mixture with k-means++ instead of the reference's random responsibilities
(option `gmm_init`; 'random' reproduces the reference), which can leave EM on the saddle where all
components coincide (see `_gmm`). The acquisition's tilt range (option `wedge_tilt`; when not
given, read from the subtomograms' mean power spectrum — `features.known_tilt_range`; 0 turns it off)
drives an orientation check of the kept clusters (`orientation_merge`; `orientation_transfer`,
`orientation_groups`): clusters whose members, rotated with the wedge put back, cross into each other are
one molecule split by its orientation to the wedge and are merged, unless the split check would split
their union; with `wedge_training` (off by default, on in the refinement) the rotated training copies get
the wedge back too.
At the end every kept cluster is tested for being two molecules the network has learnt to call one
(`split_check`, on by default): its members' rotation-invariant spectral features, a view the
network's self-training cannot have merged, are split in two when BIC and a clear separation both say so
(`split_cluster`), and pieces of one molecule that splits of different clusters left apart are joined
again (`_rejoin`; bench/README.md §2). When the split check changed the clusters, the network — still
taught to merge them — is trained on the corrected clusters and the EM loop runs again from them for at
most `refine_iter` iterations (`refine`); a split whose sides the refined network puts back into one
cluster is rejected and not made again (unless its sides stay apart with every member turned and the
wedge put back, `survives_turning`), the refined clustering is kept when its DDBI beats that of the
split labels, and the checks run once more on it. Further: rotations are uniform on SO(3) (scipy) instead of the SVD
of a random matrix; each subtomogram is normalised to zero mean and unit variance; the 'cpu' preset bins
subtomograms to 24³ and uses a quarter of the width; candidate K is a range capped by the data size.
"""
import json
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.decomposition import PCA

from . import yopo
from ..errors import InputError
from ..io.mrc import atomic_path
from ..progress import Progress, compute_summary, duration
from ..settings import resolve_device
from .checks import check_kept, move_stragglers, refine
from .features import (INVARIANT_DIM, JOINT_VIEW_KEY, invariant_embedding, invariant_features, known_tilt_range,
                       random_rotations, spectral_embedding)
from .mixtures import (GMM_INITS, JointProjection, align_labels, bic_dim, candidate_ks, ddbi, fit_mixtures,
                       mixture_state, posterior)

logger = logging.getLogger(__name__)

METHOD = 'disca'

# Training settings for each preset; `disca_cluster(..., options={...})` overrides any of them.
TRAINING = {
    'paper': {'lr': 1e-5, 'batch_size': 64, 'pca_dim': 16, 'reg_covar': 1e-5, 'n_init': 5,
              'gmm_max_iter': 100, 'label_smoothing': 0.2, 'head_epochs': 10, 'head_lr': 1e-4,
              'stable_fraction': 0.999, 'min_per_cluster': 10, 'init': 'network', 'min_iter': 1,
              'wedge_tilt': None, 'wedge_training': False, 'orientation_merge': True, 'gmm_init': 'k-means++',
              'split_check': True, 'refine_iter': 5, 'k_patience': 5},
    # Fewer, shorter iterations on a CPU: a larger learning rate gets the features moving within them.
    'cpu': {'lr': 5e-4, 'batch_size': 16, 'pca_dim': 16, 'reg_covar': 1e-5, 'n_init': 3,
            'gmm_max_iter': 100, 'label_smoothing': 0.2, 'head_epochs': 10, 'head_lr': 1e-3,
            'stable_fraction': 0.999, 'min_per_cluster': 10, 'init': 'invariants', 'min_iter': 4,
            'mixture_view': 'joint',
            'wedge_tilt': None, 'wedge_training': False, 'orientation_merge': True, 'gmm_init': 'k-means++',
            'split_check': True, 'refine_iter': 5, 'k_patience': 5},
}
# The starts from rotation-invariant features (option `init`); 'network' clusters the untrained network's.
INVARIANT_STARTS = {'spectral': spectral_embedding, 'invariants': invariant_embedding}
# their PCA dimensions unless `init_dim` says otherwise (None: the network features' `pca_dim`)
START_DIMS = {'spectral': None, 'invariants': INVARIANT_DIM}

# What each iteration's mixture is fitted on (option `mixture_view`): the network's features (the
# reference), or those and the raw subtomograms' rotation-invariant features side by side
# (`mixtures.JointProjection`), so that what the start saw is not lost while the network learns it.
MIXTURE_VIEWS = ('network', 'joint')

# 20 for the cpu preset too: at SNR 0.1 and 0.03 a run stops on label stability by iteration 9–11 anyway,
# while at SNR 0.01 the clusters keep sharpening to the end (homogeneity after the split check 0.849 at 10
# iterations, 0.875 at 20; bench/README.md §2).
DEFAULT_MAX_ITER = {'paper': 20, 'cpu': 20}


# ------------------------------------------------------------------------------------------- result

@dataclass
class DiscaResult:
    """What `disca_cluster` returns. Labels are 0-based; `k` clusters."""
    labels: np.ndarray                 # (N,) cluster of each subtomogram, 0..k-1, at the kept iteration
    probabilities: np.ndarray          # (N, k) Gaussian-mixture posterior of each cluster
    k: int
    best_iteration: int
    history: list                      # one dict per iteration (see disca_cluster)
    features: np.ndarray               # (N, feature_dim) network features of the kept iteration
    features_pca: np.ndarray           # (N, d) their PCA projection, where the mixture was fitted
    embeddings: list                   # per iteration: (N, 2) float32, first two PCA components
    iteration_labels: list             # per iteration: (N,) labels
    model_state: dict                  # network + PCA + mixture tensors, for save_disca_model
    arch: dict
    options: dict
    meta: dict = field(default_factory=dict)
    # labels after the first pass of the checks, before refinement re-trained on them (None without one)
    unrefined_labels: np.ndarray = None

    def class_sizes(self):
        return np.bincount(self.labels, minlength=self.k).tolist()


# --------------------------------------------------------------------------------------- main loop
def _train_head(head, features, targets, options, generator, device):
    """Train a new head alone on fixed features (reference: 10 epochs, Nadam 1e-4, categorical hinge)."""
    head.train()
    opt = torch.optim.NAdam(head.parameters(), lr=options['head_lr'], betas=(0.9, 0.999), eps=1e-8)
    f = torch.from_numpy(features).to(device)
    t = torch.from_numpy(targets).to(device)
    bs = options['batch_size']
    for _ in range(options['head_epochs']):
        order = torch.randperm(len(f), generator=generator)
        for start in range(0, len(f), bs):
            idx = order[start:start + bs].to(device)
            loss = yopo.categorical_hinge(head(f[idx]), t[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


def _train_epoch(net, head, opt, data, targets, options, generator, device, progress=None, precision='fp32'):
    """One epoch over (data, targets) in random order; returns the mean loss. `progress`: a
    `progress.Progress` counting batches; precision: the network's arithmetic ('fp32' or 'bf16' autocast)."""
    from ..settings import autocast
    net.train()
    head.train()
    order = torch.randperm(len(data), generator=generator).numpy()
    bs = options['batch_size']
    total, count = 0.0, 0
    for start in range(0, len(data), bs):
        idx = order[start:start + bs]
        if len(idx) < 2:  # batch norm needs two samples
            continue
        x = torch.from_numpy(data[idx][:, None]).to(device)
        t = torch.from_numpy(targets[idx]).to(device)
        with autocast(device, precision):
            p = head(net(x))
        loss = yopo.categorical_hinge(p.float(), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(idx)
        count += len(idx)
        if progress is not None:
            progress.update(note=lambda: f'loss {total / max(count, 1):.4f}')
    return total / max(count, 1)


def _precision(opts, device):
    """The precision a run's options ask for, resolved (None: the network runs in fp32, no option)."""
    if not opts.get('precision'):
        return None
    from ..settings import resolve_precision
    return resolve_precision(opts['precision'], device)


def _features_with_progress(net, data, device, batch_size, say, label, precision='fp32'):
    """`yopo.extract_features` in chunks of whole batches — the same batches, so the same features — with
    a progress line every few seconds."""
    progress = Progress(label, len(data), unit='subtomogram', say=say)
    chunk = 8 * batch_size
    out = []
    for start in range(0, len(data), chunk):
        out.append(yopo.extract_features(net, data[start:start + chunk], device, batch_size=batch_size,
                                         precision=precision))
        progress.update(len(out[-1]))
    return np.concatenate(out, axis=0)


def _write_progress(out_dir, history, embeddings, iteration_labels):
    with atomic_path(os.path.join(out_dir, 'history.json')) as tmp:
        with open(tmp, 'w') as fh:
            json.dump({'iterations': history}, fh, indent=1)
    with atomic_path(os.path.join(out_dir, 'embeddings.npz'), suffix='.npz') as tmp:
        with open(tmp, 'wb') as fh:
            np.savez_compressed(fh, embeddings=np.stack(embeddings), labels=np.stack(iteration_labels))


def disca_cluster(stack, preset='cpu', k_range=(2, 20), max_iter=None, seed=0, device='auto', log=None,
                  out_dir=None, arch=None, options=None):
    """Cluster a stack of subtomograms with DISCA.

    stack: (N, b, b, b) array (b ≥ 21 after binning); preset: 'cpu' or 'paper' (network width, input box
    and training settings); k_range: (smallest, largest) number of clusters tried, the largest capped at
    N // min_per_cluster; max_iter: EM iterations (preset default); seed: makes the run reproducible;
    device: 'auto' | 'cpu' | 'cuda'; log: callable receiving one progress line per iteration; out_dir:
    when given, history.json and embeddings.npz there are rewritten after every iteration; arch / options:
    dictionaries overriding the preset's architecture (`yopo.PRESETS`) and training settings (`TRAINING`).

    Returns a DiscaResult. Each history entry holds: iteration, phase ('cluster', or 'refine' for the EM
    iterations run again after the split check changed the clusters — `refine`), k, bic (of the chosen
    mixture), bic_by_k, ddbi, changed (fraction of labels that changed, 1.0 at the first iteration), loss (training loss after
    the clustering of that iteration, None when not trained), lr, smoothing, head_k (outputs of the head
    trained), head_rebuilt (a new head was made because K changed), sizes, time_s.
    """
    preset_name = preset if isinstance(preset, str) else 'cpu'
    arch = yopo.make_arch(preset if arch is None else arch)
    opts = dict(TRAINING.get(preset_name, TRAINING['cpu']))
    opts.update(options or {})
    if opts.get('mixture_view', 'network') not in MIXTURE_VIEWS:
        raise InputError('mixture_view', f"unknown mixture view {opts['mixture_view']!r} ({', '.join(MIXTURE_VIEWS)})")
    if opts.get('gmm_init', 'k-means++') not in GMM_INITS:
        raise InputError('gmm_init', f"unknown mixture initialisation {opts['gmm_init']!r} "
                                     f"({', '.join(GMM_INITS)})")
    max_iter = int(max_iter or DEFAULT_MAX_ITER.get(preset_name, 12))
    if max_iter < 1:
        raise InputError('max_iter', 'must be at least 1')
    device = resolve_device(device)
    say = log or (lambda line: logger.info('%s', line))

    data = yopo.prepare_stack(stack, arch)
    n = len(data)
    precision = _precision(opts, device)  # None: fp32, the network's arithmetic without a precision option
    say(f"DISCA: {n} subtomograms (network box {data.shape[-1]}³, preset {preset_name}), at most {max_iter} "
        f"iterations; {compute_summary(device, precision, opts.get('precision'))}")
    precision = precision or 'fp32'
    opts['wedge_tilt'], wedge = known_tilt_range(stack, opts.get('wedge_tilt'), say, opts.get('wedge_estimate', True))
    ks = candidate_ks(n, k_range, opts['min_per_cluster'])
    # A full covariance in d dimensions is singular with fewer than d + 1 members; with small data the PCA
    # is narrowed so that even the largest K leaves every cluster more members than dimensions.
    pca_dim = int(max(2, min(opts['pca_dim'], arch['feature_dim'], n // ks[-1] - 1, n - 1, bic_dim(n))))
    if len(ks) and ks[-1] < int(k_range[1]):
        say(f'K capped at {ks[-1]} for {n} subtomograms ({opts["min_per_cluster"]} per cluster at least)')

    # The opt-in over-clustered start: the mixtures of the first iterations (the spectral start, and
    # `init_hold` of them in all) are fitted at K = init_k alone.
    init_ks = [int(min(opts.get('init_k') or 0, ks[-1]))]
    rotation_invariant_start = opts.get('init') in INVARIANT_STARTS
    init_iterations = (max(int(opts.get('init_hold') or 0), int(rotation_invariant_start))
                       if opts.get('init_k') else 0)

    joint_view = opts.get('mixture_view', 'network') == 'joint'
    invariants = invariant_features(stack) if joint_view else None

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)

    with yopo.DeterministicTorch(device):
        net = yopo.build_features(arch).to(device)
        history, embeddings, iteration_labels = [], [], []
        loop = {'head': None, 'opt': None, 'k': None, 'labels': None, 'iteration_labels': iteration_labels,
                'smoothing': float(opts['label_smoothing']), 'lr': float(opts['lr'])}

        def train(features, labels, k, rebuild, label='training', epochs=1):
            """`epochs` epochs (one by default) on smoothed labels, each with fresh random rotations, a new
            head first when K changed; returns the history fields of the training (the last epoch's loss).
            `label` heads its progress lines."""
            loop['smoothing'] *= 0.9
            one_hot = np.eye(k, dtype=np.float32)[labels]
            targets = one_hot * (1.0 - loop['smoothing']) + loop['smoothing'] / k
            if rebuild:
                loop['head'] = yopo.YOPOHead(arch['feature_dim'], k).to(device)
                _train_head(loop['head'], features, one_hot, opts, generator, device)
                loop['opt'] = torch.optim.NAdam(list(net.parameters()) + list(loop['head'].parameters()),
                                                lr=loop['lr'], betas=(0.9, 0.999), eps=1e-8)
            loop['lr'] *= 0.95
            for group in loop['opt'].param_groups:
                group['lr'] = loop['lr']
            for epoch in range(epochs):
                augmented = np.concatenate([data, random_rotations(data, rng,
                                                                   tilt_range=opts.get('wedge_tilt')
                                                                   if opts.get('wedge_training', True) else None)])
                loss = _train_epoch(net, loop['head'], loop['opt'], augmented, np.tile(targets, (2, 1)), opts,
                                    generator, device,
                                    Progress(label if epochs == 1 else f'{label} (epoch {epoch + 1} of {epochs})',
                                             -(-len(augmented) // opts['batch_size']), unit='batch',
                                             units='batches', say=say), precision)
            return {'loss': loss, 'lr': loop['lr'], 'smoothing': loop['smoothing'], 'head_k': loop['head'].k,
                    'head_rebuilt': bool(rebuild), 'epochs': int(epochs)}

        def iterate(first, count, eligible_from, min_iter, phase):
            """EM iterations first .. first + count - 1 (features → PCA → mixtures → training); returns the
            eligible iteration with the lowest DDBI (None when none was eligible)."""
            best = None
            # counts iterations for the ETA of the iteration lines (no lines of its own)
            done = Progress(phase, count, unit='iteration', say=say, every=float('inf'))
            for it in range(first, first + count):
                t0 = time.time()
                features = _features_with_progress(net, data, device, max(opts['batch_size'], 64), say,
                                                   f'iteration {it}: features', precision)
                t_features = time.time() - t0
                if joint_view:
                    inputs = np.concatenate([features.astype(np.float64), invariants], axis=1)
                    pca = JointProjection(pca_dim, features.shape[1], seed=seed).fit(inputs)
                    x = pca.transform(inputs)
                else:
                    pca = PCA(n_components=pca_dim, random_state=seed).fit(features)
                    x = pca.transform(features)
                if it == 0 and count > 1 and rotation_invariant_start:
                    # First labels from rotation-invariant features instead of an untrained network's
                    # (see the module doc); the network then learns from them. Such an iteration is never
                    # kept (its mixture lives in another feature space than the network's), so a
                    # one-iteration run clusters the network's features as the reference does.
                    start_dim = min(int(opts.get('init_dim') or START_DIMS.get(opts['init']) or pca_dim), pca_dim)
                    x = INVARIANT_STARTS[opts['init']](stack, start_dim, seed)
                t1 = time.time()
                held = phase == 'cluster' and count > 1 and it < init_iterations
                new_labels, gmm, components, bics = fit_mixtures(x, init_ks if held else ks, opts, seed + it,
                                                                 loop['k'], loop['labels'])
                t_mixtures = time.time() - t1
                new_k = int(new_labels.max()) + 1
                same_k = new_k == loop['k']
                if same_k:
                    aligned = align_labels(loop['labels'], new_labels)
                    # Keep the component → label map in step with the renumbering.
                    components = components[np.argsort([aligned[new_labels == j][0] for j in range(new_k)])]
                    new_labels = aligned
                changed = 1.0 if loop['labels'] is None else float(np.mean(new_labels != loop['labels']))
                labels = loop['labels'] = new_labels
                k = loop['k'] = new_k
                score = ddbi(x, labels, opts['reg_covar'])
                embeddings.append(x[:, :2].astype(np.float32))
                iteration_labels.append(labels.copy())
                entry = {'iteration': it, 'phase': phase, 'k': k, 'bic': bics[int(gmm.n_components)],
                         'bic_by_k': {str(kk): v for kk, v in bics.items()}, 'ddbi': score, 'changed': changed,
                         'loss': None, 'lr': None, 'smoothing': None, 'head_k': None, 'head_rebuilt': False,
                         'epochs': 0,
                         'sizes': np.bincount(labels, minlength=k).tolist()}
                if it >= eligible_from and (best is None or score < best['ddbi']):
                    label_of = np.full(gmm.n_components, -1, dtype=np.int64)
                    for j in range(k):
                        label_of[components[j]] = j
                    state = {f'net.{key}': v.detach().cpu().clone() for key, v in net.state_dict().items()}
                    state.update(mixture_state(pca, gmm, label_of))
                    if joint_view:
                        state[JOINT_VIEW_KEY] = torch.tensor(1)
                    best = {'iteration': it, 'ddbi': score, 'labels': labels.copy(), 'k': k, 'state': state,
                            'features': features, 'x': x, 'probabilities': posterior(x, state)}
                converged = (it - first >= min_iter and same_k and (1.0 - changed) > opts['stable_fraction'])
                last = converged or it == first + count - 1
                t2 = time.time()
                if not last:
                    # A rotation-invariant start's labels are learnt for `init_epochs` epochs before the
                    # network's own features are clustered: see the module doc.
                    epochs = (int(opts.get('init_epochs') or 1)
                              if it == 0 and phase == 'cluster' and rotation_invariant_start else 1)
                    entry.update(train(features, labels, k, not same_k, label=f'iteration {it}: training',
                                       epochs=epochs))
                entry['time_s'] = time.time() - t0
                history.append(entry)
                done.update()
                say(f"iteration {it}: K={k} BIC={entry['bic']:.1f} DDBI={score:.4f} changed={changed:.3f} "
                    f"loss={entry['loss'] if entry['loss'] is None else round(entry['loss'], 4)} "
                    f"sizes={entry['sizes']} {entry['time_s']:.1f}s (features {duration(t_features)}, mixtures "
                    f"{duration(t_mixtures)}, training {duration(time.time() - t2)})"
                    + ('' if last else f", ETA ≤ {duration(done.eta)} for the {phase} phase"))
                if out_dir:
                    _write_progress(out_dir, history, embeddings, iteration_labels)
                if last:
                    return best
            return best

        # The reference keeps only iterations of a trained network when there are any.
        best = iterate(0, max_iter, 1 if max_iter > 1 else 0, max(1, int(opts.get('min_iter', 1))), 'cluster')
        say(f"kept iteration {best['iteration']}: K={best['k']} DDBI={best['ddbi']:.4f}")
        meta = {'input_box': int(np.asarray(stack).shape[-1]), 'network_box': int(data.shape[-1]),
                'n_train': n, 'seed': seed, 'preset': preset_name, 'pca_dim': pca_dim, 'k_candidates': ks,
                'normalisation': 'per-subtomogram zero mean, unit variance',
                'prediction': ('network and rotation-invariant features -> joint PCA -> Gaussian mixture posterior'
                               if joint_view else 'network features -> PCA -> Gaussian mixture posterior'),
                'wedge': wedge}
        best = check_kept(best, stack, data, arch, opts, ks, rng, seed, device, say, meta)
        refine_iter = int(opts.get('refine_iter', 0) or 0)
        unrefined = None
        if refine_iter > 0 and any(t.get('accepted') for t in meta.get('split_check', [])):
            unrefined = best['labels']
            best = refine(best, net, loop, train, iterate, data, len(history), refine_iter, stack, arch, opts,
                           ks, rng, seed, device, say, meta)
        if opts.get('split_check', True) and opts.get('move_stragglers', True):
            best, meta['stragglers'] = move_stragglers(best, stack, opts, seed, say)
            if 'straggler.means' in best['state']:
                meta['prediction'] += ' -> stragglers moved (move_stragglers)'
    meta.update({'k': best['k'], 'best_iteration': best['iteration'], 'ddbi': best['ddbi'],
                 'iterations': len(history)})
    return DiscaResult(labels=best['labels'], probabilities=best['probabilities'], k=best['k'],
                       best_iteration=best['iteration'], history=history, features=best['features'],
                       features_pca=best['x'], embeddings=embeddings, iteration_labels=iteration_labels,
                       model_state=best['state'], arch=arch, options=opts, meta=meta,
                       unrefined_labels=unrefined)
