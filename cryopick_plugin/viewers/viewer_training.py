"""Viewer of trained models: learning curves with the kept epoch marked.

DeepETPicker (CryopickTrain3D): <model>.history.csv (train loss every epoch; val loss, precision, recall,
F1 and score every few epochs), kept epoch from the model's description. CryoSegNet
(CryopickTrainCryoSegNet): the history in the model's description (train / val loss, val Dice). A
CryopickModel of any method shows the same, a DISCA model its K / BIC / DDBI per iteration.
"""
import json
import os

from ..constants import OUT_MODEL
from ..objects import CryopickModel
from ..protocols import CryopickTrain3D, CryopickTrainCryoSegNet
from . import figures as fig
from .viewer_base import CryopickFigureViewer, cached, figure_dir

TITLES = {'deepetpicker': 'DeepETPicker training', 'cryosegnet': 'CryoSegNet training',
          'deepcryopicker': 'DeepCryoPicker training', 'disca': 'DISCA'}


def _description(model_path):
    side = os.fspath(model_path) + '.json'
    if os.path.exists(side):
        with open(side) as fh:
            return side, json.load(fh)
    return None, {}


class _Folder:
    """Gives `figure_dir` a folder to put viewer/ in, as a protocol's `_getExtraPath` would."""

    def __init__(self, path):
        self.path = path

    def _getExtraPath(self, *names):
        return os.path.join(self.path, *names)


def model_figures(model_path, folder, method=None):
    """Learning-curve figure of a model file (DISCA: its iterations). Returns a list of 0 or 1 PNG paths:
    none when the model has no per-epoch history (DeepCryoPicker keeps only its last epoch)."""
    model_path = os.fspath(model_path)
    side, description = _description(model_path)
    meta = description.get('meta', {})
    method = method or description.get('method')
    stem = os.path.splitext(os.path.basename(model_path))[0]
    if method == 'disca' and isinstance(meta.get('history'), list):
        return [cached(folder, f'{stem}_history.png', [side], lambda out: fig.disca_history(
            {'iterations': meta['history'], 'kept_iteration': meta.get('best_iteration')}, out))]
    history_file = next((p for p in (model_path + '.history.csv', model_path + '.history.json')
                         if os.path.exists(p)), None)
    if history_file is None and isinstance(meta.get('history'), list):
        history_file = side
    if history_file is None:
        return []
    best = meta.get('best_epoch')
    title = TITLES.get(method, 'Training') + f' ({os.path.basename(model_path)})'
    return [cached(folder, f'{stem}_learning_curves.png', [history_file, side],
                   lambda out: fig.learning_curves(fig.read_history(history_file), out,
                                                   best_epoch=int(best) if best is not None else None,
                                                   title=title))]


class CryopickTrainingViewer(CryopickFigureViewer):
    """Learning curves of a cryopick training run or model."""
    _label = 'cryopick: learning curves'
    _targets = [CryopickTrain3D, CryopickTrainCryoSegNet, CryopickModel]

    def _modelPath(self, obj):
        if isinstance(obj, CryopickModel):
            return obj.getPath(), obj.getMethod()
        model = getattr(obj, OUT_MODEL, None)
        if model is not None:
            return model.getPath(), model.getMethod()
        # A run still training: DeepETPicker saves its best model as it goes.
        if hasattr(obj, '_modelPath'):
            return obj._modelPath(), None
        return None, None

    def _figureDir(self, obj):
        if isinstance(obj, CryopickModel) and obj.getPath():
            # beside the model file (the extra/ folder of the run that made or imported it)
            return figure_dir(_Folder(os.path.dirname(os.path.abspath(obj.getPath()))),
                              os.path.abspath(self._getTmpPath('cryopick_viewer')))
        return CryopickFigureViewer._figureDir(self, obj)

    def figures(self, obj):
        path, method = self._modelPath(obj)
        if not path or not (os.path.exists(path) or os.path.exists(path + '.json')):
            return []
        return model_figures(path, self._figureDir(obj), method)
