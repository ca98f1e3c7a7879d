"""Template-free candidate picking in tomograms with a difference of Gaussians."""
from pyworkflow.protocol import params
from tomo.objects import SetOfCoordinates3D
from tomo.protocols import ProtTomoPicking

from .. import convert
from ..constants import OUT_COORDS3D
from .protocol_base import CryopickProtocol

POLARITIES = ['dark', 'bright', 'both']


class CryopickDogPick(CryopickProtocol, ProtTomoPicking):
    """Candidate particles by difference of Gaussians (DoG), no template, no training.

    The tomogram is band-passed around the expected particle size (two Gaussians whose sigmas follow from
    the diameter), local extrema of the chosen polarity are taken tile by tile, and candidates closer than
    the minimum distance are suppressed, strongest first. The score is the DoG response in units of the
    map's robust standard deviation, comparable between tomograms. Use it to seed DISCA clustering or as
    weak labels for 3D picking.
    """
    _label = 'DoG candidate picking'
    _possibleOutputs = {OUT_COORDS3D: SetOfCoordinates3D}
    stepsExecutionMode = params.STEPS_PARALLEL

    def _defineParams(self, form):
        ProtTomoPicking._defineParams(self, form)
        form.addParam('diameter', params.FloatParam, default=20, label='Particle diameter (voxels)',
                      help='Expected particle diameter in voxels of the input tomograms.')
        form.addParam('polarity', params.EnumParam, choices=POLARITIES, default=0,
                      display=params.EnumParam.DISPLAY_HLIST, label='Particle contrast',
                      help='dark: particles darker than the background (usual cryo-ET contrast); bright: '
                           'inverted tomograms; both: either.')
        form.addParam('threshold', params.FloatParam, allowsNull=True, default=None, label='Score threshold',
                       help='Keep candidates whose DoG score is above this. Empty: keep the strongest up to the '
                            'maximum number.')
        form.addParam('maxPicks', params.IntParam, default=500, label='Maximum candidates per tomogram',
                      help='The strongest candidates are kept, at most this many per tomogram.')
        form.addParam('minDistance', params.FloatParam, allowsNull=True, default=None,
                      label='Minimum distance (voxels)', help='Empty: derived from the diameter.')
        form.addParam('boxSize', params.IntParam, allowsNull=True, default=None, label='Box size (voxels)',
                      help='Recorded with the picks for extraction. Empty: 1.5 × diameter, even.')
        self._defineComputeParams(form, gpu=False)

    def _insertAllSteps(self):
        tsIds = list(convert.tomograms_by_name(self.inputTomograms.get()))
        steps = [self._insertFunctionStep(self.pickStep, tsId, prerequisites=[], needsGPU=False) for tsId in tsIds]
        self._insertFunctionStep(self.createOutputStep, tsIds, prerequisites=steps, needsGPU=False)

    def pickStep(self, tsId):
        args = [self._tomogramFile(tsId), '--diameter', self.diameter.get(),
                '--polarity', POLARITIES[self.polarity.get()], '--max-picks', self.maxPicks.get(),
                '--tomo-name', tsId, '--out', self._tsPath(tsId, '_dog.star')]
        if self.threshold.get() is not None:
            args += ['--threshold', self.threshold.get()]
        if self.minDistance.get() is not None:
            args += ['--min-distance', self.minDistance.get()]
        self._runCryopick('dog-pick', args)

    def createOutputStep(self, tsIds):
        self._registerPerTomogramPicks(self.inputTomograms.get(), tsIds, '_dog.star',
                                       self.boxSize.get() or int(2 * round(0.75 * self.diameter.get())),
                                       OUT_COORDS3D)

    def _validate(self):
        errors = []
        tomos = self.inputTomograms.get()
        if tomos is not None:
            if tomos.getSize() == 0:
                errors.append('The tomogram set is empty.')
            elif self.diameter.get() and min(tomos.getDim()) < self.diameter.get():
                errors.append(f'The diameter ({self.diameter.get():g} voxels) is larger than the tomograms '
                              f'({tomos.getDim()}).')
        if not self.diameter.get() or self.diameter.get() < 2:
            errors.append('The diameter must be at least 2 voxels.')
        return errors

    def _summary(self):
        if not self.hasAttribute(OUT_COORDS3D):
            return ['Candidates not ready yet.']
        return [f'{getattr(self, OUT_COORDS3D).getSize()} DoG candidates '
                f'(diameter {self.diameter.get():g} voxels, {POLARITIES[self.polarity.get()]} particles).']

    def _methods(self):
        return ['Candidate particles were found with a difference-of-Gaussians detector, the template-free '
                'first step of DISCA [Zeng2023DISCA] (cryopick).']

    def _citations(self):
        return ['Zeng2023DISCA']
