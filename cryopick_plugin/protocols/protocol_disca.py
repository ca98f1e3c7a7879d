"""DISCA: unsupervised, template-free clustering of subtomograms, and prediction with a trained DISCA model."""
import os

from pyworkflow.object import String
from pyworkflow.protocol import params
from tomo.objects import AverageSubTomogram, Coordinate3D, SetOfClassesSubTomograms, SetOfCoordinates3D
from tomo.protocols import ProtTomoBase
from tomo import constants as tconst

from .. import convert
from ..constants import OUT_CLASSES, OUT_COORDS3D, OUT_MODEL
from ..engine.io import star
from ..objects import CryopickModel
from .protocol_base import CryopickProtocol
from .protocol_model_import import model_object

PRESETS = ['cpu', 'paper']


class _ClassesOutputMixin:
    """Turn an engine labels.star (one row per input subtomogram, in input order) into Scipion outputs."""

    def _writeSubtomoStar(self, path):
        df = convert.subtomograms_to_frame(self.inputSubtomograms.get())
        star.write_star(path, {'particles': df})

    def _readLabels(self, path):
        blocks = star.read_star_blocks(path)
        table = next(b for b in blocks.values() if hasattr(b, 'columns') and star.CLASS in b.columns)
        ids = table['cpSubtomoId'].astype(int).to_numpy()
        return dict(zip(ids, table[star.CLASS].astype(int))), dict(zip(ids, table[star.SCORE].astype(float)))

    def _createClassOutputs(self, labels_path, averages=None):
        subtomos = self.inputSubtomograms.get()
        labels, probs = self._readLabels(labels_path)
        classes = self._createSetOfClassesSubTomograms(subtomos)

        def update_item(item, row=None):
            item.setClassId(int(labels[item.getObjId()]))

        def update_class(cls):
            ref = cls.getObjId()
            if averages and ref in averages:
                rep = AverageSubTomogram()
                rep.setLocation(averages[ref])
                rep.setSamplingRate(subtomos.getSamplingRate())
                cls.setRepresentative(rep)
            cls._cryopickAverage = String('unaligned average of randomly oriented members (a summary, not a '
                                          'structure: align and average the class in RELION/Dynamo/emantomo)')

        classes.classifyItems(updateItemCallback=update_item, updateClassCallback=update_class)
        outputs = {OUT_CLASSES: classes}
        coords = self._clusterCoordinates(subtomos, labels, probs)
        if coords is not None:
            outputs[OUT_COORDS3D] = coords
        return outputs

    def _clusterCoordinates(self, subtomos, labels, probs):
        """The subtomograms' coordinates with groupId = cluster and score = membership probability."""
        source = subtomos.getCoordinates3D() if subtomos.hasCoordinates3D() else None
        if source is None:
            return None
        tomograms = source.getPrecedents()
        tomos = convert.tomograms_by_name(tomograms)
        coords = self._createSetOfCoordinates3D(tomograms, suffix='Clusters')
        coords.setSamplingRate(source.getSamplingRate())
        coords.setBoxSize(source.getBoxSize())
        for subtomo in subtomos.iterItems(orderBy='id'):
            old = subtomo.getCoordinate3D()
            if old is None or old.getTomoId() not in tomos:
                continue
            coord = Coordinate3D()
            coord.setVolume(tomos[old.getTomoId()])
            # Stored (Scipion-convention) positions are copied as they are: same tomogram, same origin.
            coord.setPosition(old._x.get(), old._y.get(), old._z.get(), tconst.SCIPION)
            coord.setGroupId(int(labels[subtomo.getObjId()]))
            coord.setScore(float(probs[subtomo.getObjId()]))
            coords.append(coord)
        return coords


class CryopickDisca(_ClassesOutputMixin, CryopickProtocol, ProtTomoBase):
    """Cluster subtomograms without templates or labels (DISCA).

    A YOPO network (unpadded 3D convolutions with global max pooling, so features ignore where the
    particle sits in the box) is trained on the clusters it finds itself: features → PCA → Gaussian mixtures
    for each candidate number of clusters K, the lowest BIC wins; labels are aligned between iterations and
    the network learns them with label smoothing on randomly rotated copies. The iteration with the best
    Davies–Bouldin-type index (DDBI) is kept. Outputs: the classes (with plain, unaligned class averages —
    the members are randomly oriented, so these are summaries, not structures), the coordinates with
    groupId = cluster (ready for weak labels → 3D picking training, or for RELION/Dynamo/emantomo
    alignment and averaging of a chosen class), and the trained model for DISCA predict.
    """
    _label = 'DISCA clustering'
    _possibleOutputs = {OUT_CLASSES: SetOfClassesSubTomograms, OUT_COORDS3D: SetOfCoordinates3D,
                        OUT_MODEL: CryopickModel}

    def _defineParams(self, form):
        form.addSection(label='Input')
        form.addParam('inputSubtomograms', params.PointerParam, pointerClass='SetOfSubTomograms', important=True,
                      label='Subtomograms', help='Subtomograms of one box size, e.g. from DoG candidates. A box '
                                                 'of 24–32 voxels holding the particle with a little margin '
                                                 'works best; bin larger boxes when extracting.')
        form.addParam('preset', params.EnumParam, choices=PRESETS, default=0, label='Network size',
                      display=params.EnumParam.DISPLAY_HLIST,
                      help='cpu: a quarter of the paper\'s width, boxes binned to 24³ (clusters 1,000 subtomograms '
                           'in under an hour on 2 cores); it starts from rotation-invariant features of the '
                           'subtomograms and keeps them beside the network\'s features in every clustering. '
                           'paper: the published width and the reference\'s start and clustering (network '
                           'features only), for GPUs.')
        line = form.addLine('Number of clusters K', help='Candidate K values; the BIC chooses among them. The '
                                                         'largest is lowered to N/10 for small sets.')
        line.addParam('kMin', params.IntParam, default=2, label='from', help='Smallest number of clusters tried.')
        line.addParam('kMax', params.IntParam, default=20, label='to', help='Largest number of clusters tried.')
        form.addParam('maxIter', params.IntParam, allowsNull=True, default=None, label='Maximum iterations',
                      help='Empty: the preset\'s default. Stops earlier when the labels are stable.')
        form.addParam('wedgeTilt', params.FloatParam, allowsNull=True, default=None,
                      label='Missing wedge: largest tilt (°)',
                      help='Empty (default): the tilt range of the subtomograms\' acquisition (or of their '
                           'tomograms\'), as the summary shows before the run; where none is recorded, the wedge '
                           'the subtomograms\' mean power spectrum shows (the log says which). A number: the '
                           'largest tilt angle (60 for a ±60° series; tilt axis Y). 0: ignore the wedge. At high '
                           'SNR the missing wedge can split one molecule into "top" and "side" view clusters. '
                           'With the wedge known, after clustering the members of each cluster are shown rotated '
                           '(wedge put back) to the final model: two clusters whose rotated members cross into '
                           'each other, both ways, clearly more than half-turned copies do, or that exchange at '
                           'least half of their rotated copies, are one molecule and are merged (when the pair '
                           'keeps its copies rather than scattering them over clusters that scatter theirs back) '
                           '— unless their union falls into two clearly separated groups of '
                           'rotation-invariant spectral features (noisy mixtures of different molecules), which '
                           'stay apart. A cluster whose rotated members mostly leave it (the network knows it '
                           'only in the orientations its members have) joins the cluster nearest to it on '
                           'spectral features, when their spectral groups fold under rotation. '
                           'The network that judges each split of the split check is retrained '
                           'with the wedge on its rotated copies, so that it cannot learn one molecule\'s '
                           'orientations as two classes. The checks are recorded in the model.')
        form.addParam('splitCheck', params.BooleanParam, default=True, label='Split merged molecules',
                      expertLevel=params.LEVEL_ADVANCED,
                      help='After clustering, test every cluster for two molecules that the network has learnt '
                           'to call one (at low SNR the self-training can entrench such a merge): a cluster '
                           'whose members fall into two clearly separated groups of rotation-invariant '
                           'spectral features (BIC and a Mahalanobis separation of at least 3) is split, '
                           'recursively; pieces of one molecule that splits of different clusters left apart '
                           'are joined again. A split must then be supported by the network (see the refinement '
                           'below). At the end, members of a cluster that form a small separate group (fewer '
                           'than a cluster may hold) move to the cluster their spectral features fit. Each test '
                           'is recorded in the model, and predictions replay them. Most useful on noisy data, '
                           'where clusters of two molecules are commonest.')
        form.addParam('refineIter', params.IntParam, allowsNull=True, default=None,
                      label='Refinement iterations after a split', expertLevel=params.LEVEL_ADVANCED,
                      condition='splitCheck',
                      help='When the split check changed the clusters, the network (which had learnt to '
                           'call the split molecules one class) is trained on the corrected clusters and the '
                           'EM loop runs again from them for at most this many iterations. A split whose two '
                           'sides no refined clustering keeps apart is rejected (not supported by the network\'s '
                           'features: one molecule seen in two orientations to the missing wedge) and not '
                           'made again, unless its sides stay apart when every member is turned with the '
                           'missing wedge put back (two molecules the network had too few examples of); the refined clustering is kept when its DDBI is lower, and checked again. '
                           'It costs three training epochs and up to this many more iterations. Empty: the '
                           'preset\'s default (5). 0: keep the split clusters as they are, unchecked by the '
                           'network.')
        form.addParam('alignRefine', params.BooleanParam, default=True, label='Refine clusters by alignment',
                      help='After clustering, refine the clusters by multi-reference alignment with the missing '
                           'wedge, as subtomogram averaging does: each cluster gets a reference grown from its '
                           'members (their orientations found by alignment), is tested on held-out members for '
                           'two molecules and split when it holds them, then every subtomogram is classified '
                           'against all references. At very low SNR with a strong wedge, where the network\'s '
                           'features mix molecules, this recovers them; the class averages become aligned, '
                           'wedge-compensated averages, and the DISCA model output predicts these classes. About '
                           '6 minutes per 1 000 subtomograms on one CPU core. No: the network\'s clusters as they '
                           'are.')
        form.addParam('seed', params.IntParam, default=0, label='Random seed', expertLevel=params.LEVEL_ADVANCED,
                      help='Seed of the random number generators (weights, sampling), so a run can be repeated.')
        self._defineComputeParams(form, gpu=True)

    def _insertAllSteps(self):
        self._insertFunctionStep(self.convertInputStep, needsGPU=False)
        self._insertFunctionStep(self.clusterStep, needsGPU=True)
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    def convertInputStep(self):
        path = self._getExtraPath('subtomograms.star')
        self._writeSubtomoStar(path)
        known = convert.subtomograms_tilt_range(self.inputSubtomograms.get())
        if known is not None and self.wedgeTilt.get() is None:
            # the acquisition travels with the subtomograms, where `cryopick disca` reads it
            from ..engine.disca.features import TILT_MAX_COLUMN, TILT_MIN_COLUMN
            blocks = star.read_star_blocks(path)
            table = blocks['particles']
            table[TILT_MIN_COLUMN], table[TILT_MAX_COLUMN] = known[0], known[1]
            star.write_star(path, {'particles': table})

    def _wedgeSource(self):
        """One line: the missing wedge the run uses and where it comes from."""
        if self.wedgeTilt.get() is not None:
            tilt = self.wedgeTilt.get()
            return 'Missing wedge: ignored (0).' if tilt == 0 else f'Missing wedge: ±{tilt:g}° (given).'
        subtomos = self.inputSubtomograms.get()
        known = convert.subtomograms_tilt_range(subtomos) if subtomos is not None else None
        if known is None:
            return ('Missing wedge: no tilt range in the acquisition; read from the subtomograms\' power '
                    'spectrum (see the log).')
        lo, hi = known[:2]
        return f'Missing wedge: ±{(hi - lo) / 2:g}° from the {known[2]}\' acquisition ({lo:g}…{hi:g}°).'

    def clusterStep(self):
        args = [os.path.abspath(self._getExtraPath('subtomograms.star')), '--out',
                os.path.abspath(self._getExtraPath('disca')), '--preset', PRESETS[self.preset.get()],
                '--k-min', self.kMin.get(), '--k-max', self.kMax.get(), '--seed', self.seed.get()]
        if self.maxIter.get():
            args += ['--max-iter', self.maxIter.get()]
        if self.wedgeTilt.get() is not None:
            args += ['--wedge-tilt', self.wedgeTilt.get()]
        if not self.splitCheck.get():
            args += ['--no-split-check']
        elif self.refineIter.get() is not None:
            args += ['--refine-iter', self.refineIter.get()]
        args += ['--align-refine' if self.alignRefine.get() else '--no-align-refine']
        self._runCryopick('disca', args, gpu=True)

    def createOutputStep(self):
        out = self._getExtraPath('disca')
        history = self._readJson(os.path.join(out, 'history.json'))
        averages = {a['class']: os.path.abspath(os.path.join(out, a['file']))
                    for a in history.get('class_averages', [])}
        outputs = self._createClassOutputs(os.path.join(out, 'labels.star'), averages)
        model = model_object(os.path.abspath(os.path.join(out, 'disca_model.pt')), 'disca')
        model.setNumClasses(int(history['k']))
        outputs[OUT_MODEL] = model
        self._defineOutputs(**outputs)
        for output in outputs.values():
            self._defineSourceRelation(self.inputSubtomograms, output)

    def _validate(self):
        errors = []
        subtomos = self.inputSubtomograms.get()
        if self.kMin.get() < 1 or self.kMax.get() < self.kMin.get():
            errors.append('The K range must satisfy 1 ≤ from ≤ to.')
        if self.wedgeTilt.get() is not None and not 0 <= self.wedgeTilt.get() < 90:
            errors.append(f'The largest tilt must be between 0 and 90°, not {self.wedgeTilt.get():g}.')
        if self.refineIter.get() is not None and self.refineIter.get() < 0:
            errors.append(f'The refinement iterations must be 0 or more, not {self.refineIter.get()}.')
        if subtomos is not None:
            n = subtomos.getSize()
            if n < 10 * max(2, self.kMin.get()):
                errors.append(f'{n} subtomograms are too few: DISCA needs at least 10 per cluster of the '
                              f'smallest K ({self.kMin.get()}).')
            dims = {s.getDim() for s in subtomos.iterItems(limit=200)}
            if len(dims) > 1:
                errors.append(f'The subtomograms have different box sizes ({sorted(dims)}): extract them with '
                              f'one box.')
        return errors

    def _summary(self):
        wedge = self._wedgeSource()
        if not self.hasAttribute(OUT_CLASSES):
            return ['Clustering not ready yet.', wedge]
        classes = getattr(self, OUT_CLASSES)
        sizes = [c.getSize() for c in classes.iterItems()]
        if self.alignRefine.get():
            return [f'{len(sizes)} classes after alignment refinement of the network\'s clusters (K chosen by BIC '
                    f'among {self.kMin.get()}–{self.kMax.get()}, then split where held-out members showed two '
                    f'molecules), sizes {sizes}. Class averages are aligned and wedge-compensated.', wedge]
        return [f'{len(sizes)} clusters (K chosen by BIC among {self.kMin.get()}–{self.kMax.get()}), sizes '
                f'{sizes}. Class averages are unaligned summaries.', wedge]

    def _methods(self):
        return ['Subtomograms were clustered without templates with DISCA [Zeng2023DISCA] as implemented in '
                'cryopick.']

    def _citations(self):
        return ['Zeng2023DISCA']


class CryopickDiscaPredict(_ClassesOutputMixin, CryopickProtocol, ProtTomoBase):
    """Assign subtomograms to the clusters of a trained DISCA model."""
    _label = 'DISCA predict'
    _possibleOutputs = {OUT_CLASSES: SetOfClassesSubTomograms, OUT_COORDS3D: SetOfCoordinates3D}

    def _defineParams(self, form):
        form.addSection(label='Input')
        form.addParam('inputSubtomograms', params.PointerParam, pointerClass='SetOfSubTomograms', important=True,
                      label='Subtomograms', help='Extracted like the ones the model was trained on (same box, '
                                                 'binning and voxel size).')
        form.addParam('inputModel', params.PointerParam, pointerClass='CryopickModel', important=True,
                      label='DISCA model', help='From a DISCA clustering run or the model import protocol.')
        self._defineComputeParams(form, gpu=True)

    def _insertAllSteps(self):
        self._insertFunctionStep(self.convertInputStep, needsGPU=False)
        self._insertFunctionStep(self.predictStep, needsGPU=True)
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    def convertInputStep(self):
        self._writeSubtomoStar(self._getExtraPath('subtomograms.star'))

    def predictStep(self):
        self._runCryopick('disca-predict', [os.path.abspath(self._getExtraPath('subtomograms.star')),
                                            '--model', os.path.abspath(self.inputModel.get().getPath()),
                                            '--out', os.path.abspath(self._getExtraPath('labels.star'))], gpu=True)

    def createOutputStep(self):
        outputs = self._createClassOutputs(self._getExtraPath('labels.star'))
        self._defineOutputs(**outputs)
        for output in outputs.values():
            self._defineSourceRelation(self.inputSubtomograms, output)
            self._defineSourceRelation(self.inputModel, output)

    def _validate(self):
        errors = []
        model = self.inputModel.get()
        if model is not None and model.getMethod() != 'disca':
            errors.append(f'The model is a {model.getMethod()} model; DISCA predict needs a DISCA model.')
        subtomos = self.inputSubtomograms.get()
        if model is not None and subtomos is not None and model.getSamplingRate() and \
                abs(model.getSamplingRate() - subtomos.getSamplingRate()) > 0.01 * model.getSamplingRate():
            errors.append(f'The model was trained on subtomograms at {model.getSamplingRate():g} Å/voxel, these '
                          f'are at {subtomos.getSamplingRate():g} Å/voxel.')
        return errors

    def _summary(self):
        if not self.hasAttribute(OUT_CLASSES):
            return ['Prediction not ready yet.']
        return [f'{getattr(self, OUT_CLASSES).getSize()} classes assigned.']

    def _methods(self):
        return ['Subtomograms were assigned to the clusters of a trained DISCA model [Zeng2023DISCA] '
                '(cryopick).']

    def _citations(self):
        return ['Zeng2023DISCA']
