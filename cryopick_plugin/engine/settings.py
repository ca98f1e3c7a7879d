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


PRECISION_VAR = 'CRYOPICK_PRECISION'
PRECISIONS = ('auto', 'fp32', 'bf16')


def resolve_precision(requested=None, device='cpu'):
    """'fp32' or 'bf16' for the networks' convolutions, from the request, $CRYOPICK_PRECISION or 'auto'.

    'auto' picks bf16 where the hardware computes it natively (CPUs with AVX-512 BF16 / AMX through oneDNN,
    CUDA devices with bf16 support) and fp32 elsewhere. Weights, optimiser state, losses and the outputs
    stay fp32; only the convolutions and matrix products run in bf16 (autocast). In fp32 on a CPU the 3D
    networks' convolutions take the route of `engine.conv3d` (torch's own fp32 3D convolution of a single
    volume is im2col + GEMM, a few GFLOP/s); bf16 on a CPU without native bf16 would be emulated and slower
    than fp32, hence the check. bench/README.md ("3D convolutions in fp32") compares the three.
    """
    requested = (requested or os.environ.get(PRECISION_VAR) or 'auto').strip().lower()
    if requested not in PRECISIONS:
        from .errors import InputError
        raise InputError('precision', f"unknown precision {requested!r} (choose from {', '.join(PRECISIONS)})")
    if requested != 'auto':
        return requested
    import torch
    if str(device).startswith('cuda'):
        return 'bf16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'fp32'
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return 'bf16' if native else 'fp32'


def autocast(device, precision):
    """Context manager running the network's forward pass at `precision` ('fp32' = no autocast)."""
    import torch
    kind = 'cuda' if str(device).startswith('cuda') else 'cpu'
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=precision == 'bf16')


def memory_format(ndim, precision):
    """Channels-last layout for bf16 (oneDNN's fast path for 2D and 3D convolutions), else contiguous."""
    import torch
    if precision != 'bf16':
        return torch.contiguous_format
    return torch.channels_last_3d if ndim == 5 else torch.channels_last if ndim == 4 else torch.contiguous_format
