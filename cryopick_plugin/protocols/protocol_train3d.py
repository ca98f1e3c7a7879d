"""DeepETPicker training: 3D-ResUNet from weak label maps and the coordinates they were made from."""
import os

from pyworkflow.protocol import params
from tomo.protocols import ProtTomoBase

from .. import convert
from ..constants import OUT_MODEL
from ..engine.io import star
from ..objects import CryopickModel
from .protocol_base import CryopickProtocol
from .protocol_model_import import model_object

PRESETS = ['cpu', 'paper']


class CryopickTrain3D(CryopickProtocol, ProtTomoBase):
    """Train a 3D particle picker (DeepETPicker) from weak labels.

    Input: the label maps of the weak-label protocol and the coordinates they were made from (patch centres).
    Patches centred on particles (with jitter) plus some background patches are augmented (mirrors, 90°
    turns, small rotations and scaling) and learnt with soft Dice (+ cross-entropy), AdamW and a one-cycle
    schedule. Every few epochs the real picking runs on the validation tomograms (or a held-out slab of the
    first training tomogram) and the model with the best P·R^α/(P+R^α) score is kept; training stops when it
    no longer improves, and the picking thresholds are tuned on the validation data and stored with the
    model. Presets: cpu (narrow network, 48³ patches) and paper (widths 24/48/72/108, 72³ patches, for GPUs).
    """
    _label = '3D picking training (DeepETPicker)'
    _possibleOutputs = {OUT_MODEL: CryopickModel}

    def _defineParams(self, form):
        form.addSection(label='Input')
        form.addParam('inputLabels', params.PointerParam, pointerClass='SetOfTomoMasks', important=True,
                      label='Weak label maps', help='Output of the 3D weak labels protocol.')
        form.addParam('inputCoordinates', params.PointerParam, pointerClass='SetOfCoordinates3D', important=True,
                      label='Particle centres', help='The coordinates the label maps were made from (patches are '
                                                     'centred on them; groupId is the class).')
        form.addParam('validationTsIds', params.StringParam, default='', label='Validation tomograms (tsIds)',
                      help='Comma-separated tsIds kept out of training and used to choose the best epoch and the '
                           'thresholds. Empty: a slab of the first training tomogram is held out.')
        form.addParam('trainTsIds', params.StringParam, default='', label='Training tomograms (tsIds)',
                      expertLevel=params.LEVEL_ADVANCED,
                      help='Comma-separated tsIds to train on. Empty: every label map not used for validation. '
                           'Leave test tomograms out here to score the picker on data it never saw.')
        form.addSection(label='Training')
        form.addParam('preset', params.EnumParam, choices=PRESETS, default=0, label='Network size',
                      display=params.EnumParam.DISPLAY_HLIST,
                      help='cpu: widths 8/16/24/36, 48³ patches (about 11 GFLOP per patch, trains on a laptop; '
                           'on CPUs with native bf16 — AVX-512 BF16 or AMX — the plugin variable '
                           'CRYOPICK_PRECISION=auto trains it in bf16, about ten times faster). '
                           'paper: DeepETPicker\'s 24/48/72/108 with 72³ patches, for GPUs.')
        form.addParam('epochs', params.IntParam, default=30, label='Maximum epochs',
                      help='One epoch draws one patch per annotated particle. Training may stop earlier.')
        form.addParam('patience', params.IntParam, default=5, label='Patience (validations)',
                      help='Stop after this many validations without improvement.')
        form.addParam('valEvery', params.IntParam, default=2, label='Validate every (epochs)',
                      help='Score the validation data every this many epochs; the best-scoring model is kept.')
        form.addParam('timeBudget', params.FloatParam, allowsNull=True, default=None, label='Time budget (min)',
                      help='Stop training after this many minutes of wall clock and keep the best model so far; '
                           'the final validation and threshold tuning are fitted inside the budget. Empty: no '
                           'limit (the maximum epochs and the patience decide). The training state is saved '
                           'after every epoch, so a run that was killed resumes from its last epoch on Continue.')
        form.addParam('batchSize', params.IntParam, allowsNull=True, default=None, label='Batch size',
                      expertLevel=params.LEVEL_ADVANCED, help='Empty: the preset\'s.')
        form.addParam('learningRate', params.FloatParam, allowsNull=True, default=None, label='Peak learning rate',
                      expertLevel=params.LEVEL_ADVANCED, help='Empty: the preset\'s.')
        form.addParam('tune', params.BooleanParam, default=True, label='Tune thresholds on validation data',
                      help='Choose the segmentation and local-maximum thresholds that maximise the validation '
                           'score instead of DeepETPicker\'s fixed 0.5 / 0.1.')
        form.addParam('classBalance', params.BooleanParam, default=True, label='Class-balanced patches',
                      expertLevel=params.LEVEL_ADVANCED,
                      help='With several classes, draw training patches so that every class is seen equally '
                           'often (rare large complexes are otherwise swamped by abundant small ones). No: '
                           'one patch per particle per epoch, as DeepETPicker.')
        form.addParam('hardNegatives', params.FloatParam, default=0.0, label='Hard-negative share',
                      expertLevel=params.LEVEL_ADVANCED, validators=[params.Range(0, 1)],
                      help='Share of the background patches centred on unlabelled dense blobs (other '
                           'complexes, gold fiducials, membranes) found by difference of Gaussians, rather '
                           'than at random places. These objects, not empty ice, are where a picker trained '
                           'without them picks falsely. Only for fully annotated training tomograms: an '
                           'unannotated particle is such a blob and would be taught as background. 0.5 is a '
                           'good value for fully annotated tomograms. 0: all random, as '
                           'DeepETPicker.')
        form.addParam('seed', params.IntParam, default=0, label='Random seed', expertLevel=params.LEVEL_ADVANCED,
                      help='Seed of the random number generators (weights, sampling), so a run can be repeated.')
        self._defineComputeParams(form, gpu=True)

    # ------------------------------------------------------------------ steps
    def _tsIds(self):
        # iterItems reuses one object per row: read the ids first, then sort
        tsIds = sorted(m.getTsId() for m in self.inputLabels.get().iterItems())
        chosen = self._listed(self.trainTsIds) | self._listed(self.validationTsIds)
        return [ts for ts in tsIds if ts in chosen] if self._listed(self.trainTsIds) else tsIds

    @staticmethod
    def _listed(param):
        return {t.strip() for t in (param.get() or '').split(',') if t.strip()}

    def _insertAllSteps(self):
        self._insertFunctionStep(self.convertInputStep, self._tsIds(), needsGPU=False)
        self._insertFunctionStep(self.trainStep, self._tsIds(), needsGPU=True)
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    def _tomos(self):
        return convert.tomograms_by_name(self.inputCoordinates.get().getPrecedents())

    def convertInputStep(self, tsIds):
        df = convert.coordinates3d_to_frame(self.inputCoordinates.get())
        for tsId in tsIds:
            star.write_coordinates(self._tsPath(tsId, '_centres.star'),
                                   df[df[star.TOMO] == tsId].drop(columns=[star.TOMO]))

    def trainStep(self, tsIds):
        tomos = self._tomos()
        masks = {m.getTsId(): m.clone() for m in self.inputLabels.get().iterItems()}
        validation = {t.strip() for t in self.validationTsIds.get().split(',') if t.strip()}
        args = []
        for tsId in tsIds:
            item = f'{self._absFile(tomos[tsId])}:{self._absFile(masks[tsId])}:{self._tsPath(tsId, "_centres.star")}'
            args += ['--val' if tsId in validation else '--train', item]
        diameters = getattr(self.inputLabels.get(), '_cryopickDiameters', None)
        default, per_class = self._parseDiameters(diameters.get() if diameters is not None else '')
        if default:
            args += ['--diameter', default]
        if per_class:
            args += ['--diameter-per-class', per_class]
        shape = getattr(self.inputLabels.get(), '_cryopickLabelShape', None)
        if shape is not None and shape.get():
            args += ['--label-kind', shape.get()]
        args += ['--out', self._modelPath(), '--preset', PRESETS[self.preset.get()], '--epochs', self.epochs.get(),
                 '--patience', self.patience.get(), '--val-every', self.valEvery.get(), '--seed', self.seed.get()]
        if self.batchSize.get():
            args += ['--batch-size', self.batchSize.get()]
        if self.learningRate.get():
            args += ['--lr', self.learningRate.get()]
        if not self.tune.get():
            args.append('--no-tune')
        if not self.classBalance.get():
            args.append('--no-class-balance')
        args += ['--hard-fraction', self.hardNegatives.get()]
        if self.timeBudget.get():
            args += ['--time-budget', self.timeBudget.get()]
        self._runCryopick('train3d', args, gpu=True)

    @staticmethod
    def _parseDiameters(spec):
        default, per_class = None, []
        for item in (spec or '').split(','):
            if ':' not in item:
                continue
            key, value = item.split(':', 1)
            if key == 'default':
                default = value
            else:
                per_class.append(f'{key}:{value}')
        return default, ','.join(per_class)

    def _modelPath(self):
        return os.path.abspath(self._getExtraPath('deepetpicker_model.pt'))

    def createOutputStep(self):
        model = model_object(self._modelPath(), 'deepetpicker')
        model.setMethod('deepetpicker')
        info = model.getInfo()
        info['box_size'] = self.inputCoordinates.get().getBoxSize()
        model.setInfo(info)
        self._defineOutputs(**{OUT_MODEL: model})
        self._defineSourceRelation(self.inputLabels, model)
        self._defineSourceRelation(self.inputCoordinates, model)

    # ------------------------------------------------------------------ info
    def _validate(self):
        errors = []
        masks, coords = self.inputLabels.get(), self.inputCoordinates.get()
        if masks is None or coords is None:
            return errors
        tsIds = set(self._tsIds())
        if not tsIds:
            errors.append('The label set is empty.')
        have = set(coords.getUniqueValues('_tomoId')) if coords.getSize() else set()
        missing = sorted(tsIds - have)
        if missing:
            errors.append(f'No particle centres for the label maps of: {", ".join(missing)}.')
        validation = self._listed(self.validationTsIds)
        unknown = sorted(validation - tsIds)
        if unknown:
            errors.append(f'Validation tsIds not among the label maps: {", ".join(unknown)}.')
        all_maps = {m.getTsId() for m in masks.iterItems()}
        unknown = sorted(self._listed(self.trainTsIds) - all_maps)
        if unknown:
            errors.append(f'Training tsIds not among the label maps: {", ".join(unknown)}.')
        if validation and not tsIds - validation:
            errors.append('Keep at least one tomogram for training (every tomogram is listed for validation).')
        if self.timeBudget.get() is not None and not self.timeBudget.get() > 0:
            errors.append('The time budget must be a positive number of minutes (or empty for no limit).')
        srs = {round(m.getSamplingRate(), 3) for m in masks.iterItems()}
        if len(srs) > 1:
            errors.append(f'The label maps have different voxel sizes {sorted(srs)}: a model works at one voxel size.')
        return errors

    def _summary(self):
        if not self.hasAttribute(OUT_MODEL):
            return ['Model not trained yet.']
        meta = getattr(self, OUT_MODEL).getInfo().get('meta', {})
        hist = meta.get('history', {})
        lines = [f'Trained {hist.get("epochs", "?")} epochs, best epoch {meta.get("best_epoch", "?")}; '
                 f'thresholds {meta.get("thresholds", {})}.']
        if meta.get('stop_reason') == 'time budget':
            lines.append(f'Stopped by the time budget ({meta.get("time_budget_min")} min) after '
                         f'{meta.get("steps_run")} of {meta.get("steps_planned")} steps.')
        lines += [f'Warning: {w}' for w in meta.get('warnings', [])]
        return lines

    def _methods(self):
        return ['A 3D residual U-Net was trained from weak labels as in DeepETPicker [Liu2024DeepETPicker] '
                '(cryopick implementation).']

    def _citations(self):
        return ['Liu2024DeepETPicker']
