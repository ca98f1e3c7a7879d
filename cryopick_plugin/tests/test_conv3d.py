"""The fast fp32 CPU route of the 3D convolutions equals F.conv3d (outputs and gradients), and the networks
built on it give the same results and exchange state dicts with the plain path."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cryopick_plugin.engine import conv3d
from cryopick_plugin.engine.conv3d import Conv3d, conv3d_fp32, conv3d_slices, use_fast_fp32
from cryopick_plugin.engine.disca import yopo
from cryopick_plugin.engine.pick3d.resunet3d import ResUNet3D

CASES = [  # batch, c_in, c_out, (D, H, W), kernel, padding, bias
    (1, 3, 5, (9, 8, 9), 3, (1, 1, 1), False),   # the ResUNet's padded convolution, odd sizes
    (1, 2, 4, (8, 9, 10), 3, (0, 0, 0), True),   # YOPO's valid convolution
    (2, 3, 4, (7, 7, 7), 3, (1, 1, 1), True),    # batched (oneDNN channels-last route)
    (3, 2, 3, (6, 8, 7), 3, (0, 0, 0), False),
    (1, 2, 3, (6, 5, 7), 3, (2, 0, 1), True),    # unequal padding, wider than the kernel's half
    (1, 4, 2, (5, 6, 7), 1, (0, 0, 0), True),    # the 1×1×1 head
    (1, 2, 3, (7, 6, 5), (3, 1, 3), (1, 0, 1), False),  # non-cubic kernel
]


def _grads(fn, x, w, b, g):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    y = fn(x, w, b)
    y.backward(g)
    return y.detach(), x.grad, w.grad, None if b is None else b.grad


def _close(a, b, rtol=2e-5):
    """Equal up to fp32 summation order: max difference small against the largest value."""
    scale = float(b.detach().abs().max()) or 1.0
    return float((a - b).detach().abs().max()) <= rtol * scale


@pytest.mark.parametrize('route', ['slices', 'auto'])
@pytest.mark.parametrize('n,cin,cout,size,k,pad,bias', CASES)
def test_fast_route_equals_conv3d_outputs_and_gradients(route, n, cin, cout, size, k, pad, bias):
    gen = torch.Generator().manual_seed(n * 100 + cin * 10 + cout)
    ks = (k, k, k) if isinstance(k, int) else k
    x = torch.randn(n, cin, *size, generator=gen)
    w = torch.randn(cout, cin, *ks, generator=gen)
    b = torch.randn(cout, generator=gen) if bias else None
    out_shape = F.conv3d(x, w, b, 1, pad).shape
    g = torch.randn(out_shape, generator=gen)
    fast = conv3d_slices if route == 'slices' else conv3d_fp32
    ref = _grads(lambda x, w, b: F.conv3d(x, w, b, 1, pad), x, w, b, g)
    got = _grads(lambda x, w, b: fast(x, w, b, pad), x, w, b, g)
    assert got[0].shape == ref[0].shape
    for name, a, r in zip(('output', 'input grad', 'weight grad', 'bias grad'), got, ref):
        if r is not None:
            assert _close(a, r), f"{name}: max diff {float((a - r).abs().max()):.3g}"


def test_a_wrong_shift_would_be_caught():
    """The comparison above is sharp enough to see a tap added one slice off (a plausible bug)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 6, 6, 6, generator=gen)
    w = torch.randn(3, 2, 3, 3, 3, generator=gen)
    flipped = w.flip(2)  # taps in the wrong depth order = every shift wrong
    assert not _close(conv3d_slices(x, flipped, None, (1, 1, 1)), F.conv3d(x, w, None, 1, 1))


def test_module_takes_the_fast_route_only_for_fp32_cpu_and_can_be_switched_off(monkeypatch):
    torch.manual_seed(0)
    conv = Conv3d(2, 3, 3, padding=1)
    x = torch.randn(1, 2, 6, 9, 8)
    ref = F.conv3d(x, conv.weight, conv.bias, 1, 1)
    with torch.no_grad():
        fast = conv(x)
        # the batch-1 route returns channels-last: the sign that it was taken
        assert fast.is_contiguous(memory_format=torch.channels_last_3d) and not fast.is_contiguous()
        assert _close(fast, ref)
        small = conv(x[:, :, :, :7, :7])  # slices under 8×8: torch's own route
        assert small.is_contiguous() and _close(small, F.conv3d(x[:, :, :, :7, :7], conv.weight, conv.bias, 1, 1))
        use_fast_fp32(conv, False)
        plain = conv(x)
        assert plain.is_contiguous() and torch.equal(plain, ref)
        use_fast_fp32(conv, True)
        monkeypatch.setenv(conv3d.CONV3D_VAR, 'plain')
        assert conv(x).is_contiguous()
        monkeypatch.setenv(conv3d.CONV3D_VAR, 'auto')
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = conv(x)
        assert low.dtype == torch.bfloat16  # autocast keeps PyTorch's own (oneDNN bf16) convolution
        assert float((low.float() - ref).abs().max()) < 0.05 * float(ref.abs().max())


def test_use_fast_fp32_converts_plain_conv3d_modules():
    net = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv3d(2, 1, 1))
    x = torch.randn(1, 1, 5, 5, 5)
    with torch.no_grad():
        before = net(x)
        assert use_fast_fp32(net) == 2
        assert all(type(m) is Conv3d for m in (net[0], net[2]))
        assert _close(net(x), before)


def _plain_copy(net):
    """The same network with every Conv3d turned back into torch's nn.Conv3d (the path before)."""
    other = copy.deepcopy(net)
    for module in other.modules():
        if isinstance(module, Conv3d):
            module.__class__ = nn.Conv3d
    return other


def _compare_networks(net, x, out_fn):
    plain = _plain_copy(net)
    assert list(net.state_dict()) == list(plain.state_dict())
    assert all(a.shape == b.shape for a, b in zip(net.state_dict().values(), plain.state_dict().values()))
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    ya, yb = out_fn(net, xa), out_fn(plain, xb)
    assert _close(ya, yb, 1e-4)
    ya.square().sum().backward()
    yb.square().sum().backward()
    assert _close(xa.grad, xb.grad, 1e-4)
    # rounding differences travel through the layers: each gradient is held to 1e-4 of its own largest
    # value or 1e-5 of the largest gradient of the network (a parameter whose gradient nearly cancels)
    top = max(float(p.grad.abs().max()) for p in plain.parameters())
    for (name, pa), pb in zip(net.named_parameters(), plain.parameters()):
        diff = float((pa.grad - pb.grad).abs().max())
        assert diff <= max(1e-4 * float(pb.grad.abs().max()), 1e-5 * top), f"{name}: {diff:.3g}"


@pytest.mark.parametrize('batch', [1, 2])
def test_resunet_same_outputs_and_gradients_with_either_path(batch):
    torch.manual_seed(1)
    net = ResUNet3D(n_classes=2, widths=(4, 8, 12), norm='gn')
    assert sum(isinstance(m, Conv3d) for m in net.modules()) == 3 * 3 + 2 * 3 + 1
    _compare_networks(net, torch.randn(batch, 1, 13, 12, 11), lambda m, x: m(x))


def test_resunet_state_dicts_load_across_paths():
    torch.manual_seed(2)
    fast = ResUNet3D(n_classes=1, widths=(4, 6), norm='bn')
    x = torch.randn(1, 1, 10, 10, 10)
    fast.train()
    fast(x)  # batch-norm statistics move
    fast.eval()
    plain = ResUNet3D(n_classes=1, widths=(4, 6), norm='bn')
    use_fast_fp32(plain, False)
    plain.load_state_dict(fast.state_dict())
    plain.eval()
    older = _plain_copy(fast)  # a network of torch's nn.Conv3d, as model files were written before
    reloaded = ResUNet3D(n_classes=1, widths=(4, 6), norm='bn').eval()
    reloaded.load_state_dict(older.state_dict())
    with torch.no_grad():
        a, b, c = fast(x), plain(x), reloaded(x)
    assert _close(a, b) and _close(c, b)


@pytest.mark.parametrize('batch,training', [(1, False), (3, True)])
def test_yopo_same_features_and_gradients_with_either_path(batch, training):
    torch.manual_seed(3)
    arch = yopo.make_arch('cpu', widths=[3, 4, 5], feature_dim=8, dropout=0.0, box=None)
    net = yopo.build_features(arch)
    if not training:  # batch norm cannot train on one example; running statistics of a few batches
        with torch.no_grad():
            for _ in range(3):
                net(torch.randn(4, 1, 9, 9, 9))
    net.train(training)
    _compare_networks(net, torch.randn(batch, 1, 9, 9, 9), lambda m, x: m(x))


def test_yopo_state_dicts_load_across_paths_and_run_deterministic():
    torch.manual_seed(4)
    arch = yopo.make_arch('cpu', widths=[3, 4, 5], feature_dim=8, box=None)
    fast = yopo.build_features(arch)
    plain = yopo.build_features(arch)
    use_fast_fp32(plain, False)
    plain.load_state_dict(fast.state_dict())
    stack = torch.randn(5, 9, 9, 9).numpy()
    with yopo.DeterministicTorch('cpu'):
        a = yopo.extract_features(fast, stack, batch_size=2)  # batches of 2 and 1: both routes
        b = yopo.extract_features(plain, stack, batch_size=2)
    assert a.shape == (5, 8)
    assert abs(a - b).max() <= 1e-4 * abs(b).max()


def test_yopo_features_and_training_epoch_follow_the_precision():
    """DISCA's network runs in bf16 only when asked: features close to fp32's but not equal, and a bf16
    training epoch still lowers nothing to NaN and moves the weights."""
    from cryopick_plugin.engine.disca import em
    torch.manual_seed(5)
    arch = yopo.make_arch('cpu', widths=[4, 6, 8], feature_dim=8, box=None)
    net = yopo.build_features(arch)
    stack = torch.randn(6, 9, 9, 9).numpy()
    a = yopo.extract_features(net, stack, batch_size=3)
    b = yopo.extract_features(net, stack, batch_size=3, precision='bf16')
    assert 0 < abs(a - b).max() < 0.1 * abs(a).max()
    head = yopo.YOPOHead(arch['feature_dim'], 2)
    opt = torch.optim.NAdam(list(net.parameters()) + list(head.parameters()), lr=1e-3)
    before = net.convs[0].weight.detach().clone()
    targets = torch.eye(2)[torch.tensor([0, 1, 0, 1, 0, 1])].numpy()
    loss = em._train_epoch(net, head, opt, stack, targets, {'batch_size': 3}, torch.Generator().manual_seed(0),
                           'cpu', precision='bf16')
    assert np.isfinite(loss) and not torch.equal(before, net.convs[0].weight)


def test_disca_command_runs_fp32_unless_asked(monkeypatch, tmp_path):
    """`cryopick disca` hands its --precision (default fp32) to the EM loop."""
    import argparse
    from cryopick_plugin.commands import disca as command
    from cryopick_plugin.engine.disca import em
    parser = argparse.ArgumentParser()
    command.add_args(parser)
    seen = []

    class Stop(Exception):
        pass

    def capture(*args, options=None, **kwargs):
        seen.append(options['precision'])
        raise Stop
    monkeypatch.setattr(command, 'read_subtomogram_star', lambda path: (np.zeros((20, 24, 24, 24), np.float32),
                                                                        None, 10.0))
    monkeypatch.setattr(em, 'disca_cluster', capture)
    for extra, expected in (([], 'fp32'), (['--precision', 'bf16'], 'bf16')):
        args = parser.parse_args(['in.star', '--out', str(tmp_path / 'out'), '--wedge-tilt', '0'] + extra)
        with pytest.raises(Stop):
            command.main(args)
        assert seen[-1] == expected
