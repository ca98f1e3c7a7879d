"""3D convolutions at full fp32 speed on a CPU: drop-ins for nn.Conv3d used by every 3D network.

PyTorch (2.x) computes an fp32 3D convolution of a single volume (batch 1) on the CPU with im2col + GEMM
(`slow_conv3d`), its forward and backward reaching a few GFLOP/s where the machine's matrix product
reaches tens; oneDNN's direct kernels are only used from batch 2, and for any batch only if the tensors
are channels-last. bf16 (autocast) and CUDA go through oneDNN / cuDNN and are fast already.

`Conv3d` is an nn.Conv3d (same parameters, same state-dict keys, so models move freely between the
paths) whose forward, for fp32 tensors on the CPU outside autocast, computes the same convolution by a
faster route:

- batch 1 (training patches, overlap tiles) of slices of 8×8 or more: a k×k×k convolution is the sum over its kd depth taps of a
  2D convolution applied to every depth slice; each tap is one `F.conv2d` over all the slices at once
  (the slices are a batch, channels-last, so oneDNN runs it), the kd results are added with the shift of
  their tap. Padding in depth is zero slices; padding in height/width is the 2D convolution's own.
- batch ≥ 2 (DISCA's mini-batches, batched tiles): `F.conv3d` on channels-last tensors (oneDNN).

Both are ordinary autograd graphs: gradients follow from PyTorch's own conv2d / conv3d backward, so the
result equals `F.conv3d` up to fp32 rounding (summation order; tested in tests/test_conv3d.py).

Networks build `Conv3d` directly; `use_fast_fp32(net, enabled)` switches the path of every one of them
(and converts plain nn.Conv3d modules), e.g. to measure the plain path. $CRYOPICK_CONV3D=plain turns the
fast path off everywhere (a fallback should a future PyTorch make it slower or wrong).
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

CONV3D_VAR = 'CRYOPICK_CONV3D'
_CL3 = torch.channels_last_3d


def _autocast_on():
    try:
        return torch.is_autocast_enabled('cpu')
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def env_enabled():
    """False when $CRYOPICK_CONV3D asks for the plain path ('plain', 'off', '0')."""
    return os.environ.get(CONV3D_VAR, 'auto').strip().lower() not in ('plain', 'off', '0', 'false', 'no')


def fast_path_applies(x, weight):
    """Whether the fp32 CPU route is taken for this input (fp32, CPU, autocast off)."""
    return (x.device.type == 'cpu' and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not _autocast_on())


def conv3d_slices(x, weight, bias=None, padding=(0, 0, 0)):
    """Stride-1 3D convolution (groups 1, zero padding) as kd 2D convolutions over depth slices, summed
    with their depth shift. x (N, C, D, H, W), weight (O, C, kd, kh, kw); the result is channels-last."""
    pd, ph, pw = padding
    if pd:
        x = F.pad(x, (0, 0, 0, 0, pd, pd))
    x = x.contiguous(memory_format=_CL3)
    n, c, d, h, w = x.shape
    kd = weight.shape[2]
    do = d - kd + 1
    if do < 1:
        raise RuntimeError(f"conv3d: input depth {d - 2 * pd} (padded {d}) is smaller than the kernel ({kd})")
    out = None
    for k in range(kd):
        # (N, C, Do, H, W) view → (N·Do, C, H, W); a view (no copy) when N == 1 or Do == D
        xs = x[:, :, k:k + do].permute(0, 2, 1, 3, 4).reshape(n * do, c, h, w)
        wk = weight[:, :, k].contiguous(memory_format=torch.channels_last)
        y = F.conv2d(xs, wk, bias if k == 0 else None, 1, (ph, pw))
        out = y if out is None else out + y
    o, ho, wo = out.shape[1:]
    # (N·Do, O, Ho, Wo) channels-last → (N, O, Do, Ho, Wo) channels-last-3d, without a copy
    return out.permute(0, 2, 3, 1).reshape(n, do, ho, wo, o).permute(0, 4, 1, 2, 3)


# Below this many voxels per depth slice (8×8) a batch-1 volume is too small for the slices to pay off:
# torch's own im2col + GEMM is as fast or faster (measured at 6³ and 3³; 9³ and up favour the slices).
MIN_SLICE_AREA = 64


def conv3d_fp32(x, weight, bias=None, padding=(0, 0, 0)):
    """F.conv3d (stride 1, groups 1, zero padding) by the fastest fp32 CPU route for this input."""
    if x.shape[0] == 1:
        if x.shape[3] * x.shape[4] < MIN_SLICE_AREA:
            return F.conv3d(x, weight, bias, 1, padding)
        return conv3d_slices(x, weight, bias, padding)
    return F.conv3d(x.contiguous(memory_format=_CL3), weight.contiguous(memory_format=_CL3), bias, 1, padding)


class Conv3d(nn.Conv3d):
    """nn.Conv3d with the fast fp32 CPU path (see the module doc); identical parameters and state dict."""

    fast_fp32 = True

    def _fast_ok(self):
        return (self.fast_fp32 and self.groups == 1 and self.padding_mode == 'zeros'
                and not isinstance(self.padding, str) and tuple(self.stride) == (1, 1, 1)
                and tuple(self.dilation) == (1, 1, 1) and env_enabled())

    def forward(self, x):
        if self._fast_ok() and fast_path_applies(x, self.weight):
            return conv3d_fp32(x, self.weight, self.bias, tuple(self.padding))
        return super().forward(x)


def use_fast_fp32(net, enabled=True):
    """Switch every 3D convolution of `net` to the fast fp32 CPU path (enabled) or the plain one; plain
    nn.Conv3d modules become `Conv3d` (same parameters). Returns the number of convolutions switched."""
    count = 0
    for module in net.modules():
        if type(module) is nn.Conv3d:
            module.__class__ = Conv3d
        if isinstance(module, Conv3d):
            module.fast_fp32 = bool(enabled)
            count += 1
    return count
