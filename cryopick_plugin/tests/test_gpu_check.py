"""bench/gpu_check.sh: the GPU readiness check run as `--cpu-smoke` (every stage, tiny sizes, the CPU), and
the device watch that makes it fail on a module or a tensor left on another device."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, 'bench', 'gpu_check.sh')
STAGES = ['bf16', 'pick3d', 'disca', 'cryosegnet', 'deepcryopicker']


@pytest.fixture(scope='module')
def gpu_check():
    spec = importlib.util.spec_from_file_location('gpu_check', os.path.join(REPO, 'bench', 'gpu_check.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_smoke_runs_every_network_and_reports_device_rates_and_scores(tmp_path):
    out = tmp_path / 'check'
    env = dict(os.environ, CRYOPICK_PYTHON=sys.executable, CRYOPICK_PROGRESS_SECONDS='1000')
    proc = subprocess.run(['bash', SCRIPT, '--cpu-smoke', '--out', str(out), '--threads', '1'], cwd=str(tmp_path),
                          env=env, capture_output=True, text=True, timeout=900)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-6000:]
    assert 'CPU smoke run (tiny sizes) on cpu (1 thread' in text and 'gpu_check: all stages ok' in text
    summary = json.load(open(out / 'gpu_check.json'))
    stages = {s['stage']: s for s in summary['stages']}
    assert [s['stage'] for s in summary['stages']] == STAGES and summary['failed'] == []
    for name in STAGES:
        s = stages[name]
        assert s['status'] == 'ok' and s['problems'] == [], s
        assert set(s['module_calls']) == {'cpu'} and s['module_calls']['cpu'] > 0, s   # networks ran, on the CPU
        assert f'{name}: ok' in text
        if name != 'bf16':
            assert s['engine_reported'] == ['cpu'], s                # the engine's own start line
    assert stages['bf16']['output_dtypes'] == ['bfloat16'] * 3 and stages['bf16']['max_rel_error'] < 0.05
    p = stages['pick3d']
    assert p['steps'] >= 1 and p['steps_per_s'] > 0 and p['pick_voxels_per_s'] > 0 and p['precision'] in ('fp32', 'bf16')
    assert 0 <= p['localisation_f1'] <= 1 and 0 <= p['dog_localisation_f1'] <= 1
    d = stages['disca']
    assert d['iterations'] == 2 and d['k'] == 2 and d['s_per_iteration'] > 0 and 0 <= d['v_measure'] <= 1
    c = stages['cryosegnet']
    assert c['epochs'] == 1 and c['s_per_epoch'] > 0 and c['sam'].startswith('small random') and 0 <= c['unet_f1'] <= 1
    assert stages['deepcryopicker']['model_on'] == ['cpu'] and 0 <= stages['deepcryopicker']['f1'] <= 1
    # the rates and scores are on the console too, one line per stage
    assert 'pick3d: precision' in text and 'steps_per_s' in text and 'v_measure' in text and 'unet_f1' in text


def test_the_device_watch_catches_parameters_and_inputs_elsewhere(gpu_check):
    layer = torch.nn.Linear(3, 2)
    with gpu_check.DeviceWatch('cpu') as watch:
        layer(torch.zeros(1, 3))
    assert watch.problems() == [] and watch.calls == {'cpu': 1} and watch.outputs == {'float32': 1}
    # a layer (and its input) on another device: 'meta' stands in for the CPU-vs-GPU case here
    stray = torch.nn.Linear(3, 2).to('meta')
    with gpu_check.DeviceWatch('cpu') as watch:
        layer(torch.zeros(1, 3))
        stray(torch.zeros(1, 3, device='meta'))
    problems = watch.problems()
    assert "device mismatch: Linear parameter 'weight' on meta (expected cpu)" in problems
    assert 'device mismatch: Linear input 0 on meta (expected cpu)' in problems
    # a network that never reached the expected device at all
    with gpu_check.DeviceWatch('cuda') as watch:
        layer(torch.zeros(1, 3))
    assert 'no network module ran on cuda' in watch.problems()
    assert any("parameter 'weight' on cpu (expected cuda)" in p for p in watch.problems())
    layer(torch.zeros(1, 3))                      # the hooks are gone after the block
    assert watch.calls == {'cpu': 1}


def test_a_stage_with_a_stray_module_or_a_wrong_engine_device_fails_loudly(gpu_check, tmp_path):
    lines = []
    ctx = {'device': 'cpu', 'device_type': 'cpu', 'precision_resolved': 'fp32', 'smoke': True, 'out': str(tmp_path)}

    def stray_layer(ctx):
        torch.nn.Linear(3, 2)(torch.zeros(1, 3))
        torch.nn.Linear(3, 2).to('meta')(torch.zeros(1, 3, device='meta'))
        return {'n': 1}, {}

    summary = gpu_check.run_stage('fake', stray_layer, ctx, lines.append)
    assert summary['status'] == 'FAIL'
    assert "FAIL fake: device mismatch: Linear parameter 'weight' on meta (expected cpu)" in lines

    def engine_says_cuda(ctx):
        ctx['engine'].add('train3d: device cuda (NVIDIA H100), precision bf16 (auto)')
        torch.nn.Linear(3, 2)(torch.zeros(1, 3))
        return {}, {}

    lines.clear()
    summary = gpu_check.run_stage('fake', engine_says_cuda, ctx, lines.append)
    assert summary['status'] == 'FAIL' and 'FAIL fake: the engine reported device cuda, expected cpu' in lines
    # bf16 asked for by the engine but no bf16 output seen: a warning, not a failure
    assert summary['warnings'] and 'only 0% of the convolution / linear outputs were bf16' in summary['warnings'][0]

    def broken(ctx):
        raise ValueError('out of memory, say')

    lines.clear()
    assert gpu_check.run_stage('fake', broken, ctx, lines.append)['status'] == 'FAIL'
    assert 'FAIL fake: ValueError: out of memory, say' in lines


def test_the_full_check_needs_a_cuda_device(gpu_check, monkeypatch, capsys):
    assert gpu_check.main(['--device', 'cpu']) == 2
    assert 'not a CUDA device; use --cpu-smoke' in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert gpu_check.main([]) == 2
    assert 'no CUDA device is available here' in capsys.readouterr().out
