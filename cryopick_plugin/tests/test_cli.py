"""Options shared by the `cryopick` commands: --threads on every command that computes."""
import argparse
import json
import subprocess
import sys

import pytest

from cryopick_plugin import commands as cli

COMPUTE_COMMANDS = ('train3d', 'pick3d', 'disca', 'deepcryopicker', 'train-cryosegnet', 'cryosegnet')


def _subparsers():
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize('name', COMPUTE_COMMANDS)
def test_every_compute_command_takes_threads(name):
    options = {opt for a in _subparsers()[name]._actions for opt in a.option_strings}
    assert '--threads' in options


def test_threads_reach_torch_blas_and_opencv():
    # A fresh interpreter: the limits are process-wide. 3 differs from the default on 1-, 2- and 4-core
    # machines alike, so a helper that set nothing would be caught.
    code = ("import json, numpy, torch, cv2\n"
            "from threadpoolctl import threadpool_info\n"
            "from cryopick_plugin.commands import apply_threads\n"
            "apply_threads(3)\n"
            "print(json.dumps([torch.get_num_threads(), cv2.getNumThreads(),"
            " [i['num_threads'] for i in threadpool_info() if i.get('threading_layer') != 'disabled']]))\n")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    torch_n, cv_n, pools = json.loads(out.stdout.strip().splitlines()[-1])
    assert torch_n == 3 and cv_n == 3
    # (a BLAS built single-threaded, as the one inside OpenCV's wheel, stays at 1 and is left out)
    assert pools and all(n == 3 for n in pools)


def test_bad_thread_count_is_one_line_error(capsys):
    assert cli.main(['disca', 'missing.star', '--out', 'x', '--threads', '0']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['cryopick disca: error: --threads: must be at least 1, got 0']
