"""cryopick protocols through a real SLURM, by Scipion's own queue mechanism, in a throw-away project.

The session's SLURM (conftest.py: one node, partitions `cpu` and `gpu`, the latter with one GPU declared on
/dev/null) and the hosts.conf that `cryopick cluster-config --partition cpu --gpu-partition gpu` writes.
Three small tomograms of dark balls; each result sent through the queue must equal the same protocol run
here, and the jobs must show in `sacct` (job completion records) in the state the case expects:

- a whole protocol as one job (DoG picking), its steps in the job's two CPUs;
- one job per step (3D picking with a small trained model): one job per tomogram, each on the `gpu`
  partition with a GPU and the protocol's two threads, torch and BLAS using exactly those;
- a job that fails on the node (a tomogram with NaN), per step and as a whole protocol: the protocol fails
  with the engine's one-line message, in its log too, and registers nothing;
- a step's job cancelled with scancel while it runs: the protocol fails; Continue finishes the other
  tomograms without picking the finished one again;
- a workflow script with --queue / --queue-params: its cryopick protocols run as SLURM jobs.
"""
import os
import re
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from cryopick_plugin.engine.io import star
from cryopick_plugin.engine.io.mrc import write_mrc

SHAPE = (32, 64, 64)
TS_IDS = ['tomo_000', 'tomo_001', 'tomo_002']
DIAMETER = 7.0
QUEUE_PARAMS = {'JOB_MEMORY': '2G', 'JOB_TIME': '1', 'JOB_GPUS': '1'}
TIMEOUT_S = 900  # guards against a hang only: a loaded machine is slow, not wrong


def _blob_tomogram(seed):
    """Noise with eight dark balls; returns the volume and the ball centres (x, y, z voxels)."""
    rng = np.random.default_rng(seed)
    vol = rng.normal(size=SHAPE).astype(np.float32)
    zz, yy, xx = np.indices(SHAPE)
    centres = []
    for _ in range(8):
        c = rng.uniform([7, 7, 7], np.array(SHAPE) - 7)
        vol[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= 9] -= 3.0
        centres.append(c[::-1])
    return vol, np.array(centres)


def _train_tiny_model(folder, tomos):
    """A small DeepETPicker model trained for one short epoch on the first tomogram (seconds on a CPU)."""
    from cryopick_plugin.engine.pick3d import labels, training
    path, centres = tomos[0]
    table = star.coordinates_frame(centres, 'tomo_000', classes=[1] * len(centres))
    lab = os.path.join(folder, 'tomo_000_labels.mrc')
    labels.write_label_map(lab, SHAPE, table, 5, 'tball', 10.0)
    out = os.path.join(folder, 'tiny.pt')
    # patch 32: picking a 32×64×64 tomogram takes 2×3×3 tiles, not hundreds
    training.train([(path, lab, table)], [(path, lab, table)], out, epochs=1, patch=32, pad=4, widths=(4, 8),
                   device='cpu', precision='fp32', tune=False, thresholds={'t_seg': 0.3, 't_lm': 0.05},
                   log=lambda *_: None)
    return out


class Cluster:
    """The project, its inputs and helpers to run protocols here or through the queue."""

    def __init__(self, project, hosts_file):
        self.project, self.hosts_file = project, hosts_file

    def new(self, cls, label, **params):
        prot = self.project.newProtocol(cls, **params)
        prot.setObjLabel(label)
        return prot

    def launch(self, prot, queue=None, per_step=False, wait=True, **params):
        """Launch here, or through `queue` as one job (per_step False) or one job per step, with queue
        parameters `params` on top of QUEUE_PARAMS; wait for the end unless wait is False."""
        if queue:
            prot._useQueue.set(True)
            prot.setQueueParams([queue, dict(QUEUE_PARAMS, QUEUE_FOR_JOBS='Y' if per_step else 'N', **params)])
        self.project.launchProtocol(prot, wait=wait)
        if wait:
            self.wait(prot)
        return prot

    def wait(self, prot, timeout=TIMEOUT_S):
        """Until the protocol is no longer active (a protocol sent as one job is followed through its
        run.db and squeue, as the GUI does)."""
        deadline = time.time() + timeout
        self.project._updateProtocol(prot)
        while prot.isActive():
            assert time.time() < deadline, f'{prot.getRunName()} still {prot.getStatus()} after {timeout} s'
            time.sleep(0.5)
            self.project._updateProtocol(prot)
        return prot


def _mine(prot, name):
    return name == prot.strId() or name.startswith(prot.strId() + '-')


def _jobs(prot, timeout=TIMEOUT_S):
    """[(job id, job name, partition, state)] of the protocol's SLURM jobs, once none is left in the
    queue (a protocol sent as one job is finished in its database a moment before its process and job
    end). Scipion names a protocol's job after its id, and a step's job '<id>-<thread>-<n>'; jobs are
    submitted from the project's folder, which tells projects apart."""
    deadline = time.time() + timeout
    while True:
        queue = subprocess.run(['squeue', '-h', '-o', '%j'], capture_output=True, text=True, check=True).stdout
        if not any(_mine(prot, name) for name in queue.split()):
            break
        assert time.time() < deadline, f'jobs of {prot.getRunName()} still queued after {timeout} s: {queue}'
        time.sleep(0.5)
    out = subprocess.run(['sacct', '--completion', '-n', '-P', '-S', '2020-01-01',
                          '-o', 'jobid,jobname,partition,state,workdir'], capture_output=True, text=True,
                         check=True)
    rows = [line.split('|') for line in out.stdout.splitlines() if line.strip()]
    folder = os.path.realpath(prot.getProject().getPath())
    return [tuple(r[:4]) for r in rows if _mine(prot, r[1]) and os.path.realpath(r[4]) == folder]


def _log(prot):
    text = ''
    for path in prot.getLogPaths()[:2]:
        if os.path.exists(path):
            with open(path, errors='replace') as fh:
                text += fh.read()
    return re.sub(r'\x1b\[[0-9;]*m', '', text)  # colour codes


USAGE = re.compile(r'cryopick (?P<cmd>[\w-]+) (?P<what>\S+): peak memory (?P<mb>\d+) MB, threads (?P<n>\d+)'
                   r'(?: \((?P<pools>[^)]*)\))?, (?P<s>[\d.]+) s, (?:SLURM job (?P<job>\d+) on )?(?P<host>\S+)')


def _usage(prot):
    return [m.groupdict() for m in USAGE.finditer(_log(prot))]


def _pools(line):
    """{'torch': n, 'BLAS': n} from a usage line."""
    return {k: int(v) for k, v in (p.split() for p in (line['pools'] or '').split(', ') if p)}


def _sorted_picks(prot, tomos):
    from cryopick_plugin import convert
    from cryopick_plugin.constants import OUT_COORDS3D
    df = convert.coordinates3d_to_frame(getattr(prot, OUT_COORDS3D), tomos)
    cols = [star.TOMO, star.X, star.Y, star.Z, star.CLASS, star.SCORE]
    return df[cols].sort_values(cols[:4]).reset_index(drop=True)


@pytest.fixture(scope='module')
def cluster(slurm, tmp_path_factory):
    """A project whose hosts.conf is the one `cryopick cluster-config` writes (in place of the session's,
    restored afterwards), with three tomograms, a NaN tomogram and a small trained model imported."""
    from pyworkflow.project import Manager
    from tomo.protocols import ProtImportTomograms
    from cryopick_plugin.protocols import CryopickImportModel
    hosts = os.environ['SCIPION_HOSTS']
    with open(hosts) as fh:
        saved = fh.read()
    cwd = os.getcwd()
    # the command as a user types it (parsed by the `cryopick` dispatcher), in this process
    from cryopick_plugin.commands import main as cryopick
    assert cryopick(['cluster-config', '--partition', 'cpu', '--gpu-partition', 'gpu', '--mem', '2G', '--time', '1',
                     '--out', hosts]) == 0
    try:
        project = Manager().createProject(f'TestSlurm_{os.getpid()}')
        os.chdir(project.getPath())
        c = Cluster(project, hosts)
        data = str(tmp_path_factory.mktemp('slurm-inputs'))
        tomos = []
        for i, ts in enumerate(TS_IDS):
            vol, centres = _blob_tomogram(100 + i)
            tomos.append((write_mrc(os.path.join(data, 'good', f'{ts}.mrc'), vol, 10.0), centres))
        bad = _blob_tomogram(7)[0]
        bad[3, 4, 5] = np.nan
        write_mrc(os.path.join(data, 'nan', 'tomo_nan.mrc'), bad, 10.0)
        imports = {}
        for key in ('good', 'nan'):
            prot = c.launch(c.new(ProtImportTomograms, f'tomograms {key}', filesPath=os.path.join(data, key),
                                  filesPattern='*.mrc', samplingRate=10.0))
            imports[key] = prot.Tomograms
        c.tomos, c.nanTomos = imports['good'], imports['nan']
        model = c.launch(c.new(CryopickImportModel, 'tiny model', modelFile=_train_tiny_model(data, tomos),
                               method=0))
        c.model = model.outputModel
        yield c
    finally:
        os.chdir(cwd)
        with open(hosts, 'w') as fh:
            fh.write(saved)


def _dog(c, label, threads=1, tomos=None):
    from cryopick_plugin.protocols import CryopickDogPick
    return c.new(CryopickDogPick, label, inputTomograms=tomos or c.tomos, diameter=DIAMETER, maxPicks=20,
                 boxSize=10, numberOfThreads=threads)


@pytest.fixture(scope='module')
def dog_reference(cluster):
    """DoG picks of the three tomograms run here, serially."""
    prot = cluster.launch(_dog(cluster, 'dog here'))
    assert prot.isFinished(), prot.getErrorMessage()
    picks = _sorted_picks(prot, cluster.tomos)
    assert sorted(picks[star.TOMO].unique()) == TS_IDS
    return picks


def test_hosts_conf_is_read_by_scipion(cluster):
    """What cluster-config wrote is the project's host: a SLURM queue per partition, the checks Scipion
    runs on jobs, and a template that asks for threads, memory, time and (for GPU jobs only) GPUs."""
    host = cluster.project.getHostConfig('localhost')
    queue = host.getQueueSystem()
    assert queue.getName() == 'SLURM'
    assert list(queue.getQueues()) == ['cpu']
    assert host.getCheckCommand() % {'JOB_ID': 12} == 'squeue -h -j 12 -o %T'
    assert re.search(host.getJobDoneRegex(), 'CANCELLED') and not re.search(host.getJobDoneRegex(), 'RUNNING')
    template = host.getSubmitTemplate()
    for directive in ('--cpus-per-task=%(JOB_THREADS)d', '--mem=%(JOB_MEMORY)s', '--time=%(JOB_TIME)s:00:00'):
        assert f'#SBATCH {directive}' in template
    assert f'export PATH={os.path.dirname(sys.executable)}:' in template
    assert 'SCIPION_USER_DATA' in template and 'gres' not in template
    assert '--gres=gpu:%(JOB_GPUS)s' in host.getSubmitCommand()


def test_whole_protocol_as_one_job(cluster, dog_reference):
    prot = cluster.launch(_dog(cluster, 'dog as one SLURM job', threads=2), queue='cpu')
    assert prot.isFinished(), prot.getErrorMessage()
    jobs = _jobs(prot)
    assert len(jobs) == 1 and jobs[0][2:] == ('cpu', 'COMPLETED'), jobs
    pd.testing.assert_frame_equal(_sorted_picks(prot, cluster.tomos), dog_reference)
    log = _log(prot)
    assert 'Executing through the queue system' in log
    # the job got the protocol's two threads as CPUs, and no GPU
    with open(prot._getLogsPath(f'cryopick{prot.strId()}.out')) as fh:
        assert re.search(rf'SLURM job {jobs[0][0]} on \S+: partition cpu, CPUs 2, GPUs none', fh.read())
    # two steps side by side in the job's two CPUs: one thread each, with their peak memory in the log
    usage = _usage(prot)
    assert sorted(u['what'] for u in usage) == [f'{ts}.mrc' for ts in TS_IDS]
    for u in usage:
        assert u['n'] == '1' and u['job'] == jobs[0][0] and int(u['mb']) > 50, u
        assert all(v == 1 for v in _pools(u).values()) and 'BLAS' in _pools(u), u


def test_one_job_per_step_on_the_gpu_partition(cluster):
    from cryopick_plugin.protocols import CryopickPick3D

    def pick(label, threads):
        return cluster.new(CryopickPick3D, label, inputTomograms=cluster.tomos, inputModel=cluster.model,
                           numberOfThreads=threads)

    here = cluster.launch(pick('3D picking here', 1))
    assert here.isFinished(), here.getErrorMessage()
    queued = cluster.launch(pick('3D picking, a SLURM job per tomogram', 2), queue='cpu', per_step=True)
    assert queued.isFinished(), queued.getErrorMessage()
    jobs = _jobs(queued)
    # one job per tomogram, sent to the GPU partition because the step needs a GPU
    assert len(jobs) == len(TS_IDS) == len({j[0] for j in jobs}), jobs
    assert all(j[2:] == ('gpu', 'COMPLETED') for j in jobs), jobs
    expected, got = _sorted_picks(here, cluster.tomos), _sorted_picks(queued, cluster.tomos)
    assert len(expected) and sorted(expected[star.TOMO].unique()) == TS_IDS
    pd.testing.assert_frame_equal(got, expected, check_exact=False, rtol=1e-5)
    for job_id, name, _, _ in jobs:
        with open(queued._getLogsPath(f'{name}.out')) as fh:
            assert re.search(rf'SLURM job {job_id} on \S+: partition gpu, CPUs 2, GPUs 0', fh.read())
    # each step used exactly the job's two CPUs (SLURM_CPUS_PER_TASK) in torch and BLAS
    usage = _usage(queued)
    assert sorted(u['what'] for u in usage) == [f'{ts}.mrc' for ts in TS_IDS]
    assert sorted(u['job'] for u in usage) == sorted(j[0] for j in jobs)
    for u in usage:
        assert u['cmd'] == 'pick3d' and u['n'] == '2' and _pools(u) == {'torch': 2, 'BLAS': 2}, u
    # here, the same steps side by side would get one thread each; one thread serially
    assert all(u['n'] == '1' and u['job'] is None for u in _usage(here))


def test_job_failing_on_the_node(cluster):
    from cryopick_plugin.constants import OUT_COORDS3D
    expected = 'tomo_nan.mrc: contains NaN or infinite values'
    for per_step in (True, False):
        prot = cluster.launch(_dog(cluster, f'dog on NaN, per step {per_step}', tomos=cluster.nanTomos),
                              queue='cpu', per_step=per_step)
        assert prot.isFailed(), prot.getStatus()
        message = prot.getErrorMessage().strip()
        assert expected in message and '\n' not in message and 'Traceback' not in message, message
        assert expected in _log(prot)
        assert not prot.hasAttribute(OUT_COORDS3D)
        assert not [f for f in os.listdir(prot._getExtraPath()) if f.endswith('.star')]
        jobs = _jobs(prot)
        assert len(jobs) == 1, jobs
        if per_step:   # the engine's exit status is the job's
            assert jobs[0][3] == 'FAILED', jobs


def _finished_ts(prot):
    from pyworkflow.protocol.constants import STATUS_FINISHED
    try:
        steps = prot.loadSteps()
    except Exception:   # the steps database is being written
        return []
    done = [s.argsStr.get() for s in steps if s.funcName.get() == 'pickStep' and s.getStatus() == STATUS_FINISHED]
    return [ts for ts in TS_IDS if any(f'"{ts}"' in args for args in done)]


def test_cancelled_job_then_continue(cluster, dog_reference):
    from pyworkflow.protocol.constants import MODE_RESUME, STATUS_FINISHED
    from cryopick_plugin.constants import OUT_COORDS3D
    # threads 2: one step job at a time; STEP_THREADS 1: each job asks for one CPU, not the two threads
    prot = _dog(cluster, 'dog, a step cancelled, then continued', threads=2)
    cluster.launch(prot, queue='cpu', per_step=True, wait=False, STEP_THREADS='1')
    # once the first tomogram is done, cancel the next step's job while it runs
    cancelled, deadline = None, time.time() + TIMEOUT_S
    while cancelled is None and time.time() < deadline and len(_finished_ts(prot)) < len(TS_IDS):
        if TS_IDS[0] in _finished_ts(prot):
            queue = subprocess.run(['squeue', '-h', '-o', '%i %j %T'], capture_output=True, text=True).stdout
            for job_id, name, state in (line.split() for line in queue.splitlines()):
                if _mine(prot, name) and state == 'RUNNING':
                    if subprocess.run(['scancel', job_id], capture_output=True).returncode == 0:
                        cancelled = job_id
        time.sleep(0.1)
    assert cancelled, 'no running job of the protocol to cancel'
    cluster.wait(prot)
    assert prot.isFailed(), prot.getStatus()
    assert 'the queue job ended before the command finished' in prot.getErrorMessage()
    assert dict((j[0], j[3]) for j in _jobs(prot))[cancelled].startswith('CANCELLED')
    assert not prot.hasAttribute(OUT_COORDS3D)
    done = _finished_ts(prot)
    assert TS_IDS[0] in done and len(done) < len(TS_IDS)
    mtimes = {ts: os.stat(prot._getExtraPath(f'{ts}_dog.star')).st_mtime_ns for ts in done}

    prot.runMode.set(MODE_RESUME)
    cluster.launch(prot, queue='cpu', per_step=True, STEP_THREADS='1')
    assert prot.isFinished(), prot.getErrorMessage()
    assert all(s.getStatus() == STATUS_FINISHED for s in prot.loadSteps())
    for ts, mtime in mtimes.items():
        assert os.stat(prot._getExtraPath(f'{ts}_dog.star')).st_mtime_ns == mtime, f'{ts} picked again'
    # over both runs: one completed job per tomogram, the cancelled one, nothing else
    states = sorted(j[3] for j in _jobs(prot))
    assert states.count('COMPLETED') == len(TS_IDS) and len(states) == len(TS_IDS) + 1, states
    pd.testing.assert_frame_equal(_sorted_picks(prot, cluster.tomos), dog_reference)
    # every job had one CPU and its command one thread
    for job_id, name, _, state in _jobs(prot):
        if state == 'COMPLETED':
            with open(prot._getLogsPath(f'{name}.out')) as fh:
                assert re.search(rf'SLURM job {job_id} on \S+: partition cpu, CPUs 1, GPUs none', fh.read())
    usage = _usage(prot)
    assert sorted(u['what'] for u in usage) == [f'{ts}.mrc' for ts in TS_IDS]
    assert all(u['n'] == '1' and u['job'] for u in usage), usage


def test_workflow_scripts_take_the_queue(cluster, tmp_path):
    """A pipeline script with --queue / --queue-params: its cryopick protocol runs as a SLURM job with
    those parameters, the import stays here; a queue hosts.conf lacks stops a script before any work."""
    from pyworkflow.project import Manager
    name = f'wf_queue_{os.getpid()}'
    run = subprocess.run([sys.executable, '-m', 'cryopick_plugin.workflows.demo', '--project', name, '--epochs', '0',
                          '--count', '1', '--shape', '48', '96', '96', '--queue', 'cpu',
                          '--queue-params', '{"JOB_MEMORY": "1500M"}'], cwd=str(tmp_path), capture_output=True,
                         text=True, timeout=TIMEOUT_S)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    cwd = os.getcwd()
    try:
        project = Manager().loadProject(name)
        runs = {p.getClassName(): p for p in project.getRuns()}
        imported, coords = runs['ProtImportTomograms'], runs['CryopickImportCoordinates3D']
        assert imported.isFinished() and not imported.useQueue()
        assert coords.isFinished() and coords.useQueue(), coords.getErrorMessage()
        assert coords.getQueueParams() == ['cpu', {'JOB_MEMORY': '1500M', 'JOB_TIME': '1', 'JOB_GPUS': '1',
                                                   'QUEUE_FOR_JOBS': 'N', 'STEP_THREADS': '0'}]
        assert coords.output3DCoordinates.getSize() > 0
        jobs = _jobs(coords)
        assert len(jobs) == 1 and jobs[0][2:] == ('cpu', 'COMPLETED'), jobs
        with open(coords._getLogsPath(f'cryopick{coords.strId()}.job')) as fh:
            assert '#SBATCH --mem=1500M' in fh.read()
    finally:
        os.chdir(cwd)

    refused = subprocess.run([sys.executable, '-m', 'cryopick_plugin.workflows.label_free_3d', '--simulate',
                              '--project', name + '_refused', '--queue', 'nosuch'], cwd=str(tmp_path),
                             capture_output=True, text=True, timeout=TIMEOUT_S)
    assert refused.returncode != 0
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "no queue 'nosuch' (queues: cpu)" in lines[0] and 'hosts.conf' in lines[0], lines
    assert not Manager().hasProject(name + '_refused')
