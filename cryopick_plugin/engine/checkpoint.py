"""Per-epoch checkpoints of the long trainings, so an interrupted run resumes where it stopped.

A training that writes the model `OUT` keeps its state after every epoch in `OUT.checkpoint.pt` (written
atomically: temporary file, then rename, so a kill never leaves half a checkpoint): network and optimiser
state, learning-rate schedule, random-number generator states, the learning curve and the best weights so
far, plus the settings that shape the run (data, network, schedule, seed). A new run with the same output
resumes from it when the settings are the same (`resume='auto'`, the default), requires it
(`resume=True`, an error naming the file when it is missing or was made with other settings) or ignores
it (`resume=False`). With its random states restored, a resumed run takes the same steps as one that was
never interrupted. The training removes the checkpoint when it finishes; one stopped by a time budget
keeps it, so running the same command again continues the training.
"""
import json
import logging
import os

from .errors import InputError

logger = logging.getLogger(__name__)

SUFFIX = '.checkpoint.pt'
FORMAT = 'cryopick-checkpoint'
FORMAT_VERSION = 1
RESUME_CHOICES = ('auto', True, False)


def path_for(out):
    """The checkpoint file of the training that writes `out`."""
    return os.fspath(out) + SUFFIX


def _plain(settings):
    """Settings as JSON sees them (tuples become lists, numpy scalars and paths become plain values)."""
    def default(value):
        if hasattr(value, 'item'):
            return value.item()
        if hasattr(value, 'tolist'):
            return value.tolist()
        return str(value)
    return json.loads(json.dumps(settings, sort_keys=True, default=default))


def differences(saved, settings):
    """Names of the settings whose values differ between two settings dicts."""
    a, b = _plain(saved), _plain(settings)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def save(path, settings, state):
    """Write a checkpoint atomically: `settings` (JSON-able) and `state` (anything torch.save takes)."""
    import torch
    from .io.mrc import atomic_path
    with atomic_path(path) as tmp:
        torch.save({'format': FORMAT, 'format_version': FORMAT_VERSION, 'settings': _plain(settings),
                    'state': state}, tmp)
    return path


def check(path, resume):
    """Before any long work: InputError when `resume` is True and there is no checkpoint at `path`."""
    if resume not in RESUME_CHOICES:
        raise InputError('resume', f"expected 'auto', True or False, got {resume!r}")
    if resume is True and not os.path.exists(os.fspath(path)):
        raise InputError(path, "no checkpoint to resume from (the run finished, or never completed an epoch)")


def load(path, settings, resume='auto', say=None):
    """The saved state to resume from, or None to start afresh.

    resume 'auto': the state when `path` exists and was written with the same settings; otherwise None,
    with a warning when a checkpoint is there but cannot be used (it is replaced by the first epoch).
    resume True: the state; InputError naming the file when there is none or its settings differ.
    resume False: None (a checkpoint there is replaced by the first epoch).
    """
    import torch
    check(path, resume)
    say = say or logger.warning
    path = os.fspath(path)
    if resume is False:
        if os.path.exists(path):
            say(f'{path}: checkpoint of an earlier run ignored (starting afresh); it will be replaced')
        return None
    if not os.path.exists(path):
        return None
    try:
        payload = torch.load(path, map_location='cpu', weights_only=False)
        ok = isinstance(payload, dict) and payload.get('format') == FORMAT \
            and payload.get('format_version') == FORMAT_VERSION
    except Exception:  # a truncated or foreign file: the run must not fail on it in 'auto' mode
        payload, ok = None, False
    if not ok:
        if resume is True:
            raise InputError(path, "not a readable cryopick checkpoint")
        say(f'{path}: not a readable checkpoint; starting afresh (it will be replaced)')
        return None
    changed = differences(payload['settings'], settings)
    if changed:
        problem = f"checkpoint made with other settings ({', '.join(changed)})"
        if resume is True:
            raise InputError(path, problem + '; run without resuming to start afresh')
        say(f'{path}: {problem}; starting afresh (it will be replaced)')
        return None
    return payload['state']


def remove(path):
    """Delete a checkpoint (a finished training has no use for it)."""
    try:
        os.remove(os.fspath(path))
    except FileNotFoundError:
        pass


def rng_state(rng=None):
    """Random states to save: numpy Generator `rng` (optional), torch CPU and, when present, CUDA."""
    import torch
    state = {'torch': torch.get_rng_state()}
    if rng is not None:
        state['numpy'] = rng.bit_generator.state
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state, rng=None):
    """Put back the random states of `rng_state` (into `rng` for the numpy one)."""
    import torch
    torch.set_rng_state(state['torch'])
    if rng is not None and 'numpy' in state:
        rng.bit_generator.state = state['numpy']
    if 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])
