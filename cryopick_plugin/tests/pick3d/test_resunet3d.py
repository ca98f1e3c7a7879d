"""3D-ResUNet: structure of the reference, any input size, presets, cost, and the model file round trip."""
import pytest
import torch

from cryopick_plugin.engine.io import model_io
from cryopick_plugin.engine.pick3d import picking as pick3d, resunet3d
from cryopick_plugin.engine.errors import InputError
from cryopick_plugin.tests.hardware import bf16_unavailable


def test_paper_preset_has_the_reference_size_and_layout():
    net = resunet3d.build('paper')
    n = resunet3d.count_parameters(net)
    assert 2.35e6 < n < 2.5e6                      # reference: ≈ 2.43 M
    # channels into each block: image + 3 coordinates, then previous + pyramid image + coordinates
    cins = [enc.conv1[0].in_channels for enc in net.encoders]
    assert cins == [4, 28, 52, 76]
    assert [dec.conv1[0].in_channels for dec in net.decoders] == [75, 51, 27]
    bare = resunet3d.ResUNet3D(widths=(24, 48, 72, 108), use_pyramid=False, use_coords=False)
    assert [enc.conv1[0].in_channels for enc in bare.encoders] == [1, 24, 48, 72]
    assert resunet3d.count_parameters(bare) < n


@pytest.mark.parametrize('shape', [(13, 22, 31), (8, 8, 8), (17, 9, 40)])
def test_output_shape_equals_input_shape_for_any_size(shape):
    torch.manual_seed(0)
    net = resunet3d.ResUNet3D(n_classes=1, widths=(4, 6, 8, 10)).eval()
    x = torch.randn(2, 1, *shape)
    with torch.no_grad():
        out = net(x)
    assert out.shape == (2, 1) + shape
    assert torch.isfinite(out).all()


def test_heads_sigmoid_for_one_class_softmax_with_background_for_several():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 12, 12, 12)
    one = resunet3d.ResUNet3D(n_classes=1, widths=(4, 8)).eval()
    three = resunet3d.ResUNet3D(n_classes=3, widths=(4, 8)).eval()
    with torch.no_grad():
        p1 = one.foreground(x)
        logits = three(x)
        p3 = three.probabilities(logits)
        fg = three.foreground(x)
    assert p1.shape == (1, 1, 12, 12, 12) and float(p1.min()) >= 0 and float(p1.max()) <= 1
    assert logits.shape[1] == 4
    assert torch.allclose(p3.sum(1), torch.ones(1, 12, 12, 12), atol=1e-5)
    assert torch.allclose(fg, p3[:, 1:])


def test_residual_block_uses_elu_after_the_sum_and_avg_pool_downsampling():
    block = resunet3d.ResBlock(2, 3)
    assert isinstance(block.act, torch.nn.ELU)
    block.eval()
    with torch.no_grad():
        x = torch.randn(1, 2, 5, 5, 5)
        h1 = block.conv1(x)
        expected = torch.nn.functional.elu(block.conv3(block.conv2(h1)) + h1)
        assert torch.allclose(block(x), expected, atol=1e-6)
    # transposed-conv upsampling joined to the skip by summation: output width = skip width
    net = resunet3d.ResUNet3D(widths=(4, 6, 8))
    assert [up.out_channels for up in net.ups] == [6, 4]


def test_cpu_preset_training_step_cost_is_bounded():
    net = resunet3d.build('cpu')
    flops = resunet3d.training_step_flops(net, resunet3d.PRESETS['cpu']['patch'],
                                          resunet3d.PRESETS['cpu']['batch_size'])
    assert 1e9 < flops <= 15e9
    assert resunet3d.count_parameters(net) < 0.3e6


def test_model_file_round_trip_and_foreign_models(tmp_path):
    torch.manual_seed(0)
    net = resunet3d.ResUNet3D(n_classes=2, widths=(4, 8)).eval()
    path = tmp_path / 'm.pt'
    meta = {'voxel_size': 10.0, 'diameters': {'1': 5, '2': 7}, 'patch': 16}
    model_io.save_model(path, 'deepetpicker', net.arch(), net.state_dict(), meta)
    loaded, meta2 = pick3d.load_picker(path)
    assert meta2['diameters'] == {'1': 5, '2': 7}
    x = torch.randn(1, 1, 10, 11, 12)
    with torch.no_grad():
        assert torch.equal(net(x), loaded(x))
    model_io.save_model(tmp_path / 'other.pt', 'disca', {}, {}, {})
    with pytest.raises(InputError, match='disca'):
        pick3d.load_picker(tmp_path / 'other.pt')
    payload = torch.load(path, weights_only=False)
    payload['format_version'] = 99
    torch.save(payload, tmp_path / 'future.pt')
    with pytest.raises(InputError, match='version'):
        pick3d.load_picker(tmp_path / 'future.pt')
    bad_arch = dict(net.arch(), widths=[4, 9])
    model_io.save_model(tmp_path / 'bad.pt', 'deepetpicker', bad_arch, net.state_dict(), meta)
    with pytest.raises(InputError, match='architecture'):
        pick3d.load_picker(tmp_path / 'bad.pt')


def test_precision_setting_resolves(monkeypatch):
    from cryopick_plugin.engine import settings
    monkeypatch.delenv(settings.PRECISION_VAR, raising=False)
    assert settings.resolve_precision('fp32') == 'fp32'
    assert settings.resolve_precision('BF16') == 'bf16'
    assert settings.resolve_precision(None) in ('fp32', 'bf16')   # 'auto': depends on the CPU
    monkeypatch.setenv(settings.PRECISION_VAR, 'fp32')
    assert settings.resolve_precision(None) == 'fp32'
    with pytest.raises(InputError, match='fp16'):
        settings.resolve_precision('fp16')


def test_bf16_inference_agrees_with_fp32():
    reason = bf16_unavailable()
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    net = resunet3d.ResUNet3D(n_classes=2, widths=(4, 8, 12)).eval()
    x = torch.randn(2, 1, 20, 24, 28).numpy()
    p32 = pick3d.model_predictor(net, 'cpu', 'fp32')(x)
    p16 = pick3d.model_predictor(net, 'cpu', 'bf16')(x)
    assert p16.dtype == p32.dtype == 'float32' and p16.shape == p32.shape == (2, 2, 20, 24, 28)
    # bf16 keeps 8 bits of mantissa: probabilities agree to a few hundredths, not exactly
    diff = abs(p16 - p32)
    assert 0 < diff.max() < 0.05 and diff.mean() < 0.01
    # the layout change for bf16 is undone for fp32 (same module object)
    p32_again = pick3d.model_predictor(net, 'cpu', 'fp32')(x)
    assert abs(p32_again - p32).max() < 1e-5
