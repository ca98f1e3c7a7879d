"""DeepCryoPicker: fully automatic 2D picking whose training set comes from unsupervised clustering."""
import os

from pyworkflow.protocol import params
from pwem.objects import SetOfCoordinates

from ..constants import OUT_COORDS2D, OUT_MODEL
from ..objects import CryopickModel
from .protocol_model_import import model_object
from .protocol_picking2d_base import CryopickPicking2DBase

PRESETS = ['cpu', 'paper']
SHAPES = ['irregular', 'round', 'square']
CLUSTERINGS = ['ibc', 'kmeans', 'fcm', 'super']


class CryopickDeepCryoPicker(CryopickPicking2DBase):
    """Pick particles with DeepCryoPicker, with no manual picks.

    Micrographs are rescaled so particles fit the classifier's window, preprocessed, and clustered
    (intensity-based clustering, k-means, fuzzy c-means or SLIC super-clustering); cleaned regions that look
    like single particles become the positive classes of an automatic training set, background windows the
    negative class, and a CNN learns them. The CNN then scores every micrograph; large high-score regions are
    removed and local maxima go through non-maximum suppression. The trained model is an output, reusable
    on new micrographs.
    """
    _label = '2D picking (DeepCryoPicker)'
    _possibleOutputs = {OUT_COORDS2D: SetOfCoordinates, OUT_MODEL: CryopickModel}

    def _defineParams(self, form):
        super()._defineParams(form)
        self._defineDiameterParams(form)
        form.addParam('inputModel', params.PointerParam, pointerClass='CryopickModel', allowsNull=True,
                      label='Trained model (optional)',
                      help='Pick with a model from an earlier run instead of training a new one.')
        form.addParam('preset', params.EnumParam, choices=PRESETS, default=0, label='Classifier size',
                      display=params.EnumParam.DISPLAY_HLIST,
                      help='cpu: a narrow network on small windows; paper: the published AlexNet-like network on '
                           '227² windows (GPU).')
        form.addParam('shape', params.EnumParam, choices=SHAPES, default=0, label='Particle views',
                      display=params.EnumParam.DISPLAY_HLIST,
                      help='irregular: region centroids (e.g. β-galactosidase); round: circular Hough transform; '
                           'square: Feret-box views.')
        form.addParam('clustering', params.EnumParam, choices=CLUSTERINGS, default=0, label='Clustering',
                      help='How the first, automatic training set is found. ibc: intensity-based clustering '
                           '(AutoCryoPicker); super: SLIC superpixels then clustering (SuperCryoPicker); '
                           'kmeans; fcm: fuzzy c-means. With self-training the choice matters less; ibc is the '
                           'safer choice on micrographs with carbon or contamination.')
        form.addParam('polarity', params.EnumParam, choices=['dark', 'bright'], default=0,
                      display=params.EnumParam.DISPLAY_HLIST, label='Particle contrast',
                      help='dark: particles darker than the ice (raw micrographs).')
        form.addParam('threshold', params.FloatParam, allowsNull=True, default=None, label='Score threshold',
                      help='Minimum classifier score of a pick. Empty: the model\'s own threshold, chosen at '
                           'training as the score that 5% of empty-ice positions (one diameter away from '
                           'every clustering candidate and every confident pick) reach on the training '
                           'micrographs, within 0.05–0.5. Lower it for crowded micrographs, raise it for '
                           'clean ones.')
        self._defineEdgeParam(form)
        form.addParam('selfTraining', params.IntParam, default=3, label='Self-training rounds',
                      expertLevel=params.LEVEL_ADVANCED,
                      help='After the first training, the classifier picks its own training micrographs and a '
                           'new one is trained on its confident picks (score ≥ 0.5), with background drawn '
                           'away from every pick; each round repeats that with the newest classifier. The '
                           'clustering finds only some of the particles of a crowded micrograph; this teaches '
                           'the classifier the rest, most of the gain coming from the first two rounds. Each '
                           'round costs one more training. A round that finds too few confident picks ends '
                           'the self-training with the classifier it has. 0 = the published method.')
        form.addParam('maxTrain', params.IntParam, default=20, label='Train on at most (micrographs)',
                      expertLevel=params.LEVEL_ADVANCED,
                      help='The automatic training set is built from the first micrographs, up to this many.')
        form.addParam('seed', params.IntParam, default=0, label='Random seed', expertLevel=params.LEVEL_ADVANCED,
                      help='Seed of the random number generators (weights, sampling), so a run can be repeated.')
        self._defineComputeParams(form, gpu=True)

    def _insertAllSteps(self):
        deps = []
        if self.inputModel.get() is None:
            deps.append(self._insertFunctionStep(self.trainStep, needsGPU=True))
        picks = [self._insertFunctionStep(self.pickStep, chunk, prerequisites=deps, needsGPU=True)
                 for chunk in self._micChunks()]
        self._insertFunctionStep(self.createOutputStep, prerequisites=picks, needsGPU=False)

    def _modelPath(self):
        if self.inputModel.get() is not None:
            return os.path.abspath(self.inputModel.get().getPath())
        return os.path.abspath(self._getExtraPath('model', 'deepcryopicker_model.pt'))

    def _common(self):
        return ['--diameter', self._diameterPx(), '--preset', PRESETS[self.preset.get()],
                '--shape', SHAPES[self.shape.get()], '--clustering', CLUSTERINGS[self.clustering.get()],
                '--polarity', ['dark', 'bright'][self.polarity.get()], '--seed', self.seed.get()]

    def trainStep(self):
        names = [n for chunk in self._micChunks() for n in chunk]
        self._runCryopick('deepcryopicker', self._micPaths(names) + self._common() +
                          ['--train-only', '--max-train', self.maxTrain.get(),
                           '--self-training', self.selfTraining.get(),
                           '--out', os.path.dirname(self._modelPath())], gpu=True)

    def pickStep(self, names):
        args = self._micPaths(names) + self._common() + self._edgeArgs() + ['--model', self._modelPath(),
                                                                              '--out', self._picksDir()]
        if self.threshold.get() is not None:
            args += ['--threshold', self.threshold.get()]
        self._runCryopick('deepcryopicker', args, gpu=True)

    def createOutputStep(self):
        self._registerPicks()
        if self.inputModel.get() is None:
            model = model_object(self._modelPath(), 'deepcryopicker')
            model.setSamplingRate(self.inputMicrographs.get().getSamplingRate())
            self._defineOutputs(**{OUT_MODEL: model})
            self._defineSourceRelation(self.inputMicrographs, model)

    def _validate(self):
        errors = self._validateMicrographs()
        model = self.inputModel.get()
        if model is not None and model.getMethod() != 'deepcryopicker':
            errors.append(f'The model is a {model.getMethod()} model, not a DeepCryoPicker one.')
        if model is None and self.selfTraining.get() is not None and self.selfTraining.get() < 0:
            errors.append(f'Self-training rounds must be 0 or more, not {self.selfTraining.get()}.')
        return errors

    def _methods(self):
        text = ('Particles were picked fully automatically with DeepCryoPicker [AlHelali2020DeepCryoPicker] '
                '(cryopick implementation)')
        if self.inputModel.get() is None and self.selfTraining.get():
            text += (f', with {self.selfTraining.get()} round(s) of retraining on the classifier\'s own '
                     f'confident picks')
        return [text + '.']

    def _citations(self):
        return ['AlHelali2020DeepCryoPicker']
