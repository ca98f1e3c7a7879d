"""Viewer of DISCA clustering and prediction runs.

DISCA run (files in extra/disca/, rewritten after every iteration, so a running job can be watched): K,
BIC and DDBI per iteration (history.json), the feature space of every iteration coloured by cluster
(embeddings.npz), three central slices of each class average (the files history.json lists under
'class_averages'; unaligned averages), then the class members on tomogram slices (output3DCoordinates,
groupId = cluster) with membership-probability histograms. DISCA predict: the history of the model it
used (from the model's description) and the members on tomogram slices.
"""
import json
import os

from ..constants import OUT_COORDS3D
from ..engine.errors import InputError
from ..protocols import CryopickDisca, CryopickDiscaPredict
from . import figures as fig
from .viewer_base import CryopickFigureViewer, cached
from .viewer_pick3d import coordinates3d_figures


def disca_run_figures(disca_dir, folder):
    """Figures of a DISCA output folder (history.json, embeddings.npz, class averages). Returns PNG paths;
    missing files are skipped (a run that has not finished its first iteration has none)."""
    paths = []
    history_path = os.path.join(disca_dir, 'history.json')
    if not os.path.exists(history_path):
        return paths
    with open(history_path) as fh:
        try:
            history = json.load(fh)
        except ValueError as exc:
            raise InputError(history_path, f"not a readable JSON file ({exc})") from None
    kept = history.get('kept_iteration')
    paths.append(cached(folder, 'disca_history.png', [history_path],
                        lambda out: fig.disca_history(history, out)))
    emb_path = os.path.join(disca_dir, 'embeddings.npz')
    if os.path.exists(emb_path):
        paths.append(cached(folder, 'disca_feature_space.png', [emb_path, history_path],
                            lambda out: fig.disca_feature_space(emb_path, out, kept_iteration=kept)))
    averages = [dict(a, file=os.path.join(disca_dir, a['file'])) for a in history.get('class_averages', [])
                if os.path.exists(os.path.join(disca_dir, a['file']))]
    if averages:
        paths.append(cached(folder, 'disca_class_averages.png', [history_path] + [a['file'] for a in averages],
                            lambda out: fig.class_average_slices(averages, out, title='DISCA class averages')))
    return paths


def model_history_figure(model_path, folder, name='model_history.png'):
    """DISCA history of a saved model (its JSON description's meta), or None when it has none."""
    side = os.fspath(model_path) + '.json'
    if not os.path.exists(side):
        return None
    with open(side) as fh:
        meta = json.load(fh).get('meta', {})
    if not meta.get('history'):
        return None
    return cached(folder, name, [side], lambda out: fig.disca_history(
        {'iterations': meta['history'], 'kept_iteration': meta.get('best_iteration')}, out))


class CryopickDiscaViewer(CryopickFigureViewer):
    """DISCA: iterations (K, BIC, DDBI), feature space, class averages, class members on tomograms."""
    _label = 'cryopick: DISCA clustering'
    _targets = [CryopickDisca, CryopickDiscaPredict]

    def figures(self, obj):
        folder = self._figureDir(obj)
        paths = []
        if isinstance(obj, CryopickDiscaPredict):
            model = obj.inputModel.get()
            if model is not None and model.getPath():
                path = model_history_figure(model.getPath(), folder)
                if path:
                    paths.append(path)
        else:
            paths += disca_run_figures(os.path.abspath(obj._getExtraPath('disca')), folder)
        coords = getattr(obj, OUT_COORDS3D, None)
        if coords is not None:
            classes = sorted({int(c) for c in coords.getUniqueValues('_groupId')}) if coords.getSize() else []
            paths += coordinates3d_figures(coords, folder, class_labels={c: f'cluster {c}' for c in classes},
                                           score_label='membership probability')
        return paths
