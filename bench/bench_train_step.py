"""CPU seconds per training patch of the 3D-ResUNet's CPU preset, by batch size and arithmetic.

One training step = forward + seg_loss + backward + AdamW step on random 48³ patches, 4 classes. Timed with
`time.process_time` on one thread (robust on a shared machine), 6 steps, median of the last 4. Compare
the routes with CRYOPICK_CONV3D=plain (torch's own fp32 3D convolution) against the default.

  .venv/bin/python bench/bench_train_step.py fp32
  CRYOPICK_CONV3D=plain .venv/bin/python bench/bench_train_step.py fp32
  .venv/bin/python bench/bench_train_step.py bf16
"""
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cryopick_plugin.engine.pick3d.resunet3d import build  # noqa: E402
from cryopick_plugin.engine.pick3d.training import seg_loss  # noqa: E402


def main(precision='fp32', batches=(1, 2, 4), threads=1, steps=6):
    torch.set_num_threads(threads)
    for bs in batches:
        torch.manual_seed(0)
        net = build('cpu', n_classes=4)
        opt = torch.optim.AdamW(net.parameters(), 1e-3)
        x = torch.randn(bs, 1, 48, 48, 48)
        if precision == 'bf16':
            x = x.contiguous(memory_format=torch.channels_last_3d)
        y = torch.randint(0, 5, (bs, 48, 48, 48))
        seconds = []
        for _ in range(steps):
            t0 = time.process_time()
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=precision == 'bf16'):
                out = net(x)
            loss = seg_loss(out.float(), y, 4, 0.5)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seconds.append(time.process_time() - t0)
        step = float(np.median(seconds[2:]))
        print(f"{precision} conv3d={os.environ.get('CRYOPICK_CONV3D', 'auto')} batch {bs}: "
              f"{step:.3f} CPU-s/step, {step / bs:.3f} CPU-s/patch", flush=True)


if __name__ == '__main__':
    main(sys.argv[1] if len(sys.argv) > 1 else 'fp32')
