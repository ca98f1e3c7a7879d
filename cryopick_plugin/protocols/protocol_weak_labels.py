"""DeepETPicker weak labels: particle centres → label maps a 3D segmentation network learns from."""

from pyworkflow.object import String
from pyworkflow.protocol import params
from tomo.objects import SetOfTomoMasks, TomoMask
from tomo.protocols import ProtTomoBase

from .. import convert
from ..constants import OUT_TOMOMASKS
from ..engine.io import star
from .protocol_base import CryopickProtocol

LABEL_SHAPES = ['tball', 'ball', 'cube']


class CryopickWeakLabels(CryopickProtocol, ProtTomoBase):
    """Weak labels for 3D picking (DeepETPicker).

    Turns particle centres (any SetOfCoordinates3D: manual picks, DoG candidates, a DISCA class) into one
    label map per tomogram: around every centre a small mask (truncated ball by default, as in DeepETPicker;
    ball or cube) filled with the particle's class (groupId), background 0. These maps, with the same
    coordinates, train the 3D picker. Every coordinate set reaches training through this protocol.
    """
    _label = '3D weak labels (DeepETPicker)'
    _possibleOutputs = {OUT_TOMOMASKS: SetOfTomoMasks}

    def _defineParams(self, form):
        form.addSection(label='Input')
        form.addParam('inputTomograms', params.PointerParam, pointerClass='SetOfTomograms', important=True,
                      label='Tomograms', help='Tomograms the coordinates were picked on.')
        form.addParam('inputCoordinates', params.PointerParam, pointerClass='SetOfCoordinates3D',
                      important=True, label='Particle centres',
                      help='Coordinates whose groupId is the class (1, 2, ...). Only tomograms with coordinates '
                           'get a label map.')
        form.addParam('labelShape', params.EnumParam, choices=LABEL_SHAPES, default=0,
                      display=params.EnumParam.DISPLAY_HLIST, label='Label shape',
                      help='tball: ball of radius √2·r clipped to the (2r+1)³ cube (DeepETPicker\'s default, '
                           '"TBall"); ball: radius r; cube: the whole (2r+1)³ cube. r = diameter/2.')
        form.addParam('diameter', params.IntParam, default=11, label='Label diameter (voxels)',
                      help='Diameter of the label around each centre, in voxels of the tomograms. DeepETPicker '
                           'uses labels smaller than the particle (e.g. 11 voxels for ribosomes at ~14 Å): the '
                           'label marks the centre region, not the whole particle. About half the particle '
                           'diameter worked best on simulated tomograms (0.7 of it was worse for every class). '
                           'Odd values keep it centred.')
        form.addParam('classDiameters', params.StringParam, default='', label='Per-class diameters (optional)',
                      help='Override per class as "class:diameter" pairs, e.g. "1:13, 2:7".')

    # ------------------------------------------------------------------ steps
    def _insertAllSteps(self):
        tsIds = self._tsIdsWithCoordinates()
        self._insertFunctionStep(self.convertInputStep, tsIds, needsGPU=False)
        for tsId in tsIds:
            self._insertFunctionStep(self.labelStep, tsId, needsGPU=False)
        self._insertFunctionStep(self.createOutputStep, tsIds, needsGPU=False)

    def _tsIdsWithCoordinates(self):
        tomos = convert.tomograms_by_name(self.inputTomograms.get())
        coords = self.inputCoordinates.get()
        if not coords.getSize():
            return []  # an empty set may have no table to query
        present = set(coords.getUniqueValues('_tomoId'))
        return [ts for ts in tomos if ts in present]

    def convertInputStep(self, tsIds):
        coords = self.inputCoordinates.get()
        df = convert.coordinates3d_to_frame(coords, self.inputTomograms.get())
        for tsId in tsIds:
            # One file per tomogram; without rlnTomoName the engine takes every row for the tomogram it is
            # given, whatever the tomogram's file is called.
            rows = df[df[star.TOMO] == tsId].drop(columns=[star.TOMO])
            star.write_coordinates(self._tsPath(tsId, '_centres.star'), rows)

    def labelStep(self, tsId):
        args = [self._tomogramFile(tsId), self._tsPath(tsId, '_centres.star'),
                '--diameter', self.diameter.get(), '--shape', LABEL_SHAPES[self.labelShape.get()],
                '--out', self._tsPath(tsId, '_labels.mrc')]
        if self.classDiameters.get():
            args += ['--diameter-per-class', self.classDiameters.get().replace(' ', '')]
        self._runCryopick('labels', args)

    def createOutputStep(self, tsIds):
        tomos = convert.tomograms_by_name(self.inputTomograms.get())
        masks = self._createSet(SetOfTomoMasks, 'tomomasks%s.sqlite', '')
        masks.copyInfo(self.inputTomograms.get())
        for tsId in tsIds:
            mask = TomoMask()
            mask.copyInfo(tomos[tsId])
            mask.setLocation(self._tsPath(tsId, '_labels.mrc'))
            mask.setVolName(tomos[tsId].getFileName())
            mask.setTsId(tsId)
            masks.append(mask)
        masks._cryopickLabelShape = String(LABEL_SHAPES[self.labelShape.get()])
        masks._cryopickDiameters = String(self._diameterSpec())
        self._defineOutputs(**{OUT_TOMOMASKS: masks})
        self._defineSourceRelation(self.inputTomograms, masks)
        self._defineSourceRelation(self.inputCoordinates, masks)

    def _diameterSpec(self):
        spec = f'default:{self.diameter.get()}'
        if self.classDiameters.get():
            spec += ',' + self.classDiameters.get().replace(' ', '')
        return spec

    # ------------------------------------------------------------------ info
    def _validate(self):
        errors = []
        tomos = self.inputTomograms.get()
        coords = self.inputCoordinates.get()
        if tomos is None or coords is None:
            return errors
        if tomos.getSize() == 0:
            errors.append('The tomogram set is empty.')
        if coords.getSize() == 0:
            errors.append('The coordinate set is empty.')
        elif not self._tsIdsWithCoordinates():
            errors.append('No coordinate refers to any of the input tomograms (coordinates are linked to '
                          'tomograms by tsId).')
        if coords.getSamplingRate() and tomos.getSamplingRate() and \
                abs(coords.getSamplingRate() - tomos.getSamplingRate()) > 0.01 * tomos.getSamplingRate():
            errors.append(f'The coordinates are at {coords.getSamplingRate():g} Å/px but the tomograms at '
                          f'{tomos.getSamplingRate():g} Å/px: pick or import them on these tomograms.')
        if self.diameter.get() is None or self.diameter.get() < 1:
            errors.append('The label diameter must be at least 1 voxel.')
        if self.classDiameters.get():
            try:
                for pair in self.classDiameters.get().replace(' ', '').split(','):
                    cls_, dia = pair.split(':')
                    int(cls_), int(dia)
            except ValueError:
                errors.append('Per-class diameters must look like "1:13, 2:7".')
        return errors

    def _summary(self):
        if not self.hasAttribute(OUT_TOMOMASKS):
            return ['Label maps not ready yet.']
        return [f'{getattr(self, OUT_TOMOMASKS).getSize()} label maps, shape '
                f'{LABEL_SHAPES[self.labelShape.get()]}, diameter {self._diameterSpec()} voxels.']

    def _methods(self):
        return [f'Weak labels ({LABEL_SHAPES[self.labelShape.get()]}, diameter {self.diameter.get()} voxels) '
                f'were generated from particle centres as in DeepETPicker [Liu2024DeepETPicker].']

    def _citations(self):
        return ['Liu2024DeepETPicker']
