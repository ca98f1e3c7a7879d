"""DISCA model files: the kept network + PCA + mixture (+ stored splits), and prediction with them."""
import numpy as np

from . import yopo
from ..errors import InputError
from ..io.model_io import load_model, save_model
from ..settings import resolve_device
from .checks import apply_splits
from .features import mixture_inputs
from .mixtures import posterior, project

METHOD = 'disca'


def save_disca_model(path, result, meta=None, alignment=None):
    """Write the kept network + PCA + mixture of a DiscaResult as a cryopick model file; return the path.
    With `alignment` (`align.run(...)['model']`), the refinement's references go in too, and the model
    predicts its classes (what labels.star of that run holds) rather than the network's clusters."""
    info = dict(result.meta)
    info['options'] = result.options
    info['history'] = [{k: v for k, v in h.items() if k != 'bic_by_k'} for h in result.history]
    info.update(meta or {})
    state = dict(result.model_state)
    if alignment is not None:
        import torch
        state['align.references'] = torch.from_numpy(np.asarray(alignment['references'], np.float32))
        info['alignment'] = {k: v for k, v in alignment.items() if k != 'references'}
    return save_model(path, METHOD, result.arch, state, info)


def _check_box(stack, meta, model_path):
    box = meta.get('input_box')
    if stack.ndim == 4 and box is not None and stack.shape[-1] != int(box):
        raise InputError(model_path, f"model was trained on {box}³ subtomograms, got {stack.shape[-1]}³")


def disca_features(stack, model_path, device='auto', batch_size=64):
    """Network features of subtomograms under a saved DISCA model: (features (N, F), their PCA projection
    (N, d) — the space the mixture lives in, with the subtomograms' rotation-invariant features beside the
    network's for a joint-view model —, state dict of the model file)."""
    arch, state, meta = load_model(model_path, METHOD)
    stack = np.asarray(stack)
    _check_box(stack, meta, model_path)
    device = resolve_device(device)
    data = yopo.prepare_stack(stack, arch)
    net = yopo.build_features(arch)
    net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith('net.')})
    net.to(device)
    with yopo.DeterministicTorch(device):
        features = yopo.extract_features(net, data, device, batch_size)
    x = project(state, mixture_inputs(state, features, stack))
    return features, x, state


def disca_predict(stack, model_path, device='auto', batch_size=64):
    """Assign subtomograms to the clusters of a saved DISCA model.

    Labels follow the model's mixture and then, in order, the splits its split check stored (a member of
    a split cluster goes to the side its spectral features fall on); a split cluster's probability is
    shared between its two sides by the split's posterior. A model of a run refined by alignment
    (`--align-refine`) assigns them to that run's classes instead, against its references (`align.classify`).
    stack: (N, b, b, b) with the box size the model was trained on. Returns (labels (N,) 0-based,
    probabilities (N, K) posterior of each cluster).
    """
    _, state, meta = load_model(model_path, METHOD)
    if 'align.references' in state:
        # a refined run: its classes are the alignment's, decided against its references
        from . import align
        settings = meta['alignment']
        _check_box(np.asarray(stack), meta, model_path)
        return align.classify(stack, state['align.references'].numpy(), settings['tau2'], box=settings['box'],
                              tilt_range=settings['tilt_range'], n_rotations=settings['orientations'],
                              seed=settings['seed'])
    _, x, state = disca_features(stack, model_path, device, batch_size)
    prob = posterior(x, state)
    labels, prob = apply_splits(np.asarray(stack), state, prob.argmax(axis=1).astype(int), prob)
    return labels, prob
