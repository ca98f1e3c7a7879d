"""Time per EM iteration and peak memory of DISCA (`engine.disca.em.disca_cluster`, cpu preset, fp32) at
several numbers of subtomograms, each run in its own process (so peak memory is that run's own).

The subtomograms come from a STAR file written by `cryopick simulate subtomograms`; for each N the first
N rows of a fixed random permutation are used (classes mixed). A run is capped at --max-iter iterations
(2: the first does features, mixtures and one training epoch on the data + rotated copies; the second
features and mixtures only); the per-stage wall times come from the iteration lines of the log, and the
CPU seconds per stage from the process's CPU clock around em's stage functions (on a shared machine the CPU
seconds, divided by the threads, are what the run takes on an idle one; the wall times are not).

    .venv/bin/cryopick simulate subtomograms --out /tmp/sub5000 --snr 0.03 --per-class 1000 --box 32 --tilt-range 60
    .venv/bin/python bench/bench_disca_speed.py /tmp/sub5000/subtomograms.star --n 1000,2000,5000 --threads 2 \
        --out bench/results/disca_speed.json [--conv3d plain]
"""
import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STAGES = re.compile(r'iteration (\d+): .* ([0-9.]+)s \(features ([^,]+), mixtures ([^,]+), training ([^)]+)\)')


def _seconds(text):
    """'8.2 s' / '45 s' / '3m12s' / '1h04m' (engine.progress.duration) → seconds; None if unparsed."""
    text = text.strip()
    m = re.fullmatch(r'(\d+)h(\d+)m', text)
    if m:
        return 3600.0 * int(m.group(1)) + 60.0 * int(m.group(2))
    m = re.fullmatch(r'(\d+)m(\d+)s', text)
    if m:
        return 60.0 * int(m.group(1)) + int(m.group(2))
    m = re.fullmatch(r'([0-9.]+) s', text)
    return float(m.group(1)) if m else None


def _rss_mib():
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmRSS:')) / 1024


def child(args):
    import numpy as np
    import torch
    torch.set_num_threads(args.threads)
    import tempfile
    from cryopick_plugin.commands.disca import read_subtomogram_star
    from cryopick_plugin.engine.disca import em
    from cryopick_plugin.engine.io import star
    # only the N subtomograms of this run are read (a STAR of them with absolute paths), so that the peak
    # memory is this run's own
    blocks = star.read_star_blocks(args.star)
    name = next(k for k, b in blocks.items() if hasattr(b, 'columns') and 'rlnImageName' in b.columns)
    table = blocks[name].reset_index(drop=True)
    if args.n > len(table):
        raise SystemExit(f"{args.star}: {len(table)} subtomograms, fewer than N = {args.n}")
    rows = table.iloc[np.sort(np.random.default_rng(0).permutation(len(table))[:args.n])].copy()
    folder = os.path.dirname(os.path.abspath(args.star))
    rows['rlnImageName'] = [v if os.path.isabs(v) else os.path.join(folder, v) for v in rows['rlnImageName'].astype(str)]
    with tempfile.TemporaryDirectory() as tmp:
        subset = os.path.join(tmp, 'subset.star')
        star.write_star(subset, {name: rows})
        stack, _, _ = read_subtomogram_star(subset)
    rss_before = _rss_mib()
    # CPU seconds per stage (process time: what the stage costs on an idle machine, whatever else runs)
    cpu = {}

    def metered(name, fn):
        def wrapper(*a, **kw):
            t = time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                cpu[name] = cpu.get(name, 0.0) + time.process_time() - t
        return wrapper
    for name in ('_train_epoch', '_train_head', '_features_with_progress', 'fit_mixtures', 'random_rotations',
                 'spectral_embedding', 'ddbi'):
        if hasattr(em, name):
            setattr(em, name, metered(name, getattr(em, name)))
    lines = []
    t0 = time.time()
    c0 = time.process_time()
    result = em.disca_cluster(stack, preset='cpu', k_range=(2, 20), max_iter=args.max_iter, seed=0, device='cpu',
                              log=lines.append, options={'split_check': False, 'refine_iter': 0})
    total = time.time() - t0
    total_cpu = time.process_time() - c0
    stages = []
    for line in lines:
        m = STAGES.search(line)
        if m:
            stages.append({'iteration': int(m.group(1)), 'seconds': float(m.group(2)),
                           'features_s': _seconds(m.group(3)), 'mixtures_s': _seconds(m.group(4)),
                           'training_s': _seconds(m.group(5))})
    print(json.dumps({'n': args.n, 'threads': args.threads, 'total_s': total, 'total_cpu_s': total_cpu,
                      'cpu_s_by_stage': cpu, 'k': int(result.k),
                      'iterations': [{'iteration': h['iteration'], 'time_s': h['time_s'], 'k': h['k']}
                                     for h in result.history],
                      'stages': stages, 'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      'rss_before_mib': rss_before,
                      'conv3d': os.environ.get('CRYOPICK_CONV3D', 'auto'), 'log': lines}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('star', help='subtomogram STAR file (cryopick simulate subtomograms)')
    ap.add_argument('--n', default='1000,2000,5000', help='numbers of subtomograms (comma-separated)')
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--max-iter', type=int, default=2)
    ap.add_argument('--conv3d', choices=['auto', 'plain'], default='auto',
                    help="'plain': torch's own 3D convolutions (the path before engine/conv3d.py)")
    ap.add_argument('--out', help='JSON file for the results')
    ap.add_argument('--child', type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        args.n = args.child
        return child(args)
    env = dict(os.environ, CRYOPICK_CONV3D=args.conv3d, CRYOPICK_PRECISION='fp32',
               OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               OPENBLAS_NUM_THREADS=str(args.threads))
    runs = []
    for n in [int(v) for v in args.n.split(',')]:
        load = os.getloadavg()[0]
        out = subprocess.run([sys.executable, os.path.abspath(__file__), args.star, '--child', str(n),
                              '--threads', str(args.threads), '--max-iter', str(args.max_iter)],
                             env=env, capture_output=True, text=True)
        if out.returncode:
            sys.stderr.write(out.stderr[-3000:])
            raise SystemExit(f"N = {n}: run failed (exit {out.returncode})")
        run = json.loads(out.stdout.strip().splitlines()[-1])
        run['load_average_start'] = load
        run['load_average_end'] = os.getloadavg()[0]
        runs.append(run)
        stages = ', '.join(f'{k.strip("_")} {v:.1f}' for k, v in run['cpu_s_by_stage'].items())
        print(f"N {n}: iterations {[round(i['time_s'], 1) for i in run['iterations']]} s wall; "
              f"{run['total_cpu_s']:.1f} CPU-s in all ({stages}); peak RSS {run['peak_rss_mib']:.0f} MiB "
              f"({run['rss_before_mib']:.0f} MiB with the stack read, before the run); "
              f"conv3d {args.conv3d}; threads {args.threads}; load {load:.1f} → {run['load_average_end']:.1f}",
              flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp = args.out + '.tmp'
        with open(tmp, 'w') as f:
            json.dump({'star': os.path.abspath(args.star), 'runs': runs}, f, indent=1)
        os.replace(tmp, args.out)


if __name__ == '__main__':
    main()
