"""The CI rule on skips (under CI=true only a skip marked 'hardware:' is accepted) and the bf16 check.

The children here load tests/hardware.py by its path, without the plugin (whose import sets up Scipion),
so that each costs little more than importing torch. oneDNN's ONEDNN_MAX_CPU_ISA=AVX2 makes a CPU with
native bf16 behave as an AVX2-only one (no oneDNN bf16): that is how the bf16 skip is checked on machines
that do have bf16.
"""
import os
import shutil
import subprocess
import sys

from cryopick_plugin.tests import hardware

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOAD_HARDWARE = f'''
import importlib.util
_spec = importlib.util.spec_from_file_location('hardware', {hardware.__file__!r})
hardware = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hardware)
'''


def _env(**extra):
    env = dict(os.environ)
    env.pop('PYTEST_ADDOPTS', None)
    env.update(extra)
    return env


def _pytest(folder, source, **env):
    shutil.copy(os.path.join(REPO, 'conftest.py'), folder / 'conftest.py')
    (folder / 'test_case.py').write_text(source)
    proc = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-rs', '-p', 'no:cacheprovider', str(folder)],
                          cwd=str(folder), env=_env(**env), capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def test_ci_accepts_hardware_skips_and_refuses_the_others(tmp_path):
    # the bf16 case as the precision fixture decides it, on this CPU limited to AVX2
    bf16_case = LOAD_HARDWARE + '''
import pytest

def test_bf16():
    reason = hardware.bf16_unavailable()
    if reason:
        pytest.skip(reason)

def test_fp32():
    pass
'''
    rc, out = _pytest(tmp_path, bf16_case, CI='true', ONEDNN_MAX_CPU_ISA='AVX2')
    import torch
    if torch.cuda.is_available():   # a CUDA device computes bf16: nothing is skipped
        assert rc == 0 and '2 passed' in out, out
    else:
        assert rc == 0 and '1 passed, 1 skipped' in out and 'SKIPPED' in out, out
        assert 'hardware: no native bf16' in out, out
    other = "import pytest\n\ndef test_a():\n    pytest.skip('some package is missing')\n"
    rc, out = _pytest(tmp_path, other, CI='true')
    assert rc == 1 and 'every test must run under CI' in out, out
    rc, out = _pytest(tmp_path, other, CI='false')
    assert rc == 0, out
