"""GFLOP/s of the 3D networks' convolutions and training steps on this CPU: fp32 plain (torch's nn.Conv3d,
the path before engine/conv3d.py), fp32 fast (engine/conv3d.py) and bf16 (autocast, channels-last), against
the machine's fp32 matrix-product rate.

Per layer: every 3×3×3 convolution of the CPU-preset 3D-ResUNet on a 48³ patch (batch 1, 4 classes) and of
YOPO's CPU preset on 24³ subtomograms (its training batch, 16), forward + backward (weight gradient; input
gradient too except for the first layer, whose input needs none). Per step: one whole training step
(forward, loss, backward, optimiser) as engine/pick3d/training.py and engine/disca/em.py run it.
FLOPs are torch's FlopCounterMode counts (convolutions and matrix products); GFLOP/s = FLOPs / median time.

    .venv/bin/python bench/bench_conv3d.py --threads 1,2 --out bench/results/conv3d.json
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cryopick_plugin.engine.conv3d import conv3d_fp32, use_fast_fp32  # noqa: E402
from cryopick_plugin.engine.disca import yopo  # noqa: E402
from cryopick_plugin.engine.pick3d.resunet3d import build  # noqa: E402

CL3 = torch.channels_last_3d
MODES = ('plain', 'fast', 'bf16')


CLOCK = {'clock': 'cpu'}


def timed(fn, reps, warm=1):
    """Median seconds of fn: wall clock, or (--clock cpu) the process's CPU time divided by the threads —
    on a shared, oversubscribed machine the CPU time is what the same run takes on an idle one, as long as
    every thread is busy (true for these kernels; the small serial parts make it a slight overestimate of
    the speed)."""
    for _ in range(warm):
        fn()
    times = []
    threads = torch.get_num_threads()
    for _ in range(reps):
        if CLOCK['clock'] == 'cpu':
            t = time.process_time()
            fn()
            times.append((time.process_time() - t) / threads)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def gemm_rate(reps, n=2048, dtype=torch.float32):
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    return 2 * n ** 3 / timed(lambda: torch.mm(a, b), reps) / 1e9


def conv_layers(net, x):
    """(input shape, weight shape, padding) of every Conv3d with kernel > 1 in a forward pass of net."""
    shapes = []
    hooks = [m.register_forward_hook(lambda m, inp, out: shapes.append(
        (tuple(inp[0].shape), tuple(m.weight.shape), tuple(m.padding))))
        for m in net.modules() if isinstance(m, torch.nn.Conv3d) and m.kernel_size[0] > 1]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return shapes


def layer_time(mode, in_shape, w_shape, padding, input_grad, reps):
    x = torch.randn(in_shape)
    w = (torch.randn(w_shape) * 0.1)
    if mode == 'bf16':
        x = x.contiguous(memory_format=CL3)
        w = w.contiguous(memory_format=CL3)
    x.requires_grad_(input_grad)
    w.requires_grad_()

    def run():
        x.grad = w.grad = None
        if mode == 'plain':
            y = F.conv3d(x, w, None, 1, padding)
        elif mode == 'fast':
            y = conv3d_fp32(x, w, None, padding)
        else:
            with torch.autocast('cpu', dtype=torch.bfloat16):
                y = F.conv3d(x, w, None, 1, padding)
        y.backward(torch.ones_like(y))
    return timed(run, reps)


def layer_flops(in_shape, w_shape, padding, input_grad):
    n, c, *size = in_shape
    o, _, *k = w_shape
    out = np.prod([s + 2 * p - kk + 1 for s, p, kk in zip(size, padding, k)])
    return 2 * n * o * c * np.prod(k) * out * (3 if input_grad else 2)


def resunet_step(mode, reps, patch=48, n_classes=4):
    torch.manual_seed(0)
    net = build('cpu', n_classes=n_classes)
    use_fast_fp32(net, mode == 'fast')
    layout = CL3 if mode == 'bf16' else torch.contiguous_format
    net = net.to(memory_format=layout)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.01)
    x = torch.randn(1, 1, patch, patch, patch).contiguous(memory_format=layout)
    y = torch.randint(0, n_classes + 1, (1, patch, patch, patch))

    def step():
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=mode == 'bf16'):
            logits = net(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return timed(step, reps), net, step


def yopo_step(mode, reps, batch=16, k=5):
    torch.manual_seed(0)
    arch = yopo.make_arch('cpu')
    net = yopo.build_features(arch)
    use_fast_fp32(net, mode == 'fast')
    layout = CL3 if mode == 'bf16' else torch.contiguous_format
    net = net.to(memory_format=layout)
    head = yopo.YOPOHead(arch['feature_dim'], k)
    opt = torch.optim.NAdam(list(net.parameters()) + list(head.parameters()), lr=5e-4)
    box = arch['box']
    x = torch.randn(batch, 1, box, box, box).contiguous(memory_format=layout)
    t = torch.eye(k)[torch.randint(0, k, (batch,))]

    def step():
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=mode == 'bf16'):
            p = head(net(x).float())
        loss = yopo.categorical_hinge(p.float(), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return timed(step, reps), net, step


def step_flops(step):
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return int(counter.get_total_flops())


def machine():
    info = {'python': platform.python_version(), 'torch': torch.__version__, 'cpu': platform.processor()}
    try:
        with open('/proc/cpuinfo') as f:
            text = f.read()
        model = next(l.split(':', 1)[1].strip() for l in text.splitlines() if l.startswith('model name'))
        flags = next(l.split(':', 1)[1].split() for l in text.splitlines() if l.startswith('flags'))
        info['cpu'] = model
        info['flags'] = [f for f in ('avx2', 'fma', 'avx512f', 'avx512_bf16', 'amx_bf16', 'amx_tile') if f in flags]
    except (OSError, StopIteration):
        pass
    try:
        info['bf16_native'] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        info['bf16_native'] = False
    info['load_average'] = os.getloadavg()
    return info


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--threads', default='1,2', help='comma-separated thread counts (default 1,2)')
    ap.add_argument('--reps', type=int, default=5, help='timed repetitions per figure (median; default 5)')
    ap.add_argument('--modes', default=','.join(MODES), help='plain,fast,bf16')
    ap.add_argument('--no-layers', action='store_true', help='only the training steps and GEMM rate')
    ap.add_argument('--clock', choices=['cpu', 'wall'], default='wall',
                    help="'wall' (default) or 'cpu': process CPU time / threads, for a machine shared with "
                         "other work (see timed())")
    ap.add_argument('--out', help='JSON file for the results')
    args = ap.parse_args()
    CLOCK['clock'] = args.clock
    modes = [m for m in args.modes.split(',') if m]
    info = machine()
    print(f"# {info['cpu']}; flags {' '.join(info.get('flags', []))}; native bf16 {info['bf16_native']}; "
          f"torch {info['torch']}; load {info['load_average'][0]:.2f}; clock {args.clock}", flush=True)
    results = {'machine': info, 'clock': args.clock, 'reps': args.reps, 'runs': []}
    res_layers = conv_layers(build('cpu', n_classes=4), torch.randn(1, 1, 48, 48, 48))
    arch = yopo.make_arch('cpu')
    yopo_layers = conv_layers(yopo.build_features(arch), torch.randn(16, 1, arch['box'], arch['box'], arch['box']))
    for threads in [int(t) for t in args.threads.split(',')]:
        torch.set_num_threads(threads)
        run = {'threads': threads, 'gemm_fp32_gflops': gemm_rate(args.reps),
               'gemm_bf16_gflops': gemm_rate(args.reps, n=1024, dtype=torch.bfloat16), 'layers': [], 'steps': []}
        gemm = run['gemm_fp32_gflops']
        print(f"\n## {threads} thread(s): fp32 GEMM {gemm:.1f} GFLOP/s, bf16 GEMM {run['gemm_bf16_gflops']:.1f} "
              f"GFLOP/s (torch.mm 2048² fp32, 1024² bf16)", flush=True)
        if not args.no_layers:
            print('| network | layer (N, C→O, size) | ' + ' | '.join(f'{m} GFLOP/s' for m in modes)
                  + ' | fast / GEMM | fast / plain |')
            print('|---|---|' + '---|' * (len(modes) + 2))
            for name, layers in (('ResUNet cpu', res_layers), ('YOPO cpu', yopo_layers)):
                seen = set()
                for i, (in_shape, w_shape, padding) in enumerate(layers):
                    key = (in_shape, w_shape, padding)
                    if key in seen:
                        continue
                    seen.add(key)
                    input_grad = i > 0
                    flops = layer_flops(in_shape, w_shape, padding, input_grad)
                    row = {'network': name, 'input': in_shape, 'weight': w_shape, 'padding': padding,
                           'flops': int(flops)}
                    for m in modes:
                        row[m] = flops / layer_time(m, in_shape, w_shape, padding, input_grad, args.reps) / 1e9
                    run['layers'].append(row)
                    label = f"{in_shape[0]}, {in_shape[1]}→{w_shape[0]}, {in_shape[2]}³"
                    cells = ' | '.join(f'{row[m]:.1f}' for m in modes)
                    extra = (f" | {row['fast'] / gemm:.0%} | {row['fast'] / row['plain']:.1f}×"
                             if 'fast' in row and 'plain' in row else ' | | ')
                    print(f'| {name} | {label} | {cells}{extra}', flush=True)
        print('\n| training step | ' + ' | '.join(f'{m} s (GFLOP/s)' for m in modes)
              + ' | fast / GEMM | fast / plain |')
        print('|---|' + '---|' * (len(modes) + 2))
        for name, fn in (('ResUNet cpu, 48³, batch 1, 4 classes, AdamW', resunet_step),
                         ('YOPO cpu, 24³, batch 16, K 5, NAdam', yopo_step)):
            row = {'network': name}
            for m in modes:
                seconds, _, step = fn(m, args.reps)
                row.setdefault('flops', step_flops(step))
                row[m] = {'seconds': seconds, 'gflops': row['flops'] / seconds / 1e9}
            run['steps'].append(row)
            cells = ' | '.join(f"{row[m]['seconds']:.3f} ({row[m]['gflops']:.1f})" for m in modes)
            extra = (f" | {row['fast']['gflops'] / gemm:.0%} | {row['plain']['seconds'] / row['fast']['seconds']:.1f}×"
                     if 'fast' in row and 'plain' in row else ' | | ')
            print(f'| {name} | {cells}{extra}', flush=True)
        results['runs'].append(run)
    results['load_average_end'] = os.getloadavg()
    print(f"\n# load average at the end {results['load_average_end'][0]:.2f}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp = args.out + '.tmp'
        with open(tmp, 'w') as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, args.out)


if __name__ == '__main__':
    main()
