"""cryopick: DeepETPicker, DISCA, DeepCryoPicker and CryoSegNet as Scipion protocols.

Imported on its own (the `cryopick` command, tests, scripts), the package first sets up a headless Scipion
environment (see `headless.py`); imported by a running Scipion, it leaves Scipion's configuration alone.
"""
import os
import sys

from . import headless
from .constants import (__version__, DEVICE_VAR, MODELS_VAR, SAM_CHECKPOINT_VAR, TEMPLATES_VAR,  # noqa: F401
                        DATA_VAR, PRECISION_VAR)

if 'pyworkflow' not in sys.modules:
    headless.configure()

# Variables read by the thread pools of OpenMP (torch), OpenBLAS, MKL, BLIS and numexpr when they load.
THREAD_VARS = ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS', 'BLIS_NUM_THREADS',
               'NUMEXPR_NUM_THREADS')


def thread_allowance(environ=os.environ):
    """CPU threads this process may use, or None (no limit known).

    CRYOPICK_THREADS, set by the protocols for each job: a number, or 'job' / 'job:N' for the allowance
    of the queue job the command runs in (N where the queue does not say). Inside a SLURM job that
    allowance is its --cpus-per-task (SLURM_CPUS_PER_TASK), also when nothing else is said."""
    value = environ.get('CRYOPICK_THREADS', '').strip().lower()
    if value == '' or value.startswith('job'):
        fallback = value.partition(':')[2]
        value = environ.get('SLURM_CPUS_PER_TASK', '').strip() or fallback
    return int(value) if value.isdigit() and int(value) > 0 else None


def _apply_thread_allowance():
    # Before numpy and torch load (pwem imports numpy below): their pools start at this size.
    n = thread_allowance()
    if n:
        for var in THREAD_VARS:
            os.environ[var] = str(n)
    return n


def _record_usage_at_exit(path, threads):
    """At exit, write what this command used (peak memory, threads, wall time, queue job) to `path` as
    JSON, for the protocol that ran it to log: users size a job's --mem from it."""
    import atexit
    import time
    started, pid = time.time(), os.getpid()

    def write():
        if os.getpid() != pid:   # a forked worker exiting
            return
        import json
        import resource
        import socket
        peak_kb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
        usage = {'peak_rss_mb': round(peak_kb / 1024.0, 1), 'threads': threads,
                 'wall_s': round(time.time() - started, 2), 'host': socket.gethostname(),
                 'slurm_job_id': os.environ.get('SLURM_JOB_ID'),
                 'slurm_cpus_per_task': os.environ.get('SLURM_CPUS_PER_TASK')}
        if 'torch' in sys.modules:
            usage['torch_threads'] = sys.modules['torch'].get_num_threads()
        if 'numpy' in sys.modules:
            try:
                from threadpoolctl import threadpool_info
                usage['blas_threads'] = sorted({p['num_threads'] for p in threadpool_info()
                                                if p.get('user_api') == 'blas'})
            except Exception:  # threadpoolctl missing or a library it cannot query
                pass
        try:
            with open(path + '.tmp', 'w') as fh:
                json.dump(usage, fh)
            os.replace(path + '.tmp', path)
        except OSError:
            pass
    atexit.register(write)


_THREADS = _apply_thread_allowance()
# Only the command the protocol started records its usage, not processes it starts in turn.
if os.environ.get('CRYOPICK_USAGE_FILE'):
    _record_usage_at_exit(os.environ.pop('CRYOPICK_USAGE_FILE'), _THREADS)

import pwem  # noqa: E402
from pyworkflow.utils import Environ  # noqa: E402

from .engine import settings  # noqa: E402

_logo = 'icon.png'
_references = ['Liu2024DeepETPicker', 'Zeng2023DISCA', 'AlHelali2020DeepCryoPicker', 'Gyawali2024CryoSegNet']


class Plugin(pwem.Plugin):
    """Plugin variables:

    CRYOPICK_DEVICE          auto | cpu | cuda: where the networks run ('auto' picks CUDA when present;
                             a protocol's GPU list narrows the visible devices).
    CRYOPICK_PRECISION       auto | fp32 | bf16: arithmetic of the networks' convolutions ('auto' uses bf16
                             where the CPU or GPU computes it natively — about 10× faster 3D training on
                             AVX-512 BF16 CPUs — and fp32 elsewhere).
    CRYOPICK_MODELS          folder for trained models shared between projects.
    CRYOPICK_SAM_CHECKPOINT  Segment Anything checkpoint (vit_b / vit_l / vit_h .pth) for CryoSegNet.
    CRYOPICK_TEMPLATES       density maps used by the simulator (default: shared/data/templates_10A).
    CRYOPICK_DATA            folder with shared example data.
    """
    _url = 'https://github.com/cryopick/scipion-em-cryopick'
    _pathVars = []  # pip-only installation: nothing to validate at launch
    _supportedVersions = [__version__]

    @classmethod
    def _defineVariables(cls):
        cls._defineVar(DEVICE_VAR, 'auto', description='Compute device for the networks: auto, cpu or cuda')
        cls._defineVar(PRECISION_VAR, 'auto',
                       description='Arithmetic of the networks: auto (bf16 where native), fp32 or bf16')
        cls._defineVar(MODELS_VAR, settings.default_models_dir(),
                       description='Folder for trained cryopick models')
        cls._defineVar(SAM_CHECKPOINT_VAR, '',
                       description='Segment Anything checkpoint (.pth of vit_b, vit_l or vit_h) for CryoSegNet')
        cls._defineVar(TEMPLATES_VAR, settings.default_templates_dir() or '',
                       description='Folder of density maps (MRC) used by the simulator')
        cls._defineVar(DATA_VAR, settings.default_data_dir() or '',
                       description='Folder with shared example data')

    @classmethod
    def getEnviron(cls):
        """Environment of the engine commands: this Python's, with the plugin variables exported."""
        environ = Environ(os.environ)
        for var in (DEVICE_VAR, PRECISION_VAR, MODELS_VAR, SAM_CHECKPOINT_VAR, TEMPLATES_VAR, DATA_VAR):
            value = cls.getVar(var)
            if value:
                environ[var] = str(value)
        return environ

    @classmethod
    def getProgram(cls):
        """The `cryopick` command as run from a protocol: this interpreter with the package's main."""
        return f'{sys.executable} -m cryopick_plugin'

    @classmethod
    def runCryopick(cls, protocol, command, args, gpu=False, cwd=None, extra_env=None):
        """Run one `cryopick <command>` stage as a Scipion job (so it can go to a queue).

        With ``gpu=True`` the protocol's GPU list is exported as CUDA_VISIBLE_DEVICES (Scipion fills
        %(GPU)s, comma-separated) and the engine uses CUDA when it works there, unless the user turned the
        GPU off in the form or set CRYOPICK_DEVICE=cpu.
        """
        program = cls.getProgram()
        environ = cls.getEnviron()
        environ.update({k: str(v) for k, v in (extra_env or {}).items()})
        wants_gpu = gpu and bool(getattr(protocol, 'useGpu', None) is None or protocol.useGpu.get())
        if wants_gpu and str(cls.getVar(DEVICE_VAR)).lower() != 'cpu':
            # 'auto': the engine takes the (first) visible GPU when CUDA works, the CPU otherwise.
            program = 'CUDA_VISIBLE_DEVICES=%(GPU)s ' + program
            environ[DEVICE_VAR] = 'auto'
        else:
            environ[DEVICE_VAR] = 'cpu'
        protocol.runJob(program, f'{command} {args}', env=environ, cwd=cwd)

    @classmethod
    def defineBinaries(cls, env):
        # Everything is pip-installed with the plugin; no binaries to build.
        pass
