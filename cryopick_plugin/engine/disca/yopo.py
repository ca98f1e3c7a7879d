"""YOPO, the feature network of DISCA, in PyTorch.

The layout follows the Keras network of the DISCA paper (PNAS 2023), not aitom's PyTorch port:

    input (1, b, b, b)
    → Gaussian dropout (multiplicative N(1, σ²) noise with σ² = rate / (1 − rate), training only)
    → 10 × [3×3×3 convolution without padding → ELU → batch norm], a global max pool after every block
    → concatenation of the 10 pooled vectors → batch norm → linear feature (1024-d)
    → classification head: linear → softmax over K clusters (rebuilt whenever K changes).

No pooling inside the stack: ten valid convolutions shrink b by 20, so the smallest input is 21³. Global
max pooling makes the features invariant to shifts of the particle that keep its response inside the
valid region; rotation invariance is learnt from rotated copies during training. Kernels are initialised
orthogonally and biases with zeros, as in the reference. Batch norm uses Keras' defaults (momentum 0.99 in
Keras' convention = 0.01 in PyTorch's, ε = 1e-3) unless the architecture says otherwise.

The convolutions are `engine.conv3d.Conv3d` (nn.Conv3d parameters; a faster fp32 route on the CPU).

`PRESETS` holds the two widths the commands offer: 'paper' (64…208 channels, the reference) and 'cpu'
(a quarter of that, subtomograms binned to 24³) for machines without a GPU.
"""
import copy

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from ..conv3d import Conv3d
from ..errors import InputError

MIN_BOX = 21  # ten valid 3×3×3 convolutions need at least 21 voxels to leave one

PRESETS = {
    # The Keras reference: 64, 80, …, 208 channels, 1024-d feature, input used at its own size.
    'paper': {'widths': [64 + 16 * i for i in range(10)], 'feature_dim': 1024, 'box': None,
              'dropout': 0.5, 'bn_momentum': 0.01, 'bn_eps': 1e-3},
    # A quarter of the width and a 24³ input: ~15× fewer operations per subtomogram than 'paper' at 32³.
    # Batch-norm statistics follow faster because there are fewer, shorter iterations on a CPU.
    'cpu': {'widths': [16 + 4 * i for i in range(10)], 'feature_dim': 1024, 'box': 24,
            'dropout': 0.5, 'bn_momentum': 0.1, 'bn_eps': 1e-3},
}


def make_arch(preset='cpu', **overrides):
    """Architecture dictionary (JSON-able constructor arguments) from a preset name or dict + overrides."""
    if isinstance(preset, dict):
        arch = copy.deepcopy(preset)
    else:
        if preset not in PRESETS:
            raise InputError('preset', f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
        arch = copy.deepcopy(PRESETS[preset])
    arch.update({k: v for k, v in overrides.items() if v is not None})
    arch['widths'] = [int(w) for w in arch['widths']]
    if len(arch['widths']) < 1 or min(arch['widths']) < 1:
        raise InputError('preset', f"bad channel widths {arch['widths']}")
    return arch


class GaussianDropout(nn.Module):
    """Keras' GaussianDropout: multiply by N(1, rate/(1−rate)) noise while training, identity otherwise."""

    def __init__(self, rate):
        super().__init__()
        self.rate = float(rate)

    def forward(self, x):
        if not self.training or self.rate <= 0:
            return x
        sigma = (self.rate / (1.0 - self.rate)) ** 0.5
        return x * (1.0 + sigma * torch.randn_like(x))


class YOPOFeatures(nn.Module):
    """Input (n, 1, b, b, b) → feature (n, feature_dim). `taps(x)` also returns every block's pooled vector."""

    def __init__(self, widths, feature_dim=1024, dropout=0.5, bn_momentum=0.01, bn_eps=1e-3, **_unused):
        super().__init__()
        self.dropout = GaussianDropout(dropout)
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        c_in = 1
        for c in widths:
            self.convs.append(Conv3d(c_in, c, kernel_size=3, padding=0))
            self.norms.append(nn.BatchNorm3d(c, momentum=bn_momentum, eps=bn_eps))
            c_in = c
        self.norm_cat = nn.BatchNorm1d(sum(widths), momentum=bn_momentum, eps=bn_eps)
        self.fc = nn.Linear(sum(widths), feature_dim)
        self.n_blocks = len(widths)
        for module in list(self.convs) + [self.fc]:
            nn.init.orthogonal_(module.weight)
            nn.init.zeros_(module.bias)

    def stack(self, x):
        """The pooled vector of every block (list of (n, c)), after the input dropout."""
        x = self.dropout(x)
        pooled = []
        for conv, norm in zip(self.convs, self.norms):
            x = norm(F.elu(conv(x)))
            pooled.append(torch.amax(x, dim=(2, 3, 4)))
        return pooled

    def forward(self, x):
        return self.fc(self.norm_cat(torch.cat(self.stack(x), dim=1)))


class YOPOHead(nn.Module):
    """Linear layer to K cluster scores; `forward` returns softmax probabilities as in the reference."""

    def __init__(self, feature_dim, k):
        super().__init__()
        self.k = int(k)
        self.linear = nn.Linear(feature_dim, self.k)
        nn.init.orthogonal_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features):
        return torch.softmax(self.linear(features), dim=1)


def build_features(arch):
    """A freshly initialised feature network for an architecture dictionary."""
    return YOPOFeatures(**arch)


def categorical_hinge(probabilities, targets):
    """Keras' categorical hinge: mean of max(0, 1 + max_wrong(p) − Σ target·p) over the batch."""
    positive = (targets * probabilities).sum(dim=1)
    negative = ((1.0 - targets) * probabilities).amax(dim=1)
    return torch.clamp(negative - positive + 1.0, min=0.0).mean()


def min_box(arch):
    return 2 * len(arch['widths']) + 1


def bin_stack(stack, box):
    """Resample an (n, b, b, b) stack to (n, box, box, box) by Fourier cropping (no aliasing); float32.

    Fourier cropping keeps the low frequencies exactly and drops the rest, the usual way to bin cryo-EM
    data by a non-integer factor. A stack already at `box` (or `box` None) is returned as float32.
    """
    stack = np.asarray(stack, dtype=np.float32)
    b = stack.shape[-1]
    if box is None or int(box) == b:
        return stack
    box = int(box)
    if box > b:
        raise InputError('box', f"cannot bin {b}³ subtomograms up to {box}³")
    out = np.empty((len(stack), box, box, box), dtype=np.float32)
    lo = box // 2  # frequencies kept on the negative side of the two full axes
    hi = box - lo
    for start in range(0, len(stack), 256):
        chunk = np.fft.fftshift(np.fft.fftn(stack[start:start + 256], axes=(1, 2, 3)), axes=(1, 2, 3))
        c = b // 2
        cropped = chunk[:, c - lo:c + hi, c - lo:c + hi, c - lo:c + hi]
        back = np.fft.ifftn(np.fft.ifftshift(cropped, axes=(1, 2, 3)), axes=(1, 2, 3)).real
        out[start:start + 256] = back * (box / b) ** 3
    return out


def normalise_stack(stack):
    """Zero mean, unit standard deviation per subtomogram (float32); constant ones become zeros.

    Per-subtomogram normalisation makes subtomograms from tomograms of different contrast comparable and
    lets a trained model be applied to new data without stored statistics.
    """
    stack = np.asarray(stack, dtype=np.float32)
    flat = stack.reshape(len(stack), -1)
    mean = flat.mean(axis=1, keepdims=True)
    std = flat.std(axis=1, keepdims=True)
    std[std == 0] = 1.0
    return ((flat - mean) / std).reshape(stack.shape).astype(np.float32)


def prepare_stack(stack, arch, source='subtomograms'):
    """Check, bin to the architecture's box and normalise a stack; return (n, b, b, b) float32."""
    stack = np.asarray(stack)
    if stack.ndim != 4 or not (stack.shape[1] == stack.shape[2] == stack.shape[3]):
        raise InputError(source, f"expected a stack of cubic subtomograms (n, b, b, b), got shape {stack.shape}")
    if len(stack) == 0:
        raise InputError(source, "no subtomograms")
    if not np.all(np.isfinite(stack)):
        raise InputError(source, "subtomograms contain NaN or infinite values")
    target = arch.get('box')
    b = stack.shape[-1]
    if target is not None and b < int(target):
        target = None  # smaller boxes are used as they are; they only need to pass the minimum below
    size = int(target) if target is not None else b
    if size < min_box(arch):
        raise InputError(source, f"subtomograms of {b}³ are too small for {len(arch['widths'])} valid "
                                 f"convolutions (need at least {min_box(arch)}³)")
    return normalise_stack(bin_stack(stack, target))


@torch.no_grad()
def extract_features(net, stack, device='cpu', batch_size=64, precision='fp32'):
    """Eval-mode features of a prepared (n, b, b, b) stack, as an (n, feature_dim) float32 array;
    precision 'bf16' runs the network under bf16 autocast."""
    from ..settings import autocast
    net.eval()
    out = []
    for start in range(0, len(stack), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(stack[start:start + batch_size])[:, None]).to(device)
        with autocast(device, precision):
            y = net(x)
        out.append(y.float().cpu().numpy())
    return np.concatenate(out, axis=0)


class DeterministicTorch:
    """Deterministic torch algorithms on CPU for the duration of a run, restored afterwards."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        self.previous = torch.are_deterministic_algorithms_enabled()
        if self.device == 'cpu':
            torch.use_deterministic_algorithms(True)
        return self

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.previous)
        return False
