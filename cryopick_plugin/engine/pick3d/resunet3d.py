"""DeepETPicker's 3D residual U-Net ("3D-ResUNet"), with its switches as constructor flags.

Structure (as the reference runs it):

- encoder level 0 works at full resolution; level k > 0 first average-pools by 2 (not max-pools);
- image pyramid (``use_pyramid``): level k > 0 also receives the input average-pooled k times (1 channel);
- CoordConv (``use_coords``): three channels z, y, x = linspace(−1, 1) over the patch are concatenated
  before every encoder and decoder block (patch-relative, as in the reference);
- residual block: three conv3×3×3 → norm → ReLU; the residual is taken after conv1 and added after conv3,
  and the sum goes through an ELU;
- decoder: transposed conv (k=3, s=2) to the skip's size, skip joined by SUMMATION, then a residual block;
- head: 1×1×1 conv. One class: 1 output channel, sigmoid. N > 1 classes: N+1 channels (0 = background),
  softmax.

`forward` returns logits; `probabilities` the sigmoid/softmax. Any input size works: the input is padded
(edge replication) up to a multiple of 2**depth, run, and the output cropped back, so the output has
exactly the input's spatial shape, odd sizes included.

Presets: 'paper' (widths 24/48/72/108, patch 72, ≈2.43 M parameters) and 'cpu' (8/16/24/36, patch 48).

The 3×3×3 and 1×1×1 convolutions are `engine.conv3d.Conv3d`: plain nn.Conv3d parameters (model files are
unchanged), computed by a faster route in fp32 on the CPU (see that module).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..conv3d import Conv3d

PRESETS = {
    'paper': {'widths': (24, 48, 72, 108), 'patch': 72, 'pad': 12, 'batch_size': 8, 'lr': 1e-3},
    'cpu': {'widths': (8, 16, 24, 36), 'patch': 48, 'pad': 8, 'batch_size': 1, 'lr': 2e-3},
}


def _norm(kind, channels):
    if kind == 'bn':
        return nn.BatchNorm3d(channels)
    if kind == 'gn':
        return nn.GroupNorm(min(4, channels), channels)
    raise ValueError(f"unknown norm {kind!r} (bn or gn)")


class ConvNormAct(nn.Sequential):
    def __init__(self, cin, cout, norm):
        super().__init__(Conv3d(cin, cout, 3, padding=1, bias=False), _norm(norm, cout),
                         nn.ReLU(inplace=True))


class ResBlock(nn.Module):
    """Three conv-norm-ReLU units; residual from the first one; ELU after the sum."""

    def __init__(self, cin, cout, norm='bn'):
        super().__init__()
        self.conv1 = ConvNormAct(cin, cout, norm)
        self.conv2 = ConvNormAct(cout, cout, norm)
        self.conv3 = ConvNormAct(cout, cout, norm)
        self.act = nn.ELU(inplace=True)

    def forward(self, x):
        x = self.conv1(x)
        return self.act(self.conv3(self.conv2(x)) + x)


def coord_channels(x):
    """z, y, x channels running from −1 to 1 across the patch, for a (B, C, D, H, W) tensor."""
    b, _, d, h, w = x.shape
    axes = [torch.linspace(-1.0, 1.0, n, device=x.device, dtype=x.dtype) for n in (d, h, w)]
    zz, yy, xx = torch.meshgrid(*axes, indexing='ij')
    return torch.stack([zz, yy, xx]).unsqueeze(0).expand(b, -1, -1, -1, -1)


class ResUNet3D(nn.Module):
    def __init__(self, n_classes=1, widths=(24, 48, 72, 108), use_pyramid=True, use_coords=True,
                 in_channels=1, norm='bn'):
        super().__init__()
        self.n_classes = int(n_classes)
        self.widths = tuple(int(w) for w in widths)
        self.use_pyramid = bool(use_pyramid)
        self.use_coords = bool(use_coords)
        self.in_channels = int(in_channels)
        self.depth = len(self.widths) - 1
        extra = 3 if self.use_coords else 0
        self.encoders = nn.ModuleList()
        prev = self.in_channels
        for k, w in enumerate(self.widths):
            cin = prev + extra + (self.in_channels if (k > 0 and self.use_pyramid) else 0)
            self.encoders.append(ResBlock(cin, w, norm))
            prev = w
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for k in range(self.depth, 0, -1):
            cin, cout = self.widths[k], self.widths[k - 1]
            self.ups.append(nn.ConvTranspose3d(cin, cout, 3, stride=2, padding=1))
            self.decoders.append(ResBlock(cout + extra, cout, norm))
        self.out_channels = 1 if self.n_classes == 1 else self.n_classes + 1
        self.head = Conv3d(self.widths[0], self.out_channels, 1)

    def arch(self):
        """Constructor arguments (JSON-able), as stored in a model file."""
        norm = 'bn' if isinstance(self.encoders[0].conv1[1], nn.BatchNorm3d) else 'gn'
        return {'n_classes': self.n_classes, 'widths': list(self.widths), 'use_pyramid': self.use_pyramid,
                'use_coords': self.use_coords, 'in_channels': self.in_channels, 'norm': norm}

    def _cat_coords(self, x):
        return torch.cat([x, coord_channels(x)], 1) if self.use_coords else x

    def forward(self, x):
        size = x.shape[2:]
        m = 2 ** self.depth
        pads = []
        for n in reversed(size):  # F.pad wants the last axis first
            pads += [0, (-n) % m]
        if any(pads):
            x = F.pad(x, pads, mode='replicate')
        pyramid = x
        skips = []
        h = x
        for k, enc in enumerate(self.encoders):
            if k > 0:
                h = F.avg_pool3d(h, 2)
                if self.use_pyramid:
                    pyramid = F.avg_pool3d(pyramid, 2)
                    h = torch.cat([h, pyramid], 1)
            h = enc(self._cat_coords(h))
            skips.append(h)
        for up, dec, skip in zip(self.ups, self.decoders, reversed(skips[:-1])):
            h = up(h, output_size=skip.shape[2:]) + skip
            h = dec(self._cat_coords(h))
        out = self.head(h)
        return out[..., :size[0], :size[1], :size[2]]

    def probabilities(self, logits):
        return torch.sigmoid(logits) if self.out_channels == 1 else torch.softmax(logits, 1)

    def foreground(self, x):
        """Per-class foreground probability, (B, n_classes, D, H, W): channel c−1 is class c."""
        p = self.probabilities(self(x))
        return p if self.out_channels == 1 else p[:, 1:]


def build(preset='cpu', n_classes=1, **overrides):
    """A network from a preset name with optional constructor overrides (e.g. widths)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} ({', '.join(PRESETS)})")
    kwargs = {'widths': PRESETS[preset]['widths']}
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return ResUNet3D(n_classes=n_classes, **kwargs)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def training_step_flops(model, patch, batch_size=1):
    """Floating-point operations of one training step (forward + backward) on `batch_size` cubes of side
    `patch`, counted with torch's FlopCounterMode (convolutions and matrix products)."""
    from torch.utils.flop_counter import FlopCounterMode
    was_training = model.training
    model.train()
    x = torch.randn(batch_size, model.in_channels, patch, patch, patch)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return int(counter.get_total_flops())
