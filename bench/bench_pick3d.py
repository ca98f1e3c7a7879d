"""Benchmarks of the DeepETPicker engine (figures, not pass/fail tests).

  mpnms       MP-NMS vs scikit-learn MeanShift (bandwidth = particle radius, bin_seeding=True) on the same
              score map and crop: F1 of both against the truth and the time of each.
  throughput  overlap-tile inference (CPU preset) on a tomogram larger than one tile: voxels/s and peak
              resident memory (resource.getrusage).
  train       CPU-preset training on two simulated tomograms (default 96×256×256, 15 epochs), validation
              on a third, then picking a fourth: wall time and F1.

Score map for `mpnms`: the map of a trained model when --model is given; otherwise a stand-in made from
the truth (truncated-ball labels of each particle, Gaussian blur σ = 1 voxel, additive Gaussian noise
σ = --noise, clipped to 0..1), so both methods see exactly the same map and only the clustering step
differs.

Examples (from the repository root):
  .venv/bin/python bench/bench_pick3d.py mpnms --shape 64 192 192 --repeat 3
  .venv/bin/python bench/bench_pick3d.py mpnms --model M.pt --tomogram T.mrc --truth T_truth.star \
      --particle-diameter 20 --threads 1
  .venv/bin/python bench/bench_pick3d.py throughput --shape 64 160 160 --threads 2
  .venv/bin/python bench/bench_pick3d.py train --epochs 15 --threads 2 --out /tmp/bench_pick3d
"""
import argparse
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cryopick_plugin.engine.pick3d import labels, picking as pick3d, training as train3d  # noqa: E402
from cryopick_plugin.engine.io import mrc, star
from cryopick_plugin.engine.pick3d.resunet3d import PRESETS, build  # noqa: E402
from cryopick_plugin.engine.sim.tomograms import simulate_tomogram  # noqa: E402
from cryopick_plugin.engine.settings import resolve_precision  # noqa: E402

CLASSES = ('4v4r', '1bxn')


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _simulate(shape, seed, snr, classes=CLASSES):
    sim = simulate_tomogram(shape=tuple(shape), classes=classes, snr=snr, seed=seed, name=f'sim{seed}')
    diam = {i + 1: float(d) for i, d in enumerate(sim.meta['diameters_vox'].values())} \
        if isinstance(sim.meta['diameters_vox'], dict) else \
        {i + 1: float(d) for i, d in enumerate(sim.meta['diameters_vox'])}
    return sim, diam


def bench_mpnms(args):
    from scipy.ndimage import gaussian_filter
    from sklearn.cluster import MeanShift
    if args.tomogram:
        # a tomogram of the F1 benchmark with its truth (all classes): the map is the network's
        # foreground probability (sum of its class channels), one label diameter for all particles
        if not (args.model and args.truth and args.particle_diameter):
            raise SystemExit('--tomogram needs --model, --truth and --particle-diameter')
        volume, _ = mrc.open_volume(args.tomogram)
        truth_df = star.read_coordinates(args.truth)
        truth_xyz = star.xyz_array(truth_df)
        d_particle = float(args.particle_diameter)
    else:
        sim, diam = _simulate(args.shape, args.seed, args.snr, classes=(args.template,))
        volume = sim.volume
        d_particle = diam[1]
        truth_xyz = star.xyz_array(sim.truth)
    label_d = max(3, int(round(d_particle / 2)) | 1)   # DeepETPicker-like label, about half the particle
    rng = np.random.default_rng(args.seed)
    if args.model:
        net, meta = pick3d.load_picker(args.model)
        st = mrc.volume_stats(volume)
        n_ch = len(meta['diameters'])
        t0 = time.perf_counter()
        prob_classes = pick3d.probability_map(volume, pick3d.model_predictor(net), n_ch, meta['patch'],
                                              meta['pad_infer'], 2, st['mean'], st['std'])
        prob = prob_classes.sum(axis=0)
        t_map = time.perf_counter() - t0
        if not args.tomogram:
            label_d = int(meta['diameters']['1'])
    else:
        lab = labels.make_labels(sim.volume.shape, truth_xyz, np.ones(len(truth_xyz), int), label_d, 'tball')
        prob = gaussian_filter((lab > 0).astype(np.float32), 1.0)
        prob = np.clip(prob + rng.normal(0, args.noise, prob.shape), 0, 1).astype(np.float32)
    if args.per_class:
        return _mpnms_per_class(args, prob_classes, meta, truth_df, t_map)
    radius = d_particle / 2.0
    match = max(2.0, label_d / 2.0)
    t_mp, t_ms = [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        zyx, _, sc = pick3d.find_peaks(prob[None], {1: label_d}, t_seg=0.5, t_lm=0.1)
        t_mp.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        pts = np.argwhere(prob > 0.5).astype(float)
        ms = MeanShift(bandwidth=radius, bin_seeding=True).fit(pts) if len(pts) else None
        t_ms.append(time.perf_counter() - t0)
    ms_centres = ms.cluster_centers_ if ms is not None else np.zeros((0, 3))
    # DeepFinder-style size filter: drop clusters smaller than a quarter of one label
    min_size = 0.25 * labels.label_template(label_d, 'tball')[0].sum()
    sizes = np.bincount(ms.labels_, minlength=len(ms_centres)) if ms is not None else np.zeros(0)
    s_mp = train3d.pick_scores(zyx[:, ::-1], truth_xyz, match)
    s_ms = train3d.pick_scores(ms_centres[:, ::-1], truth_xyz, match)
    s_msf = train3d.pick_scores(ms_centres[sizes >= min_size][:, ::-1], truth_xyz, match)
    result = {'shape_zyx': list(prob.shape), 'particles': len(truth_xyz), 'particle_diameter_vox': d_particle,
              'label_diameter_vox': label_d,
              'map': 'model (sum of class channels)' if args.model else f'truth labels + noise {args.noise}',
              'map_seconds': round(t_map, 2) if args.model else None,
              'tomogram': args.tomogram or f'simulated {args.template}',
              'foreground_voxels': int((prob > 0.5).sum()), 'match_radius': match,
              'mpnms': {'f1': round(s_mp['f1'], 4), 'precision': round(s_mp['precision'], 4),
                        'recall': round(s_mp['recall'], 4), 'seconds': round(min(t_mp), 4)},
              'meanshift': {'f1': round(s_ms['f1'], 4), 'precision': round(s_ms['precision'], 4),
                            'recall': round(s_ms['recall'], 4), 'seconds': round(min(t_ms), 4)},
              'meanshift_size_filtered': {'f1': round(s_msf['f1'], 4), 'precision': round(s_msf['precision'], 4),
                                          'recall': round(s_msf['recall'], 4), 'min_cluster_voxels': int(min_size)},
              'time_ratio_meanshift_over_mpnms': round(min(t_ms) / max(min(t_mp), 1e-9), 2)}
    return result


def _mpnms_per_class(args, prob_classes, meta, truth_df, t_map):
    """Both methods on each class channel of the network's map with that class's sizes: MP-NMS with its
    label diameter, MeanShift with bandwidth = its particle radius (label diameter ≈ half the particle);
    picks scored against that class's truth within max(2, label diameter / 2); counts summed."""
    from sklearn.cluster import MeanShift
    from cryopick_plugin.engine import evaluate
    from cryopick_plugin.engine.pick3d import mpnms
    rows, tot = [], {'mpnms': [0, 0, 0.0], 'meanshift': [0, 0, 0.0]}
    for c in range(prob_classes.shape[0]):
        label_d = float(meta['diameters'][str(c + 1)] if str(c + 1) in meta['diameters']
                        else meta['diameters'][c + 1])
        p_c = np.ascontiguousarray(prob_classes[c])
        truth_c = star.xyz_array(truth_df[truth_df[star.CLASS] == c + 1])
        match = max(2.0, label_d / 2.0)
        t_mp, t_ms = [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            zyx, _ = mpnms.mp_nms(p_c, diameter=label_d, t_seg=0.5, t_lm=0.1)
            t_mp.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            pts = np.argwhere(p_c > 0.5).astype(float)
            centres = (MeanShift(bandwidth=label_d, bin_seeding=True).fit(pts).cluster_centers_
                       if len(pts) else np.zeros((0, 3)))
            t_ms.append(time.perf_counter() - t0)
        row = {'class': c + 1, 'label_diameter_vox': label_d, 'particles': len(truth_c),
               'foreground_voxels': int((p_c > 0.5).sum())}
        for name, found, t in (('mpnms', zyx, t_mp), ('meanshift', centres, t_ms)):
            s = train3d.pick_scores(np.asarray(found, float)[:, ::-1], truth_c, match)
            tp = s['tp']
            row[name] = {'f1': round(s['f1'], 4), 'picks': len(found), 'seconds': round(min(t), 4)}
            tot[name][0] += tp
            tot[name][1] += len(found)
            tot[name][2] += min(t)
        rows.append(row)
    n_true = len(truth_df)
    out = {'mode': 'per class', 'map_seconds': round(t_map, 2), 'tomogram': args.tomogram, 'classes': rows}
    for name, (tp, n_pred, sec) in tot.items():
        m = evaluate.counts_to_metrics(tp, n_pred, n_true)
        out[name] = {'f1': round(m['f1'], 4), 'precision': round(m['precision'], 4),
                     'recall': round(m['recall'], 4), 'seconds': round(sec, 4)}
    out['time_ratio_meanshift_over_mpnms'] = round(tot['meanshift'][2] / max(tot['mpnms'][2], 1e-9), 1)
    return out


def _forward_flops(net, patch):
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(torch.randn(1, 1, patch, patch, patch))
    return int(counter.get_total_flops())


def _gemm_gflops(precision, n=2048, repeat=5):
    """The machine's matrix-product rate at this precision with torch's threads: best of `repeat`."""
    import torch
    dtype = torch.bfloat16 if precision == 'bf16' else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeat))
    return 2.0 * n ** 3 / best / 1e9


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_throughput(args):
    import torch
    torch.manual_seed(0)
    cfg = PRESETS['cpu']
    net = build('cpu').eval()   # speed does not depend on the weights
    meta = {'voxel_size': 10.0, 'diameters': {'1': 9}, 'patch': cfg['patch'], 'pad_infer': cfg['pad']}
    with tempfile.TemporaryDirectory() as tmp:
        from cryopick_plugin.engine.io import model_io
        model = os.path.join(tmp, 'm.pt')
        model_io.save_model(model, 'deepetpicker', net.arch(), net.state_dict(), meta)
        tomo = os.path.join(tmp, 't.mrc')
        vol = np.random.default_rng(0).normal(size=tuple(args.shape)).astype(np.float32)
        mrc.write_mrc(tomo, vol, 10.0)
        del vol
        if args.memmap:
            pick3d.IN_MEMORY_BYTES = 0   # force the memory-mapped probability map
        rss0 = _peak_rss_mb()
        t0, c0 = time.perf_counter(), time.process_time()
        df = pick3d.pick(tomo, model, device='cpu', batch_size=args.batch_size, work_dir=tmp,
                         precision=args.precision)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
    precision = resolve_precision(args.precision, 'cpu')
    tile_flops = _forward_flops(net, cfg['patch'])
    gemm = {p: _gemm_gflops(p) for p in ('fp32', 'bf16')}
    n_vox = int(np.prod(args.shape))
    n_tiles = len(list(pick3d.tiles(tuple(args.shape), cfg['patch'], cfg['pad'])))
    achieved = n_tiles * tile_flops / dt / 1e9
    return {'precision': precision, 'forward_gflop_per_tile': round(tile_flops / 1e9, 2),
            'achieved_gflops': round(achieved, 1), 'gemm_gflops': {k: round(v, 1) for k, v in gemm.items()},
            'fraction_of_gemm_rate': round(achieved / gemm[precision], 3),
            'shape_zyx': list(args.shape), 'patch': cfg['patch'], 'pad': cfg['pad'], 'tiles': n_tiles,
            'seconds': round(dt, 2), 'cpu_seconds': round(dc, 2), 'voxels_per_s': round(n_vox / dt),
            'voxels_per_cpu_s': round(n_vox / dc), 'picks': len(df),
            'threads': torch.get_num_threads(), 'peak_rss_mb_before': round(rss0),
            'peak_rss_mb': round(_peak_rss_mb()), 'volume_mb': round(n_vox * 4 / 2 ** 20, 1),
            'memmap_probability_map': bool(args.memmap)}


def bench_train(args):
    os.makedirs(args.out, exist_ok=True)
    items = []
    for k, seed in enumerate((11, 12, 13, 14)):
        sim, diam = _simulate(args.shape, seed, args.snr)
        tomo = os.path.join(args.out, f'{sim.name}.mrc')
        lab = os.path.join(args.out, f'{sim.name}_labels.mrc')
        mrc.write_mrc(tomo, sim.volume, sim.voxel_size)
        d_lab = {c: max(3, int(round(d / 2)) | 1) for c, d in diam.items()}
        labels.write_label_map(lab, sim.volume.shape, sim.truth, d_lab, 'tball', sim.voxel_size)
        items.append((tomo, lab, sim.truth))
    t0 = time.perf_counter()
    meta = train3d.train(items[:2], items[2:3], os.path.join(args.out, 'deepet_cpu.pt'), preset='cpu',
                         epochs=args.epochs, device='cpu', seed=0, val_every=args.val_every,
                         patience=args.epochs, max_steps_per_epoch=args.steps_per_epoch)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    picks = pick3d.pick(items[3][0], os.path.join(args.out, 'deepet_cpu.pt'), device='cpu')
    pick_s = time.perf_counter() - t0
    match = max(2.0, min(int(v) for v in meta['diameters'].values()) / 2.0)
    s = train3d.pick_scores(star.xyz_array(picks), star.xyz_array(items[3][2]), match)
    per_class = {}
    for c in sorted(set(items[3][2][star.CLASS])):
        sc = train3d.pick_scores(star.xyz_array(picks[picks[star.CLASS] == c]),
                                 star.xyz_array(items[3][2][items[3][2][star.CLASS] == c]), match)
        per_class[int(c)] = round(sc['f1'], 4)
    return {'shape_zyx': list(args.shape), 'steps_per_epoch': args.steps_per_epoch,
            'train_particles': int(len(items[0][2]) + len(items[1][2])), 'epochs_run': meta['epochs_run'], 'best_epoch': meta['best_epoch'],
            'train_minutes': round(train_s / 60, 2), 'pick_seconds': round(pick_s, 1),
            'test_f1_any_class': round(s['f1'], 4), 'test_f1_per_class': per_class,
            'thresholds': meta['thresholds'], 'fits_30_min': train_s < 1800, 'peak_rss_mb': round(_peak_rss_mb())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='what', required=True)
    a = sub.add_parser('mpnms')
    a.add_argument('--shape', type=int, nargs=3, default=[64, 192, 192])
    a.add_argument('--snr', type=float, default=0.1)
    a.add_argument('--noise', type=float, default=0.15)
    a.add_argument('--model', default=None)
    a.add_argument('--tomogram', default=None, help='use this tomogram (with --model, --truth) instead of a simulation')
    a.add_argument('--truth', default=None, help='truth STAR of --tomogram (every row counts, classes ignored)')
    a.add_argument('--particle-diameter', type=float, default=None,
                   help='with --tomogram: particle diameter in voxels (MeanShift bandwidth = half of it)')
    a.add_argument('--template', default='1bxn', help='molecule simulated (a name in the templates folder)')
    a.add_argument('--repeat', type=int, default=3)
    a.add_argument('--per-class', action='store_true',
                   help='with --model/--tomogram: compare on each class channel with its own sizes')
    a.add_argument('--seed', type=int, default=0)
    b = sub.add_parser('throughput')
    b.add_argument('--shape', type=int, nargs=3, default=[64, 160, 160])
    b.add_argument('--batch-size', type=int, default=1)
    b.add_argument('--memmap', action='store_true', help='force the memory-mapped probability map')
    b.add_argument('--precision', default='auto', choices=('auto', 'fp32', 'bf16'))
    c = sub.add_parser('train')
    c.add_argument('--shape', type=int, nargs=3, default=[96, 256, 256])
    c.add_argument('--epochs', type=int, default=15)
    c.add_argument('--val-every', type=int, default=3)
    c.add_argument('--steps-per-epoch', type=int, default=100,
                   help='batches per epoch (a random subset of the particles; None = all)')
    c.add_argument('--snr', type=float, default=0.1)
    c.add_argument('--out', default=os.path.join(tempfile.gettempdir(), 'bench_pick3d'))
    for s in (a, b, c):
        s.add_argument('--threads', type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    result = {'mpnms': bench_mpnms, 'throughput': bench_throughput, 'train': bench_train}[args.what](args)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
