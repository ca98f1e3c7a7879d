"""A real single-node SLURM for the cluster tests, started and stopped by the session (start_slurm.sh).

Like the other tests that need system packages: required under CI (a missing package or a non-root run
fails them with one line), skipped elsewhere.
"""
import os
import shutil
import subprocess
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PROGRAMS = ('munged', 'slurmctld', 'slurmd', 'sinfo', 'sbatch', 'squeue', 'scancel', 'sacct', 'scontrol')


def _unavailable():
    """Why SLURM cannot run here, or None."""
    missing = [p for p in PROGRAMS if shutil.which(p) is None]
    if missing:
        return (f"SLURM not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge "
                f"(bash setup.sh as root does)")
    if os.geteuid() != 0:
        return 'SLURM tests need root (slurmd starts the jobs as the submitting user)'
    return None


@pytest.fixture(scope='session')
def slurm():
    """SLURM_CONF of a private SLURM (node idle, partitions `cpu` and `gpu`), set in os.environ so that
    Scipion's sbatch/squeue/scancel calls and the jobs use it; stopped after the session."""
    problem = _unavailable()
    if problem:
        if os.environ.get('CI') == 'true':
            pytest.fail(problem + ' (required under CI)', pytrace=False)
        pytest.skip(problem)
    # /tmp rather than pytest's tmp_path: short paths (munge's socket path has a length limit)
    folder = tempfile.mkdtemp(prefix='cryopick-slurm-')
    # this process owns it: should the session be killed, start_slurm.sh's watchdog stops it
    started = subprocess.run(['bash', os.path.join(HERE, 'start_slurm.sh'), folder, str(os.getpid())],
                             capture_output=True, text=True, timeout=600)
    conf = os.path.join(folder, 'slurm.conf')
    if started.returncode != 0:
        subprocess.run(['bash', os.path.join(HERE, 'stop_slurm.sh'), folder], capture_output=True, timeout=600)
        lines = (started.stderr or started.stdout).strip().splitlines()
        pytest.fail(f"SLURM did not start: {lines[-1] if lines else started.returncode}", pytrace=False)
    old = os.environ.get('SLURM_CONF')
    os.environ['SLURM_CONF'] = conf
    try:
        yield conf
    finally:
        subprocess.run(['bash', os.path.join(HERE, 'stop_slurm.sh'), folder], capture_output=True, timeout=600)
        if old is None:
            os.environ.pop('SLURM_CONF', None)
        else:
            os.environ['SLURM_CONF'] = old
        if not os.environ.get('CRYOPICK_KEEP_TEST_DATA'):
            shutil.rmtree(folder, ignore_errors=True)
