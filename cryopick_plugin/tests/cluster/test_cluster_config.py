"""`cryopick cluster-config` and the thread allowance of a job, without a queue (test_slurm.py runs them
through a real SLURM)."""
import os
import subprocess
import sys

import pytest

from cryopick_plugin import thread_allowance
from cryopick_plugin.commands.cluster_config import hosts_conf
from cryopick_plugin.engine.errors import InputError


def _host(tmp_path, text):
    from pyworkflow.protocol.hosts import HostConfig
    path = tmp_path / 'hosts.conf'
    path.write_text(text)
    return HostConfig.load(str(path))['localhost']


def _submit(host, **values):
    """The job script and the sbatch command Scipion would make for a job with these values."""
    d = dict(host.getQueuesDefault())
    d.update(JOB_NAME='7', JOB_QUEUE='cpu', JOB_NODES=1, JOB_THREADS=4, JOB_LOGS='/p/logs/cryopick7',
             JOB_SCRIPT='/p/logs/cryopick7.job', JOB_COMMAND='python -m x', GPU_COUNT=0, QUEUE_FOR_JOBS='N')
    d.update(values)
    return host.getSubmitTemplate() % d, host.getSubmitCommand() % d


def test_template_as_scipion_reads_it(tmp_path):
    env = {'SCIPION_USER_DATA': '/data/scipion user', 'CRYOPICK_DEVICE': 'auto', 'CRYOPICK_THREADS': '3',
           'HOME': '/root', 'SCIPION_NOTE': '50%'}
    text = hosts_conf(['cpu', 'long'], gpu_partition='gpu', gpus_per_job=2, hours=6, mem='32G', account='lab',
                      sbatch_options=['--qos=normal'], environ=env, python='/opt/venv/bin/python')
    host = _host(tmp_path, text)
    assert list(host.getQueueSystem().getQueues()) == ['cpu', 'long']
    script, command = _submit(host)
    for line in ('#SBATCH --partition=cpu', '#SBATCH --cpus-per-task=4', '#SBATCH --mem=32G',
                 '#SBATCH --time=6:00:00', '#SBATCH --account=lab', '#SBATCH --qos=normal',
                 'export PATH=/opt/venv/bin:"$PATH"', "export SCIPION_USER_DATA='/data/scipion user'",
                 'export SCIPION_NOTE=50%', 'export CRYOPICK_DEVICE=auto'):
        assert line in script, (line, script)
    assert script.rstrip().endswith('python -m x')
    # set per job by the protocol, never pinned; other variables are not cryopick's business
    assert 'CRYOPICK_THREADS' not in script and 'HOME' not in script
    # bash agrees: the exports only fill in what the job did not bring
    exports = [line for line in script.splitlines() if 'export SCIPION' in line or 'export CRYOPICK' in line]
    out = subprocess.run(['bash', '-c', '\n'.join(exports) + '\necho "$SCIPION_USER_DATA|$CRYOPICK_DEVICE"'],
                         env={'PATH': os.environ['PATH'], 'CRYOPICK_DEVICE': 'cpu'}, capture_output=True, text=True)
    assert out.stdout.strip() == '/data/scipion user|cpu'


@pytest.mark.parametrize('per_step, gpu_count, command, gres', [
    ('N', 0, 'python pw_protocol_run.py', False),            # a protocol without GPUs
    ('N', 1, 'python pw_protocol_run.py', True),             # a protocol given a GPU
    ('Y', 1, 'CUDA_VISIBLE_DEVICES=0 python -m cryopick_plugin pick3d', True),   # a step that needs one
    ('Y', 1, 'python -m cryopick_plugin dog-pick', False),   # a step that does not
])
def test_gpus_only_for_jobs_that_need_them(tmp_path, per_step, gpu_count, command, gres):
    host = _host(tmp_path, hosts_conf(['cpu'], gpu_partition='gpu', gpus_per_job=2, environ={}))
    script_path = tmp_path / 'job.sh'
    script, submit = _submit(host, QUEUE_FOR_JOBS=per_step, GPU_COUNT=gpu_count, JOB_COMMAND=command,
                             JOB_SCRIPT=str(script_path))
    script_path.write_text(script)
    # the sbatch command line with `sbatch` replaced by echo: the options it would get
    options = subprocess.run(['bash', '-c', submit.replace('sbatch ', 'echo ', 1)], capture_output=True,
                             text=True).stdout.split()
    assert options[-1] == str(script_path)
    assert options[:-1] == (['--partition=gpu', '--gres=gpu:2'] if gres else [])


@pytest.mark.parametrize('per_step, step_threads, expected', [
    ('Y', '2', ['--cpus-per-task=2']),   # one job per step: its own CPUs, whatever Threads says
    ('Y', '0', []),                      # 0: the template's --cpus-per-task, the protocol's threads
    ('N', '2', []),                      # a whole protocol always gets its threads
])
def test_cpus_of_a_step_job(tmp_path, per_step, step_threads, expected):
    host = _host(tmp_path, hosts_conf(['cpu'], environ={}))
    _, submit = _submit(host, QUEUE_FOR_JOBS=per_step, STEP_THREADS=step_threads)
    options = subprocess.run(['bash', '-c', submit.replace('sbatch ', 'echo ', 1)], capture_output=True,
                             text=True).stdout.split()
    assert options == expected + ['/p/logs/cryopick7.job']


def test_no_gpus_asked_with_zero(tmp_path):
    host = _host(tmp_path, hosts_conf(['cpu'], gpus_per_job=0, environ={}))
    _, submit = _submit(host, GPU_COUNT=1)
    options = subprocess.run(['bash', '-c', submit.replace('sbatch ', 'echo ', 1)], capture_output=True,
                             text=True).stdout.split()
    assert options == ['/p/logs/cryopick7.job']


def test_bad_options_one_line_nothing_written(tmp_path):
    with pytest.raises(InputError, match='--partition'):
        hosts_conf(['my queue'])
    with pytest.raises(InputError, match='--sbatch'):
        hosts_conf(['cpu'], sbatch_options=['qos=normal'])
    out = tmp_path / 'hosts.conf'
    run = subprocess.run([sys.executable, '-m', 'cryopick_plugin', 'cluster-config', '--partition', 'cpu',
                          '--gpus-per-job', '-1', '--out', str(out)], capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip() == 'cryopick cluster-config: error: --gpus-per-job: must be 0 or more, got -1'
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize('env, expected', [
    ({}, None),
    ({'CRYOPICK_THREADS': '3'}, 3),
    ({'CRYOPICK_THREADS': '3', 'SLURM_CPUS_PER_TASK': '8'}, 3),     # the protocol decides
    ({'CRYOPICK_THREADS': 'job:3', 'SLURM_CPUS_PER_TASK': '8'}, 8),  # a step's job: what SLURM gave it
    ({'CRYOPICK_THREADS': 'job:3'}, 3),                              # a queue that does not say
    ({'SLURM_CPUS_PER_TASK': '8'}, 8),                               # a command run by hand in a job
    ({'CRYOPICK_THREADS': '0'}, None),
])
def test_thread_allowance(env, expected):
    assert thread_allowance(env) == expected
