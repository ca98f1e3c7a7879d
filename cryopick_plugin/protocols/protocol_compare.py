"""Compare two coordinate sets (2D or 3D): matching statistics and the intersection / difference sets."""
import os

from pyworkflow.protocol import params
from tomo.objects import SetOfCoordinates3D
from tomo.protocols import ProtTomoBase

from .. import convert
from ..engine.io import star
from .protocol_base import CryopickProtocol

OUT_BOTH, OUT_ONLY_A, OUT_ONLY_B = 'intersection', 'onlyA', 'onlyB'


class CryopickCompareCoordinates(CryopickProtocol, ProtTomoBase):
    """Compare two pickers' coordinates (DeepETPicker's comparison of pickers).

    Particles of A and B are matched one to one (Hungarian assignment) within the radius, per tomogram (tsId)
    or micrograph. Outputs: the picks of A that B also found (intersection), those only in A, and those only
    in B, as coordinate sets of the inputs' type; the summary gives precision, recall and F1 of A against B,
    the mean distance of matched pairs and the Jaccard index.
    """
    _label = 'compare coordinates'
    _possibleOutputs = {OUT_BOTH: SetOfCoordinates3D, OUT_ONLY_A: SetOfCoordinates3D, OUT_ONLY_B: SetOfCoordinates3D}

    def _defineParams(self, form):
        form.addSection(label='Input')
        form.addParam('inputCoordinatesA', params.PointerParam, pointerClass='SetOfCoordinates3D,SetOfCoordinates',
                      important=True, label='Coordinates A', help='E.g. the picks to assess.')
        form.addParam('inputCoordinatesB', params.PointerParam, pointerClass='SetOfCoordinates3D,SetOfCoordinates',
                      important=True, label='Coordinates B', help='E.g. the reference picks. Same kind (2D or 3D) '
                                                                  'and the same tomograms / micrographs as A.')
        form.addParam('radius', params.FloatParam, default=5.0, label='Matching radius (px)',
                      help='Two picks match when closer than this, in pixels (voxels) of A\'s micrographs '
                           '(tomograms). Half the particle radius is a strict choice, the radius a lenient one.')

    def _is3D(self):
        return isinstance(self.inputCoordinatesA.get(), SetOfCoordinates3D)

    def _insertAllSteps(self):
        self._insertFunctionStep(self.convertInputStep, needsGPU=False)
        self._insertFunctionStep(self.compareStep, needsGPU=False)
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    def convertInputStep(self):
        a, b = self.inputCoordinatesA.get(), self.inputCoordinatesB.get()
        if self._is3D():
            df_a = convert.coordinates3d_to_frame(a, with_ids=True)
            # B in voxels of A's tomograms, whatever B's own sampling rate
            df_b = convert.coordinates3d_to_frame(b, with_ids=True, sampling_rate=a.getSamplingRate())
        else:
            df_a = convert.coordinates2d_to_frame(a, with_ids=True)
            df_b = convert.coordinates2d_to_frame(b, with_ids=True)
        star.write_coordinates(self._getExtraPath('a.star'), df_a)
        star.write_coordinates(self._getExtraPath('b.star'), df_b)

    def compareStep(self):
        self._runCryopick('evaluate', [os.path.abspath(self._getExtraPath('a.star')),
                                       os.path.abspath(self._getExtraPath('b.star')),
                                       '--radius', self.radius.get(),
                                       '--json', os.path.abspath(self._getExtraPath('metrics.json')),
                                       '--out-prefix', os.path.abspath(self._getExtraPath('cmp'))])

    def _ids(self, suffix):
        df = star.read_star_blocks(self._getExtraPath(f'cmp_{suffix}.star'))
        table = next(iter(df.values()))
        return set(table[convert.ID].astype(int)) if hasattr(table, 'columns') and convert.ID in table.columns \
            else set()

    def _subset(self, source, ids, suffix):
        if self._is3D():
            out = self._createSetOfCoordinates3D(source.getPrecedents(), suffix=suffix)
            out.setSamplingRate(source.getSamplingRate())
        else:
            out = self._createSetOfCoordinates(source.getMicrographs(), suffix=suffix)
        out.setBoxSize(source.getBoxSize())
        out.copyItems(source, itemSelectedCallback=lambda item: item.getObjId() in ids)
        return out

    def createOutputStep(self):
        a, b = self.inputCoordinatesA.get(), self.inputCoordinatesB.get()
        outputs = {OUT_BOTH: self._subset(a, self._ids('intersection'), 'Intersection'),
                   OUT_ONLY_A: self._subset(a, self._ids('only_picks'), 'OnlyA'),
                   OUT_ONLY_B: self._subset(b, self._ids('only_truth'), 'OnlyB')}
        self._defineOutputs(**outputs)
        for output in outputs.values():
            self._defineSourceRelation(self.inputCoordinatesA, output)
            self._defineSourceRelation(self.inputCoordinatesB, output)

    def _validate(self):
        a, b = self.inputCoordinatesA.get(), self.inputCoordinatesB.get()
        errors = []
        if a is None or b is None:
            return errors
        if isinstance(a, SetOfCoordinates3D) != isinstance(b, SetOfCoordinates3D):
            errors.append('Compare 2D coordinates with 2D coordinates and 3D with 3D.')
        if a.getSize() == 0 or b.getSize() == 0:
            errors.append('Both coordinate sets must hold coordinates.')
        if not self.radius.get() or self.radius.get() <= 0:
            errors.append('The matching radius must be positive.')
        return errors

    def metrics(self):
        path = self._getExtraPath('metrics.json')
        return self._readJson(path) if os.path.exists(path) else None

    def _summary(self):
        m = self.metrics()
        if not m:
            return ['Comparison not ready yet.']
        loc = m['localisation']

        def fmt(value, spec):
            # precision has no value without picks, the mean distance none without matches
            return '–' if value is None else format(value, spec)
        return [f"A: {loc['n_pred']} picks, B: {loc['n_true']} picks, matched within {self.radius.get():g} px: "
                f"{loc['tp']} (only A: {loc['fp']}, only B: {loc['fn']}).",
                f"A against B: precision {fmt(loc['precision'], '.3f')}, recall {fmt(loc['recall'], '.3f')}, "
                f"F1 {fmt(loc['f1'], '.3f')}, mean distance {fmt(loc['mean_distance'], '.2f')} px."]

    def _methods(self):
        return ['Coordinate sets were compared with one-to-one (Hungarian) matching in cryopick.']
