"""Peak memory of `cryopick dog-pick` and `cryopick pick3d` on a tomogram of 1–2 GiB.

A float32 tomogram is written slab by slab (noise plus dark balls) with mrcfile's memory-mapped writer, so
making it costs no more memory than one slab. Each command then runs in its own process while this script
samples /proc/<pid>/status every few milliseconds:

- RssAnon: the process's own (anonymous) memory: arrays, tiles, torch buffers. This is what must stay well
  below the tomogram size for a tomogram larger than the RAM to get through.
- RssFile / VmHWM: pages of memory-mapped files (the tomogram itself, probability maps) count in the
  resident set while they are cached, but the kernel drops them under memory pressure; VmHWM (the kernel's
  peak resident set, anonymous + file) is reported for completeness.

The same commands on a tiny tomogram give the baseline (Python, numpy, scipy, torch, Scipion imports), and
the growth over it is compared with the file size.

Usage:
  python bench/bench_memory.py --size-gib 1.5 --work /scratch/bench_memory [--skip-pick3d]
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

MIB = 1024 ** 2


def write_tomogram(path, shape, voxel_size=10.0, seed=0, n_blobs=200, blob_radius=4):
    """Noise (σ=1) with dark balls (−3), written slab by slab through a memory map. Returns the path."""
    import mrcfile
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    centres = rng.uniform(blob_radius + 2, np.array(shape) - blob_radius - 2, size=(n_blobs, 3))
    tmp = path + '.part'
    with mrcfile.new_mmap(tmp, shape=shape, mrc_mode=2, overwrite=True) as mrc:
        mrc.voxel_size = voxel_size
        step = max(1, int(64 * MIB // (shape[1] * shape[2] * 4)))
        yy, xx = np.indices(shape[1:])
        for z0 in range(0, shape[0], step):
            z1 = min(shape[0], z0 + step)
            slab = rng.normal(size=(z1 - z0,) + shape[1:]).astype(np.float32)
            near = centres[np.abs(centres[:, 0] - (z0 + z1) / 2) <= (z1 - z0) / 2 + blob_radius]
            for cz, cy, cx in near:
                for z in range(max(z0, int(cz - blob_radius)), min(z1, int(cz + blob_radius) + 1)):
                    r2 = blob_radius ** 2 - (z - cz) ** 2
                    if r2 > 0:
                        slab[z - z0][(yy - cy) ** 2 + (xx - cx) ** 2 <= r2] -= 3.0
            mrc.data[z0:z1] = slab
        mrc.update_header_stats()
    os.replace(tmp, path)
    return path


def _status(pid):
    values = {}
    with open(f'/proc/{pid}/status') as fh:
        for line in fh:
            key, _, rest = line.partition(':')
            if key in ('RssAnon', 'RssFile', 'VmHWM', 'VmRSS'):
                values[key] = int(rest.split()[0]) * 1024
    return values


def measure(command, env=None, interval=0.005, timeout=None):
    """Run `command` (list) and sample its memory until it exits.

    Returns {'rc', 'wall_s', 'peak_anon_mib', 'peak_file_mib', 'vm_hwm_mib', 'stderr'}; peaks over the
    samples (anonymous memory is not tracked by the kernel, so very short spikes can be missed).
    """
    t0 = time.time()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = {'RssAnon': 0, 'RssFile': 0, 'VmHWM': 0}
    import threading
    err = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        try:
            values = _status(proc.pid)
        except (FileNotFoundError, ProcessLookupError):
            break
        for k in peak:
            peak[k] = max(peak[k], values.get(k, 0))
        if timeout and time.time() - t0 > timeout:
            proc.kill()
        time.sleep(interval)
    rc = proc.wait()
    reader.join(5)
    return {'rc': rc, 'wall_s': time.time() - t0, 'peak_anon_mib': peak['RssAnon'] / MIB,
            'peak_file_mib': peak['RssFile'] / MIB, 'vm_hwm_mib': peak['VmHWM'] / MIB,
            'stderr': ''.join(err)[-2000:]}


def cryopick(*args):
    return [sys.executable, '-m', 'cryopick_plugin'] + [str(a) for a in args]


def tiny_model(path, voxel_size=10.0, widths=(4, 8), patch=32):
    """An untrained DeepETPicker network (memory does not depend on the weights)."""
    import torch
    from cryopick_plugin.engine.io import model_io
    from cryopick_plugin.engine.pick3d import resunet3d
    torch.manual_seed(0)
    net = resunet3d.ResUNet3D(n_classes=1, widths=widths)
    meta = {'voxel_size': voxel_size, 'diameters': {'1': 8}, 'patch': patch, 'pad_infer': patch // 8,
            'thresholds': {'t_seg': 0.5, 't_lm': 0.1}}
    model_io.save_model(path, 'deepetpicker', net.arch(), net.state_dict(), meta)
    return path


def commands(tomo, work, model=None):
    out = {'dog-pick': cryopick('dog-pick', tomo, '--diameter', 8, '--max-picks', 500,
                                '--out', os.path.join(work, os.path.basename(tomo) + '_dog.star'))}
    if model:
        out['pick3d'] = cryopick('pick3d', tomo, '--model', model, '--batch-size', 2, '--device', 'cpu',
                                 '--work-dir', work, '--out', os.path.join(work, os.path.basename(tomo) + '_p.star'))
    return out


def run(size_gib, work, pick3d=True, env=None, depth=None):
    """Write the tomograms, run the commands, return the measurements as a dict."""
    os.makedirs(work, exist_ok=True)
    depth = depth or 128
    side = int(round(np.sqrt(size_gib * 1024 ** 3 / 4 / depth)))
    side -= side % 8
    shape = (depth, side, side)
    big = os.path.join(work, 'big.mrc')
    small = os.path.join(work, 'small.mrc')
    t0 = time.time()
    write_tomogram(big, shape, seed=1, n_blobs=max(20, int(200 * size_gib)))
    write_time = time.time() - t0
    write_tomogram(small, (32, 48, 48), seed=2, n_blobs=5)
    model = tiny_model(os.path.join(work, 'tiny_model.pt')) if pick3d else None
    env = dict(env or os.environ)
    env.setdefault('OMP_NUM_THREADS', '2')
    result = {'shape_zyx': shape, 'file_mib': os.path.getsize(big) / MIB, 'write_s': write_time, 'runs': {}}
    for name, cmd in commands(small, work, model).items():
        base = measure(cmd, env=env)
        full = measure(commands(big, work, model)[name], env=env)
        result['runs'][name] = {'baseline': base, 'big': full,
                                'growth_anon_mib': full['peak_anon_mib'] - base['peak_anon_mib']}
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--size-gib', type=float, default=1.5, help='tomogram size in GiB (default 1.5)')
    parser.add_argument('--depth', type=int, default=128, help='number of z sections (default 128)')
    parser.add_argument('--work', default='bench_memory_work', help='folder for the tomograms and outputs')
    parser.add_argument('--skip-pick3d', action='store_true', help='only dog-pick (pick3d on CPU is slow)')
    parser.add_argument('--keep', action='store_true', help='keep the tomograms')
    parser.add_argument('--json', default=None, help='also write the measurements here')
    args = parser.parse_args(argv)
    res = run(args.size_gib, args.work, pick3d=not args.skip_pick3d, depth=args.depth)
    print(f"tomogram {res['shape_zyx']} float32 = {res['file_mib']:.0f} MiB (written in {res['write_s']:.0f} s)")
    print(f"{'command':10s} {'rc':>3s} {'wall s':>7s} {'anon MiB':>9s} {'baseline':>9s} {'growth':>7s} "
          f"{'growth/file':>11s} {'mmap MiB':>9s} {'VmHWM':>7s}")
    for name, r in res['runs'].items():
        b, f = r['baseline'], r['big']
        print(f"{name:10s} {f['rc']:3d} {f['wall_s']:7.1f} {f['peak_anon_mib']:9.0f} {b['peak_anon_mib']:9.0f} "
              f"{r['growth_anon_mib']:7.0f} {r['growth_anon_mib'] / res['file_mib']:11.2f} "
              f"{f['peak_file_mib']:9.0f} {f['vm_hwm_mib']:7.0f}")
        if f['rc']:
            print(f['stderr'])
    if args.json:
        with open(args.json, 'w') as fh:
            json.dump(res, fh, indent=2, default=str)
    if not args.keep:
        for name in ('big.mrc', 'small.mrc'):
            path = os.path.join(args.work, name)
            if os.path.exists(path):
                os.remove(path)
    return 0


if __name__ == '__main__':
    sys.exit(main())
