"""Headless Scipion owned by cryopick.

Scipion reads its configuration from environment variables when `pyworkflow` is first imported, so
`configure()` must run before that import. It gives a pip-only installation (no scipion-app launcher)
what `scipion3` would set up: the `pwem` domain, a writable user-data folder, a hosts.conf for the local
machine, the Python that runs protocol steps, no test-data downloads and a non-interactive matplotlib.
Values already present in the environment win, so a real Scipion installation keeps its own.
"""
import os
import sys

HOSTS_CONF = """\
; Scipion execution hosts, written by cryopick. Protocols run on [localhost] unless a queue is chosen.
[localhost]
PARALLEL_COMMAND = mpirun -np %_(JOB_NODES)d --map-by node %_(COMMAND)s
; To send protocols (or each of their steps) to a SLURM cluster, replace this file with the output of
;   cryopick cluster-config --partition NAME [--gpu-partition NAME] [--gpus-per-job N] [--time HOURS]
; (README, "Running on a cluster"); then choose the queue in the protocol form.
"""


def default_home():
    """Folder for cryopick's own Scipion configuration and projects (overridable by CRYOPICK_HOME)."""
    return os.environ.get('CRYOPICK_HOME') or os.path.join(os.path.expanduser('~'), '.cryopick')


def configure(home=None, user_data=None):
    """Set the environment a headless Scipion needs; return the SCIPION_USER_DATA folder in use."""
    home = os.path.abspath(home or default_home())
    env = os.environ
    env.setdefault('SCIPION_DOMAIN', 'pwem')
    env.setdefault('SCIPION_HOME', os.path.join(home, 'scipion'))
    if user_data:
        env['SCIPION_USER_DATA'] = os.path.abspath(user_data)
    env.setdefault('SCIPION_USER_DATA', os.path.join(home, 'ScipionUserData'))
    env.setdefault('SCIPION_TESTS', os.path.join(env['SCIPION_USER_DATA'], 'tests-data'))
    env.setdefault('SCIPION_TEST_NOSYNC', '1')
    env.setdefault('SCIPION_NOTIFY', 'False')
    env.setdefault('MPLBACKEND', 'Agg')
    # Protocol steps run in a child `python`: it must be this interpreter (the one with the plugin).
    env.setdefault('SCIPION_PYTHON', sys.executable)
    bindir = os.path.dirname(sys.executable)
    if env.get('PATH', '').split(os.pathsep)[0] != bindir:
        env['PATH'] = bindir + os.pathsep + env.get('PATH', '')
    for folder in (env['SCIPION_HOME'], env['SCIPION_USER_DATA'], env['SCIPION_TESTS']):
        os.makedirs(folder, exist_ok=True)
    hosts = env.setdefault('SCIPION_HOSTS', os.path.join(env['SCIPION_HOME'], 'config', 'hosts.conf'))
    if not os.path.exists(hosts):
        os.makedirs(os.path.dirname(hosts), exist_ok=True)
        with open(hosts, 'w') as fh:
            fh.write(HOSTS_CONF)
    return env['SCIPION_USER_DATA']
