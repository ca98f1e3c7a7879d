"""Benchmark of DISCA clustering on simulated subtomograms of real macromolecules.

Each condition is one run: 5 templates (4v4r, 3j9i, 4v94, 4cr2, 1qvr from shared/data/templates_10A),
`--n-per-class` copies each, simulated by `engine.sim.subtomograms.simulate_subtomograms` (the realistic
model: random RELION orientations, |CTF| of a phase-flipped tomogram at 4 µm underfocus, missing wedge about
the Y axis at ±θ applied to signal and noise, dark contrast, SNR = var(filtered signal) / var(filtered
noise) over the box, as issue 4 defines it; templates binned together until the largest fits the box).
It compares:

  disca      `disca_cluster` with the chosen preset (K estimated by BIC over --k-min..--k-max)
  raw        PCA + Gaussian mixtures with BIC on the voxels (non-deep baseline)
  spectral   the same on rotation-invariant features (radial power spectrum + radial profile)
  invariants the same on those and spherical-harmonic shell energies (`features.harmonic_features`)

and records estimated K, accuracy (Hungarian), homogeneity, completeness, V-measure and time per
iteration. With --analysis, also: each cluster's average after undoing the simulated orientations,
correlated with every template (and the same for the true classes, as the ceiling), and the paper's Fig. 3B
distances between features of randomly rotated copies, same-class and different-class subtomograms. Timing conditions (time_1k, time_2k, time_5k) run two DISCA iterations on N subtomograms.

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

from cryopick_plugin.engine.disca import baseline, checks, em, features, mixtures, model  # noqa: E402
from cryopick_plugin.engine import geometry
from cryopick_plugin.engine.sim.ctf import ctf_1d  # noqa: E402
from cryopick_plugin.engine.sim.subtomograms import simulate_subtomograms  # noqa: E402
from cryopick_plugin.engine.sim.tomograms import AMPLITUDE_CONTRAST, CS_MM, VOLTAGE_KV, _paste  # noqa: E402
from cryopick_plugin.engine.sim.templates import load_templates  # noqa: E402

TEMPLATES = ['4v4r', '3j9i', '4v94', '4cr2', '1qvr']

# name: (SNR, tilt range in degrees or None for no wedge, N per class or None for --n-per-class, kind)
CONDITIONS = {
    'snr0.1_w60': (0.1, 60, None, 'cluster'),
    'snr0.03_w60': (0.03, 60, None, 'cluster'),
    'snr0.01_w60': (0.01, 60, None, 'cluster'),
    'snr0.03_w40': (0.03, 40, None, 'cluster'),
    'snr0.1_w40': (0.1, 40, None, 'cluster'),
    'snr0.01_w40': (0.01, 40, None, 'cluster'),
    'time_1k': (0.1, 60, 200, 'time'),
    'time_2k': (0.1, 60, 400, 'time'),
    'time_5k': (0.1, 60, 1000, 'time'),
    'smoke': (0.1, 60, 12, 'cluster'),
}


def simulate(n_per_class, snr, tilt, box, seed):
    """The realistic subtomogram simulator's output (stack, labels 0..4, eulers, meta)."""
    return simulate_subtomograms(classes=tuple(TEMPLATES), n_per_class=n_per_class, box=box, snr=snr,
                                 tilt_range=tilt or 90.0, seed=seed)


def _pearson_in_sphere(a, b):
    box = a.shape[-1]
    r = np.sqrt(((np.indices(a.shape) - (box - 1) / 2.0) ** 2).sum(axis=0)) <= box / 2.0
    x, y = a[r] - a[r].mean(), b[r] - b[r].mean()
    return float((x * y).sum() / (np.sqrt((x * x).sum() * (y * y).sum()) + 1e-12))


def _filtered_templates(sim):
    """Each class's template at the identity orientation, pasted as the simulator pastes it, filtered by
    the same |CTF| (no wedge: averaging over orientations fills it) and made dark like the data."""
    from scipy import fft
    box, vox = sim.stack.shape[-1], sim.meta['voxel_size']
    temps = load_templates(TEMPLATES, voxel_size=vox)
    freq = np.sqrt(sum(np.square(np.fft.fftfreq(box, d=vox))[tuple(sl)] for sl in
                       ([slice(None), None, None], [None, slice(None), None], [None, None, slice(None)])))
    ctf = np.abs(ctf_1d(freq, float(sim.meta['defocus_um'][0]), VOLTAGE_KV, CS_MM, AMPLITUDE_CONTRAST))
    out = []
    for name in sim.class_names:
        vol = np.zeros((box,) * 3, np.float32)
        _paste(vol, geometry.particle_from_reference(temps[name], 0, 0, 0), (box // 2,) * 3)
        out.append(-np.real(fft.ifftn(fft.fftn(vol) * ctf)).astype(np.float32))
    return out


def _unrotated(volume, eulers):
    """A subtomogram turned back to the reference frame about voxel box//2 (where the simulator pasted the
    particle): padded to an odd box so that voxel is the rotation centre, then cropped back."""
    box = volume.shape[-1]
    padded = np.pad(volume, [(0, 1 - box % 2)] * 3)
    return geometry.reference_from_particle(padded, *eulers)[:box, :box, :box]


def class_averages(sim, labels):
    """Per cluster: the average of its members after undoing their simulated orientations, correlated
    (Pearson inside the inscribed sphere, both blurred by σ = 1 voxel) with every class's template."""
    from scipy.ndimage import gaussian_filter
    templates = [gaussian_filter(t, 1.0) for t in _filtered_templates(sim)]
    rows = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        avg = np.mean([_unrotated(sim.stack[i], sim.eulers[i]) for i in members], axis=0)
        cc = [_pearson_in_sphere(gaussian_filter(avg, 1.0), t) for t in templates]
        truth = np.bincount(sim.labels[members], minlength=len(templates))
        major = int(np.argmax(truth))
        rows.append({'cluster': int(c), 'size': int(len(members)), 'majority_class': sim.class_names[major],
                     'purity': round(float(truth[major] / len(members)), 4),
                     'cc_majority_template': round(cc[major], 4),
                     'cc_best_other_template': round(max(v for j, v in enumerate(cc) if j != major), 4),
                     'cc_all': {n: round(v, 4) for n, v in zip(sim.class_names, cc)}})
    return rows


def rotation_distances(sim, model_path, per_class=10, copies=6, seed=0, device='auto'):
    """The paper's Fig. 3B: feature distances between randomly rotated copies of one subtomogram, between
    subtomograms of one class and between classes, in the kept model's PCA space (where the mixture is
    fitted) and, for comparison, on the standardised rotation-invariant spectral features."""
    rng = np.random.default_rng(seed + 11)
    picked = np.concatenate([np.flatnonzero(sim.labels == k)[:per_class] for k in range(len(sim.class_names))])
    source = np.repeat(picked, copies)
    rotated = features.random_rotations(sim.stack[source], rng)
    _, x, _ = model.disca_features(rotated, model_path, device=device)
    spec = features.spectral_features(rotated)
    spec = (spec - spec.mean(axis=0)) / (spec.std(axis=0) + 1e-8)
    cls = sim.labels[source]
    iu = np.triu_indices(len(source), 1)
    same_sub = (source[:, None] == source[None, :])[iu]
    same_cls = (cls[:, None] == cls[None, :])[iu]
    out = {'subtomograms': int(len(picked)), 'copies_each': int(copies)}
    for name, feat in (('disca_pca', x), ('spectral', spec)):
        d = np.sqrt(((feat[:, None, :] - feat[None, :, :]) ** 2).sum(-1))[iu]
        groups = {'rotated_copies': d[same_sub], 'same_class': d[same_cls & ~same_sub], 'between_classes': d[~same_cls]}
        stats = {g: {'mean': round(float(v.mean()), 4), 'std': round(float(v.std()), 4)} for g, v in groups.items()}
        stats['ratio_same_class_over_between'] = round(float(groups['same_class'].mean() / groups['between_classes'].mean()), 4)
        stats['ratio_copies_over_between'] = round(float(groups['rotated_copies'].mean() / groups['between_classes'].mean()), 4)
        out[name] = stats
    return out


def _merged_labels(result):
    """The kept iteration's labels after the orientation check's merges (before any split)."""
    groups = result.meta['orientation_merge']['groups']
    return checks.group_index(groups)[result.iteration_labels[result.best_iteration]]


def run_condition(name, args):
    snr, tilt, n_cond, kind = CONDITIONS[name]
    n_per_class = n_cond or args.n_per_class
    t0 = time.time()
    sim = simulate(n_per_class, snr, tilt, args.box, args.seed)
    stack, truth, meta = sim.stack, sim.labels, sim.meta
    record = {'condition': name, 'snr': snr, 'tilt_range': tilt, 'n_per_class': n_per_class,
              'n': len(stack), 'box': args.box, 'templates': TEMPLATES, 'preset': args.preset,
              'seed': args.seed, 'simulation_s': time.time() - t0, 'simulator': 'simulate_subtomograms',
              'simulated_voxel_size': meta['voxel_size'], 'binning': meta['binning'],
              'defocus_um': meta['defocus_um'], 'threads': args.threads, 'date': time.strftime('%Y-%m-%d %H:%M'),
              'disca_options': {k: em.TRAINING[args.preset].get(k) for k in ('init', 'min_iter', 'lr', 'gmm_init')}}
    # By default DISCA reads the tilt range from the data (as `cryopick disca` on a STAR file without one);
    # --orientation-check / --wedge give the condition's own, --no-wedge turns the wedge handling off.
    options = {'wedge_tilt': float(tilt)} if args.wedge or args.orientation_check else {}
    if args.no_wedge:
        options['wedge_tilt'] = 0.0
    options['split_check'] = args.split_check
    if args.refine_iter is not None:
        options['refine_iter'] = args.refine_iter
    if args.wedge:
        options['wedge_training'] = True
    # options passed through when given on the command line
    for key in ('precision', 'init_k', 'init_hold', 'init_epochs', 'init', 'init_dim', 'mixture_view'):
        if getattr(args, key):
            options[key] = getattr(args, key)
    record['disca_options'].update(options)
    k_range = (args.k_min, args.k_max)
    if kind == 'time':
        result = em.disca_cluster(stack, preset=args.preset, k_range=k_range, max_iter=2, seed=args.seed,
                                     device=args.device, log=print)
        record['time_per_iteration_s'] = result.history[0]['time_s']  # features + GMMs + one training epoch
        record['history'] = result.history
        return record
    t0, c0 = time.time(), time.process_time()
    # history.json and embeddings.npz (every iteration's labels) rewritten after each iteration, to follow a
    # long run against the truth while it runs
    result = em.disca_cluster(stack, preset=args.preset, k_range=k_range, max_iter=args.max_iter,
                              seed=args.seed, device=args.device, log=print, options=options,
                              out_dir=os.path.join(args.out, f'{name}_progress'))
    record['disca'] = dict(mixtures.clustering_scores(truth, result.labels), time_s=time.time() - t0,
                           cpu_s=time.process_time() - c0, iterations=len(result.history),
                           best_iteration=result.best_iteration,
                           time_per_iteration_s=float(np.mean([h['time_s'] for h in result.history])),
                           per_iteration=[dict(mixtures.clustering_scores(truth, lab), ddbi=h['ddbi'])
                                          for lab, h in zip(result.iteration_labels, result.history)],
                           contingency={f'cluster {c}': np.bincount(truth[result.labels == c],
                                                                    minlength=len(TEMPLATES)).tolist()
                                        for c in range(result.k)})
    record['disca']['wedge'] = result.meta.get('wedge')
    for key in ('orientation_merge', 'split_check', 'refine'):
        if key in result.meta:
            record['disca'][key] = result.meta[key]
    if result.meta.get('split_check') is not None:
        # the kept iteration before any split, to show what the split check changed
        record['disca']['before_split_check'] = mixtures.clustering_scores(
            truth, result.iteration_labels[result.best_iteration] if 'orientation_merge' not in result.meta
            else _merged_labels(result))
    if result.unrefined_labels is not None:
        record['disca']['before_refine'] = mixtures.clustering_scores(truth, result.unrefined_labels)
    aligned = {}
    if args.align_refine:
        # what `cryopick disca --align-refine` does after the network: the same call, on the same tilt range
        from cryopick_plugin.engine.disca import align
        t0, c0 = time.time(), time.process_time()
        out = align.run(stack, result.labels, result.features, tilt_range=result.options.get('wedge_tilt'),
                        n_rotations=args.align_orientations, seed=args.seed, say=print)
        record['align_refine'] = dict(mixtures.clustering_scores(truth, out['labels']), time_s=time.time() - t0,
                                      cpu_s=time.process_time() - c0, tests=out['record']['tests'],
                                      contingency={f'cluster {c}': np.bincount(truth[out['labels'] == c],
                                                                               minlength=len(TEMPLATES)).tolist()
                                                   for c in range(out['record']['k'])})
        aligned = {'aligned_labels': out['labels']}
    # labels, truth, simulated orientations and the kept iteration's network features, to look at how a
    # class is split (and to try a check on the features without training again)
    np.savez_compressed(os.path.join(args.out, f'{name}_labels.npz'), labels=result.labels, truth=truth, **aligned,
                        iteration_labels=np.stack(result.iteration_labels),
                        features=np.asarray(result.features, dtype=np.float32),
                        eulers=np.asarray(sim.eulers), class_names=np.asarray(sim.class_names))
    if args.analysis:
        model_path = os.path.join(args.out, f'{name}_model.pt')
        model.save_disca_model(model_path, result)
        t0 = time.time()
        record['class_averages'] = class_averages(sim, result.labels)
        record['truth_class_averages'] = class_averages(sim, truth)
        record['rotation_distances'] = rotation_distances(sim, model_path, seed=args.seed, device=args.device)
        record['analysis_s'] = time.time() - t0
    for kind in ('raw', 'spectral', 'invariants'):
        t0, c0 = time.time(), time.process_time()
        labels, _ = baseline.baseline_cluster(stack, k_range, seed=args.seed, features=kind)
        record[kind] = dict(mixtures.clustering_scores(truth, labels), time_s=time.time() - t0,
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
    parser.add_argument('--precision', default=None, choices=['fp32', 'bf16', 'auto'],
                        help="the network's arithmetic (default: fp32, as `cryopick disca`)")
    parser.add_argument('--orientation-check', action='store_true',
                        help="give DISCA the condition's tilt range for the orientation check only (training "
                             "copies without the wedge, as by default)")
    parser.add_argument('--wedge', action='store_true',
                        help="give the condition's tilt range and re-impose its missing wedge on the rotated "
                             "training copies too")
    parser.add_argument('--no-wedge', action='store_true',
                        help="DISCA without any tilt range (wedge_tilt 0: no orientation checks), as before the "
                             "tilt range was read from the data")
    parser.add_argument('--no-split-check', dest='split_check', action='store_false',
                        help="DISCA without the final split check (the reference's behaviour)")
    parser.add_argument('--refine-iter', type=int, default=None,
                        help="EM iterations after a split check that changed the clusters (preset default; "
                             "0: none)")
    parser.add_argument('--init-k', type=int, default=None,
                        help="clusters of the spectral start (default: chosen by BIC, as `cryopick disca`)")
    parser.add_argument('--init-hold', type=int, default=None,
                        help="iterations during which K stays at --init-k (default 0)")
    parser.add_argument('--init', choices=('spectral', 'invariants', 'network'), default=None,
                        help="DISCA's start (default: the preset's)")
    parser.add_argument('--init-dim', type=int, default=None,
                        help="PCA dimensions of a rotation-invariant start (default: the preset's)")
    parser.add_argument('--init-epochs', type=int, default=None,
                        help="epochs trained on the spectral start's labels before the first re-clustering "
                             "(default: the preset's)")
    parser.add_argument('--mixture-view', choices=('network', 'joint'), default=None,
                        help="what each iteration's mixture is fitted on: the network's features, or those and "
                             "the rotation-invariant features side by side (default: the preset's)")
    parser.add_argument('--align-refine', action='store_true',
                        help="then refine DISCA's clusters by alignment (engine.disca.align.run, as `cryopick disca "
                             "--align-refine`), scored as 'align_refine'")
    parser.add_argument('--align-orientations', type=int, default=2000)
    parser.add_argument('--analysis', action='store_true',
                        help='also: per-cluster averages after undoing the simulated orientations, '
                             'correlated with the templates, and the Fig. 3B feature distances of rotated '
                             'copies (results in <condition>_analysis.json, model kept)')
    args = parser.parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    for name in args.conditions.split(','):
        if name not in CONDITIONS:
            parser.error(f'unknown condition {name}')
        path = os.path.join(args.out, f"{name}{'_analysis' if args.analysis else ''}.json")
        done = json.load(open(path)) if os.path.exists(path) else []
        if any(r.get('preset') == args.preset and r.get('seed') == args.seed
               and r.get('disca_options', {}).get('precision') == args.precision for r in done):
            print(f'{name}: done already ({path})')
            continue
        record = run_condition(name, args)
        done.append(record)
        with open(path + '.part', 'w') as fh:
            json.dump(done, fh, indent=1)
        os.replace(path + '.part', path)
        summary = {k: record[k] for k in ('disca', 'align_refine', 'raw', 'spectral') if k in record}
        print(name, json.dumps({k: {m: v[m] for m in ('k', 'accuracy', 'homogeneity', 'completeness')}
                                for k, v in summary.items()}) if summary else record.get('time_per_iteration_s'))
    return 0


if __name__ == '__main__':
    sys.exit(main())
