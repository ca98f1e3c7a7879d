"""Import a trained cryopick model file as a Scipion object, to use it in another project."""
import os
import shutil

from pyworkflow.protocol import params

from ..constants import OUT_MODEL
from ..engine.errors import InputError
from ..engine.io.model_io import load_model
from ..objects import CryopickModel
from .protocol_base import CryopickProtocol

METHODS = ['deepetpicker', 'disca', 'deepcryopicker', 'cryosegnet']


def model_object(path, expected_method=None):
    """A CryopickModel describing the model file at `path` (read through the engine's model reader)."""
    arch, _, meta = load_model(path, method=expected_method)
    model = CryopickModel(path=path, method=meta.get('method') or expected_method)
    if meta.get('voxel_size') or meta.get('pixel_size'):
        model.setSamplingRate(float(meta.get('voxel_size') or meta.get('pixel_size')))
    classes = meta.get('classes') or arch.get('n_classes')
    if classes is not None:
        model.setNumClasses(len(classes) if isinstance(classes, (list, tuple)) else int(classes))
    diameters = meta.get('diameters')
    if isinstance(diameters, dict):
        diameters = list(diameters.values())
    if diameters:
        model.setDiameters(diameters if isinstance(diameters, (list, tuple)) else [diameters])
    model.setInfo({'arch': arch, 'meta': meta})
    return model


class CryopickImportModel(CryopickProtocol):
    """Import a trained cryopick model (DeepETPicker, DISCA, DeepCryoPicker or CryoSegNet).

    The file is checked (format, version, method) and copied into the project, so the project stays
    complete when the original is moved.
    """
    _label = 'import model'
    _possibleOutputs = {OUT_MODEL: CryopickModel}

    def _defineParams(self, form):
        form.addSection(label='Input')
        form.addParam('modelFile', params.PathParam, important=True, label='Model file',
                      help='A model written by a cryopick training protocol or `cryopick` command (.pt; its '
                           '.pt.json description is copied too when present).')
        form.addParam('method', params.EnumParam, choices=METHODS, default=0, label='Method',
                      help='The method the model belongs to; a model of another method is refused.')

    def _insertAllSteps(self):
        self._insertFunctionStep(self.importStep, needsGPU=False)

    def importStep(self):
        src = os.path.abspath(self.modelFile.get())
        method = METHODS[self.method.get()]
        load_model(src, method=method)  # refuse a wrong file before copying anything
        dst = os.path.abspath(self._getExtraPath(os.path.basename(src)))
        shutil.copy(src, dst)
        if os.path.exists(src + '.json'):
            shutil.copy(src + '.json', dst + '.json')
        model = model_object(dst, method)
        self._defineOutputs(**{OUT_MODEL: model})

    def _validate(self):
        path = self.modelFile.get()
        if not path or not os.path.isfile(path):
            return [f'{path}: model file not found']
        try:
            load_model(path, method=METHODS[self.method.get()])
        except InputError as exc:
            return [str(exc)]
        return []

    def _summary(self):
        if not self.hasAttribute(OUT_MODEL):
            return ['Model not imported yet.']
        return [f'Imported {getattr(self, OUT_MODEL)} from {self.modelFile.get()}.']

    def _methods(self):
        return []
