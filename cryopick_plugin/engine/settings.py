"""Where cryopick finds data and which device it computes on, outside Scipion.

The same names are the Scipion plugin variables (see `cryopick_plugin.Plugin`), read from the environment
first, so a setting given to Scipion reaches the engine commands that its protocols run.
"""
import os

TEMPLATES_VAR = 'CRYOPICK_TEMPLATES'
DATA_VAR = 'CRYOPICK_DATA'
DEVICE_VAR = 'CRYOPICK_DEVICE'
MODELS_VAR = 'CRYOPICK_MODELS'
SAM_CHECKPOINT_VAR = 'CRYOPICK_SAM_CHECKPOINT'

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def default_data_dir():
    """The shared data folder: $CRYOPICK_DATA, else ../shared/data beside a source checkout, else None."""
    value = os.environ.get(DATA_VAR)
    if value:
        return value
    candidate = os.path.join(os.path.dirname(_REPO_ROOT), 'shared', 'data')
    return candidate if os.path.isdir(candidate) else None


def default_templates_dir():
    """Density maps for simulation: $CRYOPICK_TEMPLATES, else <data>/templates_10A when present, else None."""
    value = os.environ.get(TEMPLATES_VAR)
    if value:
        return value
    data = default_data_dir()
    candidate = os.path.join(data, 'templates_10A') if data else None
    return candidate if candidate and os.path.isdir(candidate) else None


def default_models_dir():
    return os.environ.get(MODELS_VAR) or os.path.join(os.path.expanduser('~'), '.cryopick', 'models')


def resolve_device(requested=None):
    """'cpu', 'cuda' or 'cuda:N' from the request, $CRYOPICK_DEVICE or what is available ('auto')."""
    requested = (requested or os.environ.get(DEVICE_VAR) or 'auto').strip().lower()
    import torch  # imported here so commands without torch start fast
    if requested == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    if requested.startswith('cuda') and not torch.cuda.is_available():
        from .errors import InputError
        raise InputError('device', f"'{requested}' requested but no CUDA device is available")
    return requested
