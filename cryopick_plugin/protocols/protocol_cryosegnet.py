"""CryoSegNet: attention U-Net training from picks, and picking with the U-Net map driving Segment Anything."""
import os

from pyworkflow.protocol import params
from pwem.objects import SetOfCoordinates
from pwem.protocols import ProtParticlePicking

from .. import Plugin, convert
from ..constants import OUT_COORDS2D, OUT_MODEL, SAM_CHECKPOINT_VAR
from ..engine.io import star
from ..objects import CryopickModel
from .protocol_base import CryopickProtocol
from .protocol_model_import import model_object
from .protocol_picking2d_base import CryopickPicking2DBase

PRESETS = ['cpu', 'paper']
# Must match engine.cryosegnet.LR_SCHEDULES (protocols stay free of the engine's torch imports).
LR_SCHEDULES = ['cosine', 'constant']
SAM_TYPES = ['auto', 'vit_b', 'vit_l', 'vit_h']


class CryopickTrainCryoSegNet(CryopickProtocol, ProtParticlePicking):
    """Train (or fine-tune) a CryoSegNet attention U-Net from micrographs and particle coordinates.

    Targets are filled circles of the particle diameter around each coordinate. Micrographs go through
    CryoSegNet's denoising chain (Gaussian blur, non-local means, Wiener deconvolution, CLAHE, guided filter)
    unless switched off, and are scaled (aspect ratio kept) to the network's input size. Loss: BCE + soft
    Dice; the epoch with the best validation Dice is kept. Fine-tuning starts from a given model.
    """
    _label = '2D picking training (CryoSegNet)'
    _possibleOutputs = {OUT_MODEL: CryopickModel}

    def _defineParams(self, form):
        ProtParticlePicking._defineParams(self, form)
        form.addParam('inputCoordinates', params.PointerParam, pointerClass='SetOfCoordinates', important=True,
                      label='Training coordinates', help='Particle picks on (some of) the input micrographs; '
                                                         'micrographs without picks are not used.')
        form.addParam('diameter', params.FloatParam, default=200.0, label='Particle diameter (Å)',
                      help='Diameter of the training targets (filled circles around each coordinate), in Å. '
                           'The wizard takes it from the coordinates\' box size (box = 1.5 × diameter).')
        form.addParam('initModel', params.PointerParam, pointerClass='CryopickModel', allowsNull=True,
                      label='Fine-tune from (optional)', help='A CryoSegNet model to start from.')
        form.addParam('preset', params.EnumParam, choices=PRESETS, default=0, label='Network size',
                      display=params.EnumParam.DISPLAY_HLIST,
                      help='cpu: 1/8 of the paper\'s width, 512-px input; paper: 131 M parameters, 1024-px input '
                           '(GPU).')
        form.addParam('epochs', params.IntParam, default=50, label='Epochs (the paper used 200)',
                      help='Passes over the training micrographs; the epoch with the best validation Dice is kept.')
        form.addParam('batchSize', params.IntParam, allowsNull=True, default=None, label='Batch size',
                      help='Micrographs (or 256² crops) per optimisation step. Empty: 4 for a new cpu-size '
                           'network (random 256² crops), 2 otherwise (whole micrographs). Lower it if the GPU '
                           'runs out of memory.')
        form.addParam('learningRate', params.FloatParam, allowsNull=True, default=None, label='Learning rate',
                      help='Adam learning rate. Empty: 1e-3 for a new cpu-size network (learns from a few '
                           'micrographs), 1e-4 — CryoSegNet\'s, for its ≈5 000 micrographs — for the paper size '
                           'and for fine-tuning.')
        form.addParam('lrSchedule', params.EnumParam, choices=LR_SCHEDULES, default=0,
                      label='Learning-rate schedule', display=params.EnumParam.DISPLAY_HLIST,
                      expertLevel=params.LEVEL_ADVANCED,
                      help='cosine: the rate decays to 1% of the learning rate over the run, so the last epochs '
                           'settle instead of swinging from one epoch to the next on noisy micrographs. '
                           'constant: CryoSegNet\'s. The picks were as good either way in the benchmarks.')
        form.addParam('valFraction', params.FloatParam, default=0.2, label='Validation fraction',
                      help='Fraction of the micrographs held out to choose the best epoch (validation Dice).')
        form.addParam('preprocess', params.BooleanParam, default=True, label='Denoise (CryoSegNet chain)',
                      help='No: the micrographs are already denoised.')
        form.addParam('seed', params.IntParam, default=0, label='Random seed', expertLevel=params.LEVEL_ADVANCED,
                      help='Seed of the random number generators (weights, sampling), so a run can be repeated.')
        self._defineComputeParams(form, gpu=True)

    def _insertAllSteps(self):
        self._insertFunctionStep(self.convertInputStep, needsGPU=False)
        self._insertFunctionStep(self.trainStep, needsGPU=True)
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    def _picked(self):
        df = convert.coordinates2d_to_frame(self.inputCoordinates.get(), self.inputMicrographs.get())
        return df

    def convertInputStep(self):
        star.write_coordinates(self._getExtraPath('train_coords.star'), self._picked())

    def trainStep(self):
        mics = convert.micrographs_by_name(self.inputMicrographs.get())
        df = star.read_coordinates(self._getExtraPath('train_coords.star'), dims=2)
        used = sorted(set(df[star.MIC]))
        # Picks name micrographs by base name; the engine matches rlnMicrographName to file stems, so
        # rewrite them to the files' own stems.
        stems = {n: os.path.splitext(os.path.basename(mics[n].getFileName()))[0] for n in used}
        df[star.MIC] = df[star.MIC].map(stems)
        star.write_coordinates(self._getExtraPath('train_coords.star'), df)
        sr = self.inputMicrographs.get().getSamplingRate()
        args = ['--micrographs'] + [os.path.abspath(mics[n].getFileName()) for n in used]
        args += ['--coords', os.path.abspath(self._getExtraPath('train_coords.star')),
                 '--diameter', self.diameter.get() / sr, '--out', self._modelPath(),
                 '--preset', PRESETS[self.preset.get()], '--epochs', self.epochs.get(),
                 '--val-fraction', self.valFraction.get(), '--pixel-size', sr, '--seed', self.seed.get(),
                 '--lr-schedule', LR_SCHEDULES[self.lrSchedule.get()]]
        if self.batchSize.get() is not None:
            args += ['--batch-size', self.batchSize.get()]
        if self.learningRate.get() is not None:
            args += ['--lr', self.learningRate.get()]
        if self.initModel.get() is not None:
            args += ['--init', os.path.abspath(self.initModel.get().getPath())]
        if not self.preprocess.get():
            args.append('--no-preprocess')
        self._runCryopick('train-cryosegnet', args, gpu=True)

    def _modelPath(self):
        return os.path.abspath(self._getExtraPath('cryosegnet_model.pt'))

    def createOutputStep(self):
        model = model_object(self._modelPath(), 'cryosegnet')
        model.setSamplingRate(self.inputMicrographs.get().getSamplingRate())
        model.setDiameters([self.diameter.get() / self.inputMicrographs.get().getSamplingRate()])
        self._defineOutputs(**{OUT_MODEL: model})
        self._defineSourceRelation(self.inputCoordinates, model)

    def _validate(self):
        errors = []
        coords, mics = self.inputCoordinates.get(), self.inputMicrographs.get()
        if coords is not None and coords.getSize() == 0:
            errors.append('The training coordinate set is empty.')
        if mics is not None and mics.getSize() and mics.getSamplingRate():
            if self.diameter.get() / mics.getSamplingRate() >= min(mics.getDim()[:2]):
                errors.append('The particle diameter is larger than the micrographs.')
        init = self.initModel.get()
        if init is not None and init.getMethod() != 'cryosegnet':
            errors.append(f'The model to fine-tune is a {init.getMethod()} model, not a CryoSegNet one.')
        return errors

    def _summary(self):
        if not self.hasAttribute(OUT_MODEL):
            return ['Model not trained yet.']
        meta = getattr(self, OUT_MODEL).getInfo().get('meta', {})
        return [f'CryoSegNet model trained; best epoch {meta.get("best_epoch", "?")}.']

    def _methods(self):
        return ['An attention-gated U-Net was trained as in CryoSegNet [Gyawali2024CryoSegNet] (cryopick).']

    def _citations(self):
        return ['Gyawali2024CryoSegNet']


class CryopickCryoSegNet(CryopickPicking2DBase):
    """Pick particles with CryoSegNet: U-Net probability map → Segment Anything → size filter.

    With a Segment Anything checkpoint (vit_b, vit_l or vit_h; the form's path or the
    CRYOPICK_SAM_CHECKPOINT variable) SAM's automatic mask generator segments the U-Net's map and masks of
    high predicted IoU whose box is close to the most common box size become picks. Without one, the
    U-Net-only path thresholds the map and takes distance-transform maxima (labelled as such in the summary).
    """
    _label = '2D picking (CryoSegNet)'
    _possibleOutputs = {OUT_COORDS2D: SetOfCoordinates}

    def _defineParams(self, form):
        super()._defineParams(form)
        form.addParam('inputModel', params.PointerParam, pointerClass='CryopickModel', important=True,
                      label='CryoSegNet model',
                      help='A model from the CryoSegNet training or model import protocol, trained at the '
                           'micrographs\' pixel size.')
        self._defineDiameterParams(form, optional=True)
        form.addParam('samCheckpoint', params.PathParam, default='', label='Segment Anything checkpoint',
                      help='sam_vit_b/l/h .pth file. Empty: the CRYOPICK_SAM_CHECKPOINT variable; if that is empty '
                           'too, U-Net-only picking.')
        form.addParam('samType', params.EnumParam, choices=SAM_TYPES, default=0, label='SAM model type',
                      help='auto: read it from the checkpoint.')
        self._defineEdgeParam(form)
        form.addParam('threshold', params.FloatParam, allowsNull=True, default=None,
                      label='U-Net threshold', help='Probability threshold of the U-Net-only path. Empty: the model\'s own, chosen '
                           'during training on the held-out micrographs (0.5 when it had none).')
        group = form.addGroup('Segment Anything', expertLevel=params.LEVEL_ADVANCED)
        group.addParam('pointsPerSide', params.IntParam, default=32, label='Points per side',
                       help='Prompt grid of the automatic mask generator on the 1024-px map. Raise it for particles '
                            'smaller than ~32 px at that scale.')
        group.addParam('iouFilter', params.FloatParam, default=0.94, label='Keep masks with predicted IoU above',
                       help='Segment Anything scores each mask by its predicted IoU; lower masks are dropped '
                            '(CryoSegNet: 0.94).')
        group.addParam('sizeFactor', params.FloatParam, default=0.2, label='Size tolerance',
                       help='Masks whose box differs from the most common box by more than this fraction are dropped.')
        self._defineComputeParams(form, gpu=True)

    def _diameterPx(self):
        if self.diameter.get():
            return self.diameter.get() / self.inputMicrographs.get().getSamplingRate()
        diameters = self.inputModel.get().getDiameters()
        return float(diameters[0]) if diameters else 100.0

    def _sam(self):
        return self.samCheckpoint.get() or Plugin.getVar(SAM_CHECKPOINT_VAR) or ''

    def _insertAllSteps(self):
        picks = [self._insertFunctionStep(self.pickStep, chunk, prerequisites=[], needsGPU=True)
                 for chunk in self._micChunks()]
        self._insertFunctionStep(self.createOutputStep, prerequisites=picks, needsGPU=False)

    def pickStep(self, names):
        args = self._micPaths(names) + ['--model', os.path.abspath(self.inputModel.get().getPath()),
                                        '--out', self._picksDir(), '--diameter', self._diameterPx(),
                                        '--points-per-side', self.pointsPerSide.get(), '--iou', self.iouFilter.get(),
                                        '--size-factor', self.sizeFactor.get(), '--save-maps'] + self._edgeArgs()
        sam = self._sam()
        if sam:
            args += ['--sam-checkpoint', os.path.abspath(sam)]
            if self.samType.get():
                args += ['--sam-type', SAM_TYPES[self.samType.get()]]
        else:
            args.append('--no-sam')
        if self.threshold.get() is not None:
            args += ['--threshold', self.threshold.get()]
        self._runCryopick('cryosegnet', args, gpu=True)

    def createOutputStep(self):
        self._registerPicks()
        self._defineSourceRelation(self.inputModel, getattr(self, OUT_COORDS2D))

    def _validate(self):
        errors = self._validateMicrographs() if self.diameter.get() else []
        model = self.inputModel.get()
        if model is not None and model.getMethod() != 'cryosegnet':
            errors.append(f'The model is a {model.getMethod()} model, not a CryoSegNet one.')
        sam = self._sam()
        if sam and not os.path.isfile(sam):
            errors.append(f'{sam}: Segment Anything checkpoint not found (expected a vit_b, vit_l or vit_h .pth)')
        mics = self.inputMicrographs.get()
        if model is not None and mics is not None and model.getSamplingRate() and mics.getSamplingRate() and \
                abs(model.getSamplingRate() - mics.getSamplingRate()) > 0.05 * model.getSamplingRate():
            errors.append(f'The model was trained at {model.getSamplingRate():g} Å/px, the micrographs are at '
                          f'{mics.getSamplingRate():g} Å/px.')
        return errors

    def _summary(self):
        lines = super()._summary()
        lines.append('Segment Anything: ' + (self._sam() or 'no checkpoint → U-Net-only picking'))
        return lines

    def _methods(self):
        return ['Particles were picked with CryoSegNet [Gyawali2024CryoSegNet] (attention U-Net and Segment '
                'Anything [Kirillov2023SAM]) in cryopick.']

    def _citations(self):
        return ['Gyawali2024CryoSegNet', 'Kirillov2023SAM']
