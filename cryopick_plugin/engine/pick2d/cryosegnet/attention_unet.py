"""CryoSegNet's attention-gated U-Net for 2D particle segmentation.

Layout (as in CryoSegNet's five-level model):

* encoder: ``levels`` blocks of [3×3 conv → BN → ReLU] ×2 followed by 2×2 max pooling, widths
  ``base_width · 2**i``; a bottleneck block of twice the deepest width;
* decoder: bilinear ×2 upsampling (no transposed convolution, so the upsampled tensor keeps its width),
  an attention gate on the skip tensor, concatenation of [upsampled, gated skip] and a conv block;
* the gate is ``sigmoid(conv1×1(relu(BN(conv1×1(g)) + BN(conv1×1(s)))))`` with as many output channels as
  the skip tensor: a per-channel attention map, not the single-channel map of Oktay et al.;
* head: 1×1 conv to one channel of logits.

``PRESETS['paper']`` (base width 64, five levels) has ≈131 M parameters, the published network. The
``'cpu'`` preset is 1/8 of that width (≈2 M parameters, 64× fewer multiply-adds), small enough to train on a
workstation. The input side must be a multiple of ``2**levels``.
"""
import torch
from torch import nn

PRESETS = {
    'paper': {'in_ch': 1, 'base_width': 64, 'levels': 5},
    'cpu': {'in_ch': 1, 'base_width': 8, 'levels': 5},
}


class ConvBlock(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class AttentionGate(nn.Module):
    """Weights each channel of the skip tensor `s` by a map computed from `s` and the gating tensor `g`."""

    def __init__(self, cg, cs, cout):
        super().__init__()
        self.wg = nn.Sequential(nn.Conv2d(cg, cout, 1), nn.BatchNorm2d(cout))
        self.ws = nn.Sequential(nn.Conv2d(cs, cout, 1), nn.BatchNorm2d(cout))
        self.out = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 1), nn.Sigmoid())

    def forward(self, g, s):
        return self.out(self.wg(g) + self.ws(s)) * s


class DecoderBlock(nn.Module):
    def __init__(self, cg, cs, cout):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode='bilinear', align_corners=True)
        self.gate = AttentionGate(cg, cs, cout)
        self.conv = ConvBlock(cg + cout, cout)

    def forward(self, x, skip):
        x = self.up(x)
        return self.conv(torch.cat([x, self.gate(x, skip)], dim=1))


class AttentionUNet(nn.Module):
    """Attention U-Net: (B, in_ch, H, W) → (B, 1, H, W) logits; H and W multiples of 2**levels."""

    def __init__(self, in_ch=1, base_width=64, levels=5):
        super().__init__()
        if levels < 1 or base_width < 1:
            raise ValueError('levels and base_width must be positive')
        self.levels = levels
        widths = [base_width * 2 ** i for i in range(levels)]
        self.encoders = nn.ModuleList()
        cin = in_ch
        for w in widths:
            self.encoders.append(ConvBlock(cin, w))
            cin = w
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = ConvBlock(widths[-1], 2 * widths[-1])
        self.decoders = nn.ModuleList()
        cg = 2 * widths[-1]
        for w in reversed(widths):
            self.decoders.append(DecoderBlock(cg, w, w))
            cg = w
        self.head = nn.Conv2d(widths[0], 1, 1)

    @property
    def multiple(self):
        """Input sides must be divisible by this."""
        return 2 ** self.levels

    def forward(self, x):
        skips = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for dec, skip in zip(self.decoders, reversed(skips)):
            x = dec(x, skip)
        return self.head(x)


def build(arch):
    """An AttentionUNet from an arch dictionary (a preset or what a model file stores)."""
    return AttentionUNet(in_ch=int(arch.get('in_ch', 1)), base_width=int(arch['base_width']),
                         levels=int(arch.get('levels', 5)))


def preset_arch(preset):
    if preset not in PRESETS:
        raise KeyError(preset)
    return dict(PRESETS[preset])


def count_parameters(arch):
    """Number of parameters of the network `arch` describes, without allocating its weights."""
    with torch.device('meta'):
        net = build(arch)
    return sum(p.numel() for p in net.parameters())


def count_macs(arch, side=1024):
    """Multiply-accumulates of the convolutions in one forward pass on a side×side image (no allocation)."""
    with torch.device('meta'):
        net = build(arch)
    macs = 0
    size = {'s': side}

    def hook(module, inputs, output):
        nonlocal macs
        k = module.kernel_size[0] * module.kernel_size[1]
        macs += output.numel() * module.in_channels * k // module.groups

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        net(torch.empty(1, int(arch.get('in_ch', 1)), size['s'], size['s'], device='meta'))
    for h in handles:
        h.remove()
    return macs
