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
