"""DeepCryoPicker's patch classifier: the network, its training and sliding-window scoring.

No public code has the classifier; the 'paper' preset follows the DeepCryoPicker paper (an AlexNet-like
network): input 227×227, convolutions 96@11×11 (stride 4), 256@5×5, 384@3×3, 384@3×3, 256@3×3, three
3×3 max-pools (stride 2), two fully connected layers (4096, then the classes), ReLU, cross-entropy, SGD
with learning rate 1e-4 (momentum 0.9).

The 'cpu' preset keeps the layout (five convolutions, three max-pools, two fully connected layers) but is
narrow, unpadded ('valid') and sees 48×48 windows: 24@5×5, 48@3×3, 64@3×3, 64@3×3, 48@3×3, FC 128,
trained with Adam (lr 1e-3) with batch normalisation. Reasons: a 227² AlexNet scores a 4096² micrograph with hundreds of
thousands of windows, hours on a CPU; SGD at 1e-4 needs far more epochs than a CPU run affords. Particles
are rescaled to about 24 px, which keeps their outline and the context around them.

Input patches are single-channel images in [0, 1] (the preprocessed micrograph) minus 0.5.

Scoring a micrograph (`dense_score_map`) runs the network fully convolutionally: the convolution layers
over the whole image once, the first fully connected layer as a convolution whose kernel is the
feature-map size of one window, the second as a 1×1 convolution. That equals classifying every window
whose corner lies on the network's total stride (8 px for 'cpu', 32 for 'paper'); shifted copies of the
input fill in a finer grid. With unpadded convolutions ('cpu') the two are identical; with the paper's
padded ones, convolutions near a window's edge see the real neighbourhood instead of zeros, a small
difference for 227² windows. It is about 100× cheaper than cutting the windows out (`score_map`, kept for checks).
"""
import numpy as np

PRESETS = {
    'cpu': dict(window=48, particle=24, convs=[(24, 5, 1), (48, 3, 1), (64, 3, 1), (64, 3, 1), (48, 3, 1)],
                pools_after=[0, 1, 4], fc=128, batchnorm=True, dropout=0.3, padding='valid',
                optimizer='adam', lr=1e-3, epochs=12, batch=64, per_class=600),
    'paper': dict(window=227, particle=160, convs=[(96, 11, 4), (256, 5, 1), (384, 3, 1), (384, 3, 1),
                                                  (256, 3, 1)],
                  pools_after=[0, 1, 4], fc=4096, batchnorm=False, dropout=0.5, padding='same',
                  optimizer='sgd', lr=1e-4, epochs=30, batch=64, per_class=1500),
}


def build_network(arch):
    """A torch module from an arch dict: window, convs [(channels, kernel, stride)], pools_after, fc,
    batchnorm, dropout, n_classes."""
    import torch
    from torch import nn

    class PatchClassifier(nn.Module):
        def __init__(self, window, convs, pools_after, fc, n_classes, batchnorm=False, dropout=0.5,
                     padding='same'):
            super().__init__()
            layers, cin = [], 1
            for i, (cout, k, s) in enumerate(convs):
                pad = k // 2 if (s == 1 and padding == 'same') else 0
                layers.append(nn.Conv2d(cin, cout, k, stride=s, padding=pad))
                if batchnorm:
                    layers.append(nn.BatchNorm2d(cout))
                layers.append(nn.ReLU(inplace=True))
                if i in pools_after:
                    layers.append(nn.MaxPool2d(3, stride=2))
                cin = cout
            self.features = nn.Sequential(*layers)
            self.features.eval()  # batch-norm cannot run in training mode on the 1×1 probe output
            with torch.no_grad():
                n_flat = self.features(torch.zeros(1, 1, window, window)).numel()
            self.features.train()
            self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(n_flat, fc),
                                            nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(fc, n_classes))

        def forward(self, x):
            return self.classifier(self.features(x))

    return PatchClassifier(arch['window'], [tuple(c) for c in arch['convs']], arch['pools_after'],
                           arch['fc'], arch['n_classes'], arch.get('batchnorm', False), arch.get('dropout', 0.5),
                           arch.get('padding', 'same'))


def arch_for(preset, n_classes, **overrides):
    from ...errors import InputError
    if preset not in PRESETS:
        raise InputError('preset', f"unknown preset '{preset}' ({', '.join(PRESETS)})")
    p = dict(PRESETS[preset])
    p.update({k: v for k, v in overrides.items() if v is not None})
    return dict(window=int(p['window']), convs=[list(c) for c in p['convs']], pools_after=list(p['pools_after']),
                fc=int(p['fc']), batchnorm=bool(p['batchnorm']), dropout=float(p['dropout']),
                padding=str(p.get('padding', 'same')), n_classes=int(n_classes))


def augment_rotations(patches, labels, per_class, rng):
    """Balance classes to `per_class` samples: 0/90/180/270° rotations (and mirror images when more are
    needed) of each class's patches, then a random subset when there are more than needed."""
    out_p, out_l = [], []
    for c in np.unique(labels):
        base = patches[labels == c]
        variants = [np.rot90(base, k, axes=(1, 2)) for k in range(4)]
        pool = np.concatenate(variants)
        if len(pool) < per_class:
            pool = np.concatenate([pool, pool[:, :, ::-1]])
        take = rng.choice(len(pool), per_class, replace=len(pool) < per_class)
        out_p.append(pool[take])
        out_l.append(np.full(per_class, c))
    return np.ascontiguousarray(np.concatenate(out_p)), np.concatenate(out_l)


def train_classifier(net, patches, labels, epochs, batch, lr, optimizer='adam', seed=0, device='cpu',
                     log=None, val_fraction=0.1, resume=None, on_epoch=None):
    """Cross-entropy training; returns {'train_accuracy', 'val_accuracy', 'loss'} of the last epoch.

    Progress lines (steps, rate, ETA) go to `log` (default: this module's logger) every few seconds.
    on_epoch: callable receiving the training state after every epoch ({'epoch', 'net', 'optimizer', 'rng',
    'stats'}), before the epoch's line is logged; resume: such a state, to continue from that epoch.
    """
    import logging

    import torch
    from ...checkpoint import restore_rng, rng_state
    from ...progress import Progress
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n = len(patches)
    order = rng.permutation(n)
    n_val = int(round(val_fraction * n)) if n >= 20 else 0
    val, train = order[:n_val], order[n_val:]
    x = torch.from_numpy(np.asarray(patches, np.float32)[:, None] - 0.5)
    y = torch.from_numpy(np.asarray(labels, np.int64))
    net.to(device)
    opt = (torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9) if optimizer == 'sgd'
           else torch.optim.Adam(net.parameters(), lr=lr))
    loss_fn = torch.nn.CrossEntropyLoss()
    stats, first = {}, 0
    if resume is not None:
        net.load_state_dict(resume['net'])
        opt.load_state_dict(resume['optimizer'])
        restore_rng(resume['rng'], rng)
        stats, first = dict(resume['stats']), int(resume['epoch'])
    for epoch in range(first, int(epochs)):
        net.train()
        perm = train[rng.permutation(len(train))]
        total, correct, loss_sum = 0, 0, 0.0
        progress = Progress(f'epoch {epoch + 1}/{epochs}', -(-len(perm) // batch),
                            say=log or logging.getLogger(__name__).info)
        for i in range(0, len(perm), batch):
            idx = torch.from_numpy(perm[i:i + batch])
            xb, yb = x[idx].to(device), y[idx].to(device)
            if len(idx) < 2 and any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()):
                continue
            opt.zero_grad()
            out = net(xb)
            loss = loss_fn(out, yb)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
            correct += int((out.argmax(1) == yb).sum())
            total += len(idx)
            progress.update(note=lambda: f'loss {loss_sum / max(total, 1):.3f}')
        stats = {'loss': loss_sum / max(total, 1), 'train_accuracy': correct / max(total, 1)}
        if n_val:
            stats['val_accuracy'] = float((predict(net, patches[val], device=device).argmax(1)
                                           == labels[val]).mean())
        if on_epoch is not None:
            on_epoch({'epoch': epoch + 1, 'net': net.state_dict(), 'optimizer': opt.state_dict(),
                      'rng': rng_state(rng), 'stats': dict(stats)})
        if log:
            log(f"epoch {epoch + 1}/{epochs}: loss {stats['loss']:.3f}, train acc {stats['train_accuracy']:.3f}"
                + (f", val acc {stats['val_accuracy']:.3f}" if n_val else ''))
    net.eval()
    return stats


def predict(net, patches, device='cpu', batch=512):
    """Class probabilities (N, n_classes) of patches (N, w, w) in [0, 1]."""
    import torch
    net.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(patches), batch):
            xb = torch.from_numpy(np.asarray(patches[i:i + batch], np.float32)[:, None] - 0.5).to(device)
            out.append(torch.softmax(net(xb), 1).cpu().numpy())
    n_classes = net.classifier[-1].out_features
    return np.concatenate(out) if out else np.zeros((0, n_classes), np.float32)


def score_map(net, image, window, stride, device='cpu', rows_per_batch=None):
    """Slide the classifier over the whole image (mirror-padded so every grid point is a window centre).

    Returns probabilities of shape (ny, nx, n_classes) for window centres at (row, col) = (i·stride,
    j·stride) of `image`.
    """
    import torch
    import torch.nn.functional as F
    image = np.asarray(image, np.float32)
    half = window // 2
    padded = np.pad(image, ((half, window - half), (half, window - half)), mode='reflect')
    H, W = image.shape
    ny, nx = (H - 1) // stride + 1, (W - 1) // stride + 1
    t = torch.from_numpy(padded - 0.5)[None, None].to(device)
    rows_per_batch = rows_per_batch or max(1, 4096 // nx)
    out = []
    net.eval()
    with torch.no_grad():
        for r0 in range(0, ny, rows_per_batch):
            r1 = min(ny, r0 + rows_per_batch)
            strip = t[:, :, r0 * stride:(r1 - 1) * stride + window, :]
            cols = F.unfold(strip, kernel_size=window, stride=stride)  # (1, w*w, L)
            cols = cols[0].T.reshape(-1, 1, window, window)
            probs = torch.softmax(net(cols), 1).cpu().numpy()
            out.append(probs.reshape(r1 - r0, -1, probs.shape[1])[:, :nx])
    return np.concatenate(out, axis=0)


def total_stride(arch):
    """Distance in input pixels between neighbouring outputs of the fully convolutional network."""
    stride = 1
    for i, (_, _, s) in enumerate(arch['convs']):
        stride *= int(s)
        if i in arch['pools_after']:
            stride *= 2
    return stride


def grid_step(arch, stride):
    """The step of `dense_score_map`'s grid for a wanted `stride`: the largest divisor of the network's
    total stride not above it."""
    total = total_stride(arch)
    return max(s for s in range(1, total + 1) if total % s == 0 and s <= max(1, int(stride)))


def dense_score_map(net, arch, image, stride, device='cpu'):
    """Fully convolutional equivalent of `score_map` (see module doc): probabilities (ny, nx, classes) for
    window centres at (i·step, j·step), step the largest divisor of the network stride not above `stride`.

    Returns (probabilities, step).
    """
    import torch
    import torch.nn.functional as F
    window = int(arch['window'])
    total = total_stride(arch)
    step = grid_step(arch, stride)
    n_shift = total // step
    image = np.asarray(image, np.float32)
    H, W = image.shape
    half = window // 2
    extra = total  # room for the shifts and for the last window
    padded = np.pad(image, ((half, window - half + extra), (half, window - half + extra)), mode='reflect')
    linear1, linear2 = net.classifier[2], net.classifier[-1]
    net.eval()
    with torch.no_grad():
        fh, fw = net.features(torch.zeros(1, 1, window, window, device=device)).shape[-2:]
        w1 = linear1.weight.reshape(linear1.out_features, -1, fh, fw)
        w2 = linear2.weight[:, :, None, None]
        ny, nx = (H - 1) // step + 1, (W - 1) // step + 1
        out = np.zeros((ny, nx, linear2.out_features), np.float32)
        for a in range(n_shift):
            for b in range(n_shift):
                sub = torch.from_numpy(np.ascontiguousarray(padded[a * step:, b * step:]) - 0.5)
                feat = net.features(sub[None, None].to(device))
                hidden = F.relu(F.conv2d(feat, w1, linear1.bias))
                probs = torch.softmax(F.conv2d(hidden, w2, linear2.bias), 1)[0].permute(1, 2, 0).cpu().numpy()
                # Output (i, j) of this shift is the window centred at (i·total + a·step, j·total + b·step).
                rows = np.arange(a, ny, n_shift)
                cols = np.arange(b, nx, n_shift)
                ri, ci = (rows - a) // n_shift, (cols - b) // n_shift
                ri, ci = ri[ri < probs.shape[0]], ci[ci < probs.shape[1]]
                out[np.ix_(rows[:len(ri)], cols[:len(ci)])] = probs[np.ix_(ri, ci)]
    return out, step
