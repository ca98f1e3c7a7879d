"""Subtomogram extraction at 3D coordinates."""
import os

import pandas as pd
from pyworkflow.protocol import params
from tomo.objects import SetOfSubTomograms
from tomo.protocols import ProtTomoBase

from .. import convert
from ..constants import OUT_SUBTOMOS
from ..engine.io import star
from .protocol_base import CryopickProtocol


class CryopickExtractSubtomograms(CryopickProtocol, ProtTomoBase):
    """Extract subtomograms (one MRC each) around 3D coordinates.

    Boxes are centred on the coordinates (centre voxel at index box//2, RELION's convention); boxes that
    would leave the tomogram are skipped and counted in the summary. Optional Fourier-cropping binning and
    per-subtomogram normalisation. Each subtomogram keeps its coordinate (tsId, class, score), so downstream
    classification and averaging can go back to the tomograms.
    """
    _label = 'extract subtomograms'
    _possibleOutputs = {OUT_SUBTOMOS: SetOfSubTomograms}
    stepsExecutionMode = params.STEPS_PARALLEL

    def _defineParams(self, form):
        form.addSection(label='Input')
        form.addParam('inputCoordinates', params.PointerParam, pointerClass='SetOfCoordinates3D', important=True,
                      label='Coordinates', help='Where to extract; their tomograms are the coordinates\' own.')
        form.addParam('inputTomograms', params.PointerParam, pointerClass='SetOfTomograms', allowsNull=True,
                      label='Tomograms (optional)',
                      help='Extract from these tomograms instead (e.g. a denoised or unbinned version); they '
                           'must have the same tsIds. Coordinates are rescaled to their sampling rate.')
        form.addParam('boxSize', params.IntParam, allowsNull=True, default=None, label='Box size (voxels)',
                      help='Edge of the extracted box in voxels of the tomograms. Empty: the coordinates\' box size.')
        form.addParam('binning', params.IntParam, default=1, label='Binning',
                      help='Down-sample the boxes by this factor (Fourier cropping); the box must be a multiple.')
        form.addParam('normalise', params.BooleanParam, default=True, label='Normalise',
                      help='Zero mean and unit standard deviation per subtomogram.')
        form.addParam('invert', params.BooleanParam, default=False, label='Invert contrast',
                      help='Make dark particles bright.')
        self._defineComputeParams(form, gpu=False)

    def _tomograms(self):
        return self.inputTomograms.get() or self.inputCoordinates.get().getPrecedents()

    def _box(self):
        coords = self.inputCoordinates.get()  # None in a new form
        return int(self.boxSize.get() or (coords.getBoxSize() if coords is not None else 0) or 0)

    def _insertAllSteps(self):
        tsIds = sorted(set(self.inputCoordinates.get().getUniqueValues('_tomoId')) &
                       set(convert.tomograms_by_name(self._tomograms())))
        convert_step = self._insertFunctionStep(self.convertInputStep, tsIds, needsGPU=False)
        steps = [self._insertFunctionStep(self.extractStep, tsId, prerequisites=[convert_step], needsGPU=False)
                 for tsId in tsIds]
        self._insertFunctionStep(self.createOutputStep, tsIds, prerequisites=steps, needsGPU=False)

    def convertInputStep(self, tsIds):
        coords = self.inputCoordinates.get()
        tomos = self._tomograms()
        df = convert.coordinates3d_to_frame(coords, coords.getPrecedents(), sampling_rate=tomos.getSamplingRate())
        for tsId in tsIds:
            star.write_coordinates(self._tsPath(tsId, '_coords.star'), df[df[star.TOMO] == tsId])

    def extractStep(self, tsId):
        args = [self._tomogramFile(tsId, self._tomograms), self._tsPath(tsId, '_coords.star'), '--box', self._box(),
                '--binning', self.binning.get(), '--prefix', tsId, '--out', self._tsPath(tsId, '')]
        if not self.normalise.get():
            args.append('--no-normalise')
        if self.invert.get():
            args.append('--invert')
        self._runCryopick('extract', args)

    def createOutputStep(self, tsIds):
        tomos = self._tomograms()
        subtomos = self._createSetOfSubTomograms()
        subtomos.setSamplingRate(tomos.getSamplingRate() * self.binning.get())
        subtomos.setCoordinates3D(self.inputCoordinates)
        frames, paths = [], []
        for tsId in tsIds:
            star_path = os.path.join(self._tsPath(tsId, ''), 'subtomograms.star')
            df = star.read_star_blocks(star_path)
            df = next(b for b in df.values() if isinstance(b, pd.DataFrame))
            df[star.TOMO] = tsId
            paths += [os.path.join(os.path.dirname(star_path), p) for p in df['rlnImageName']]
            frames.append(df)
        df = pd.concat(frames, ignore_index=True)
        convert.frame_to_subtomograms(df, subtomos, tomos, paths, tomos.getSamplingRate() * self.binning.get(),
                                      source=self._getExtraPath())
        self._defineOutputs(**{OUT_SUBTOMOS: subtomos})
        self._defineSourceRelation(self.inputCoordinates, subtomos)

    def _validate(self):
        errors = []
        coords = self.inputCoordinates.get()
        if coords is None:
            return errors
        if coords.getSize() == 0:
            errors.append('The coordinate set is empty.')
            return errors
        tomos = self._tomograms()
        if tomos is not None and not set(coords.getUniqueValues('_tomoId')) & set(convert.tomograms_by_name(tomos)):
            errors.append('No coordinate refers to any of the tomograms (coordinates are linked by tsId).')
        box = self._box()
        if box < 4:
            errors.append('Give a box size (the coordinates have none).')
        elif self.binning.get() < 1 or box % self.binning.get():
            errors.append(f'The box ({box}) must be a multiple of the binning ({self.binning.get()}).')
        tomos = self._tomograms()
        if tomos is not None and box and tomos.getSize() and min(tomos.getDim()) < box:
            errors.append(f'The box ({box} voxels) is larger than the tomograms {tomos.getDim()}.')
        return errors

    def _summary(self):
        if not self.hasAttribute(OUT_SUBTOMOS):
            return ['Subtomograms not ready yet.']
        n_in = self.inputCoordinates.get().getSize()
        n_out = getattr(self, OUT_SUBTOMOS).getSize()
        return [f'{n_out} subtomograms of {self._box() // self.binning.get()}³ voxels extracted from {n_in} '
                f'coordinates ({n_in - n_out} skipped at the tomogram borders).']

    def _methods(self):
        return [f'Subtomograms of {self._box()} voxels were extracted with cryopick.']
