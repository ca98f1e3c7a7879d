"""DeepETPicker picking: a trained 3D-ResUNet over whole tomograms, overlap tiles and mean-pool NMS."""
import os

from pyworkflow.protocol import params
from tomo.objects import SetOfCoordinates3D
from tomo.protocols import ProtTomoPicking

from .. import convert
from ..constants import OUT_COORDS3D
from .protocol_base import CryopickProtocol


class CryopickPick3D(CryopickProtocol, ProtTomoPicking):
    """Pick particles in tomograms with a trained DeepETPicker model.

    Each tomogram is segmented tile by tile (only the centre of each tile is kept, so tile borders leave no
    seams), the probability map is binarised, mean-pooled and its local maxima taken as particle centres
    (MP-NMS), and picks closer than the de-duplication distance are merged. Thresholds default to the ones
    stored with the model (tuned on its validation tomogram when training did so). Output: a
    SetOfCoordinates3D with groupId = class and score = MP-NMS peak value, ready for extraction.
    """
    _label = '3D picking (DeepETPicker)'
    _possibleOutputs = {OUT_COORDS3D: SetOfCoordinates3D}
    stepsExecutionMode = params.STEPS_PARALLEL

    def _defineParams(self, form):
        ProtTomoPicking._defineParams(self, form)
        form.addParam('inputModel', params.PointerParam, pointerClass='CryopickModel', important=True,
                      label='Trained model', help='A DeepETPicker model from the 3D training or model import '
                                                  'protocol.')
        form.addParam('boxSize', params.IntParam, allowsNull=True, default=None, label='Box size (voxels)',
                      help='Box size recorded with the picks for extraction. Empty: the box size of the '
                           'coordinates the model was trained on.')
        group = form.addGroup('Thresholds (empty = the model\'s)')
        group.addParam('tSeg', params.FloatParam, allowsNull=True, default=None, label='Segmentation threshold',
                       help='Probability above which a voxel counts as particle (DeepETPicker hard-codes 0.5; '
                            'the model may carry a value tuned on its validation tomogram).')
        group.addParam('tLm', params.FloatParam, allowsNull=True, default=None, label='Local-maximum threshold',
                       help='Minimum mean-pooled value of a peak (DeepETPicker: 0.1). Lower finds more, '
                            'weaker particles.')
        group.addParam('tDist', params.FloatParam, allowsNull=True, default=None,
                       label='De-duplication distance (voxels)',
                       help='Picks closer than this are merged, keeping the higher score. Default from the '
                            'particle diameter.')
        group.addParam('pad', params.IntParam, allowsNull=True, default=None, label='Tile margin (voxels)',
                       help='Voxels discarded on each side of a tile. Larger = fewer border effects, more tiles.')
        form.addParam('rescale', params.BooleanParam, default=False, expertLevel=params.LEVEL_ADVANCED,
                      label='Rescale to the model\'s voxel size',
                      help='A model only works at the voxel size it was trained at. Yes: resample tomograms '
                           'of another voxel size to it and map the picks back. No: refuse them.')
        form.addParam('flipAverage', params.BooleanParam, default=False, expertLevel=params.LEVEL_ADVANCED,
                      label='Average over mirror images',
                      help='Yes: the network sees every tile in its eight mirror images and the maps are '
                           'averaged — 8× the network time for a slightly cleaner map. The model\'s thresholds were chosen on single-pass maps.')
        form.addParam('batchSize', params.IntParam, default=2, expertLevel=params.LEVEL_ADVANCED,
                      label='Tiles per batch', help='Lower it if the GPU runs out of memory.')
        self._defineComputeParams(form, gpu=True)

    # ------------------------------------------------------------------ steps
    def _insertAllSteps(self):
        tsIds = list(convert.tomograms_by_name(self.inputTomograms.get()))
        pick_steps = [self._insertFunctionStep(self.pickStep, tsId, prerequisites=[], needsGPU=True)
                      for tsId in tsIds]
        self._insertFunctionStep(self.createOutputStep, tsIds, prerequisites=pick_steps, needsGPU=False)

    def pickStep(self, tsId):
        args = [self._tomogramFile(tsId), '--model', os.path.abspath(self.inputModel.get().getPath()),
                '--out', self._tsPath(tsId, '_picks.star'), '--batch-size', self.batchSize.get(),
                '--work-dir', os.path.abspath(self._getTmpPath())]
        for flag, value in (('--t-seg', self.tSeg.get()), ('--t-lm', self.tLm.get()),
                            ('--t-dist', self.tDist.get()), ('--pad', self.pad.get())):
            if value is not None:
                args += [flag, value]
        if self.rescale.get():
            args.append('--rescale')
        if self.flipAverage.get():
            args.append('--flip-average')
        self._runCryopick('pick3d', args, gpu=True)

    def createOutputStep(self, tsIds):
        self._registerPerTomogramPicks(self.inputTomograms.get(), tsIds, '_picks.star', self._boxSize(),
                                       OUT_COORDS3D, extra_sources=(self.inputModel,))

    def _boxSize(self):
        if self.boxSize.get():
            return int(self.boxSize.get())
        info = self.inputModel.get().getInfo()
        box = info.get('box_size') or info.get('meta', {}).get('box_size')
        if box:
            return int(box)
        diameters = self.inputModel.get().getDiameters() or [16]
        return int(2 * round(1.5 * max(diameters)))

    # ------------------------------------------------------------------ info
    def _validate(self):
        errors = []
        tomos = self.inputTomograms.get()
        model = self.inputModel.get()
        if tomos is None or model is None:
            return errors
        if tomos.getSize() == 0:
            errors.append('The tomogram set is empty.')
        if model.getMethod() != 'deepetpicker':
            errors.append(f'The model is a {model.getMethod()} model; 3D picking needs a DeepETPicker model.')
        if not model.exists():
            errors.append(f'{model.getPath()}: model file not found')
        sr, msr = tomos.getSamplingRate(), model.getSamplingRate()
        if not sr:
            errors.append('The tomograms have no sampling rate.')
        elif msr and abs(sr - msr) > 0.01 * msr and not self.rescale.get():
            errors.append(f'The model was trained at {msr:g} Å/voxel but the tomograms are at {sr:g} Å/voxel: '
                          f'bin the tomograms to the model\'s voxel size or set "Rescale to the model\'s voxel '
                          f'size".')
        for name, value in (('Segmentation threshold', self.tSeg.get()), ('Local-maximum threshold', self.tLm.get())):
            if value is not None and not 0 < value < 1:
                errors.append(f'{name} must be between 0 and 1.')
        return errors

    def _summary(self):
        if not self.hasAttribute(OUT_COORDS3D):
            return ['Picks not ready yet.']
        out = getattr(self, OUT_COORDS3D)
        return [f'{out.getSize()} particles picked in {self.inputTomograms.get().getSize()} tomograms '
                f'(box {out.getBoxSize()} voxels at {out.getSamplingRate():g} Å/voxel).']

    def _methods(self):
        return ['Particles were picked with a 3D residual U-Net trained from weak labels, overlap-tile inference '
                'and mean-pool non-maximum suppression (DeepETPicker [Liu2024DeepETPicker]) in cryopick.']

    def _citations(self):
        return ['Liu2024DeepETPicker']
