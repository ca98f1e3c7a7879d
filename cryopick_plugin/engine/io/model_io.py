"""Trained models on disk.

A cryopick model is one torch file holding a dictionary::

    {'format': 'cryopick-model', 'format_version': 1, 'method': 'deepetpicker' | 'disca' | ...,
     'arch': {...constructor arguments...}, 'state_dict': {...}, 'meta': {...training facts...}}

`meta` says how the model was made and what it needs (voxel size, classes, diameters, normalisation,
thresholds, software version). A JSON copy of everything but the weights is written beside it
(``<model>.json``) so a person or a Scipion form can read it without torch. Writes are atomic.
"""
import json
import os

from ..errors import InputError
from .mrc import atomic_path

FORMAT = 'cryopick-model'
FORMAT_VERSION = 1


def save_model(path, method, arch, state_dict, meta=None):
    """Write a model atomically; return its path. `arch` and `meta` must be JSON-serialisable."""
    import torch
    payload = {'format': FORMAT, 'format_version': FORMAT_VERSION, 'method': method,
               'arch': dict(arch), 'state_dict': {k: v.detach().cpu() for k, v in state_dict.items()},
               'meta': dict(meta or {})}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    description = {k: v for k, v in payload.items() if k != 'state_dict'}
    with atomic_path(str(path) + '.json') as tmp:
        with open(tmp, 'w') as fh:
            json.dump(description, fh, indent=2, sort_keys=True, default=str)
    return path


def load_model(path, method=None):
    """Read a model written by `save_model`; return (arch, state_dict, meta).

    Raises InputError naming the file when it is missing, not a cryopick model, of another format
    version, or made by another method than `method`.
    """
    import torch
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(path, "model file not found")
    try:
        payload = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as exc:
        raise InputError(path, f"not a readable model file ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get('format') != FORMAT:
        raise InputError(path, "not a cryopick model file")
    if payload.get('format_version') != FORMAT_VERSION:
        raise InputError(path, f"model format version {payload.get('format_version')} is not supported "
                               f"(this cryopick reads version {FORMAT_VERSION}); retrain or convert it")
    if method is not None and payload.get('method') != method:
        raise InputError(path, f"is a {payload.get('method')} model, expected a {method} model")
    return payload['arch'], payload['state_dict'], payload['meta']


def read_model_info(path):
    """The JSON description beside a model (everything but the weights), or loaded from the model."""
    side = os.fspath(path) + '.json'
    if os.path.exists(side):
        with open(side) as fh:
            return json.load(fh)
    arch, _, meta = load_model(path)
    return {'arch': arch, 'meta': meta}
