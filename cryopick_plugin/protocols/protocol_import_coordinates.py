"""Import particle coordinates from RELION STAR files.

scipion-em-tomo's coordinate import reads txt / cbox / EMAN / Dynamo files only; RELION STAR is the lingua
franca of pickers (and what `cryopick simulate` writes as ground truth), so cryopick brings its own.
"""
import glob
import os

import pandas as pd
from pyworkflow.protocol import params
from pwem.protocols import ProtImport
from pwem.objects import SetOfCoordinates
from tomo.objects import SetOfCoordinates3D
from tomo.protocols import ProtTomoBase

from .. import convert
from ..constants import OUT_COORDS3D, OUT_COORDS2D
from ..engine.io import star
from ..engine.errors import InputError


class _StarImportMixin:
    """Form fields and file handling shared by the 2D and 3D STAR imports."""

    def _defineStarParams(self, form, what):
        form.addParam('starFiles', params.PathParam, important=True,
                      label='STAR file(s)',
                      help=f'A RELION STAR file, or a pattern such as /data/picks/*.star. The first data block '
                           f'with rlnCoordinateX/Y{"/Z" if what == "tomograms" else ""} is read. Rows are linked '
                           f'to {what} by {"rlnTomoName (the tsId)" if what == "tomograms" else "rlnMicrographName (base name)"}; '
                           f'rlnClassNumber becomes the class (groupId) and rlnAutopickFigureOfMerit the score.')
        form.addParam('coordsSamplingRate', params.FloatParam, allowsNull=True, default=None,
                      label='Coordinates sampling rate (Å/px)',
                      help=f'Pixel size the STAR positions are given in. Leave empty when they refer to the input '
                           f'{what} themselves; otherwise positions are rescaled to the {what}\' sampling rate '
                           f'(e.g. picks made on a tomogram binned 4×).')
        form.addParam('boxSize', params.IntParam, default=32, label='Box size (px)',
                      help=f'Box size in pixels of the input {what}, used by extraction protocols downstream.')

    def _starPaths(self):
        pattern = os.path.expanduser(self.starFiles.get() or '')
        return sorted(glob.glob(pattern)) if any(c in pattern for c in '*?[') else \
            ([pattern] if pattern else [])

    def _readTables(self, dims):
        tables = []
        for path in self._starPaths():
            df = star.read_coordinates(path, dims=dims)
            tables.append((path, df))
        return tables

    def _validateStar(self, dims):
        errors = []
        paths = self._starPaths()
        if not paths:
            errors.append(f'No STAR file matches {self.starFiles.get()}')
        for path in paths:
            if not os.path.isfile(path):
                errors.append(f'{path}: file not found')
        if self.coordsSamplingRate.get() is not None and self.coordsSamplingRate.get() <= 0:
            errors.append('Coordinates sampling rate must be positive')
        if self.boxSize.get() is None or self.boxSize.get() <= 0:
            errors.append('Box size must be a positive number of pixels')
        return errors


class CryopickImportCoordinates3D(_StarImportMixin, ProtImport, ProtTomoBase):
    """Import 3D coordinates (RELION STAR) onto a set of tomograms.

    Produces a SetOfCoordinates3D at the tomograms' sampling rate whose coordinates are linked to their
    tomograms by tsId, with classes (groupId), scores and, when the STAR has rlnAngleRot/Tilt/Psi, their
    orientations.
    """
    _label = 'import coordinates 3D (STAR)'
    _possibleOutputs = {OUT_COORDS3D: SetOfCoordinates3D}

    def _defineParams(self, form):
        form.addSection(label='Input')
        form.addParam('inputTomograms', params.PointerParam, pointerClass='SetOfTomograms', important=True,
                      label='Tomograms', help='Tomograms the coordinates refer to (linked by tsId).')
        self._defineStarParams(form, 'tomograms')

    def _insertAllSteps(self):
        self._insertFunctionStep(self.importStep)

    def importStep(self):
        tomograms = self.inputTomograms.get()
        tables = self._readTables(dims=3)
        df = pd.concat([t for _, t in tables], ignore_index=True)
        source = tables[0][0] if len(tables) == 1 else self.starFiles.get()
        if len(df) == 0:
            raise InputError(source, 'no coordinates in the STAR file(s)')
        coords = SetOfCoordinates3D.create(self._getPath(), template='coordinates%s.sqlite')
        coords.setSamplingRate(tomograms.getSamplingRate())
        coords.setPrecedents(tomograms)
        coords.setBoxSize(self.boxSize.get())
        try:
            convert.frame_to_coordinates3d(df, coords, tomograms, self.coordsSamplingRate.get(), source=source)
        except Exception:
            coords.close()
            os.remove(coords.getFileName())
            raise
        self._defineOutputs(**{OUT_COORDS3D: coords})
        self._defineSourceRelation(self.inputTomograms, coords)

    def _validate(self):
        errors = self._validateStar(3)
        tomos = self.inputTomograms.get()
        if tomos is not None and not tomos.getSamplingRate():
            errors.append('The input tomograms have no sampling rate')
        return errors

    def _summary(self):
        if not self.hasAttribute(OUT_COORDS3D):
            return ['Output not ready yet.']
        out = getattr(self, OUT_COORDS3D)
        return [f'{out.getSize()} coordinates imported from {self.starFiles.get()} onto '
                f'{self.inputTomograms.get().getSize()} tomograms at {out.getSamplingRate():g} Å/px.']

    def _methods(self):
        if not self.hasAttribute(OUT_COORDS3D):
            return []
        return [f'{getattr(self, OUT_COORDS3D).getSize()} particle coordinates were imported from RELION STAR '
                f'files with cryopick.']


class CryopickImportCoordinates2D(_StarImportMixin, ProtImport):
    """Import 2D particle coordinates (RELION STAR) onto a set of micrographs.

    Positions are rlnCoordinateX = column and rlnCoordinateY = row of the micrograph array; rows are linked to
    micrographs by the base name in rlnMicrographName.
    """
    _label = 'import coordinates 2D (STAR)'
    _possibleOutputs = {OUT_COORDS2D: SetOfCoordinates}

    def _defineParams(self, form):
        form.addSection(label='Input')
        form.addParam('inputMicrographs', params.PointerParam, pointerClass='SetOfMicrographs', important=True,
                      label='Micrographs', help='Micrographs the coordinates refer to.')
        self._defineStarParams(form, 'micrographs')

    def _insertAllSteps(self):
        self._insertFunctionStep(self.importStep)

    def importStep(self):
        mics = self.inputMicrographs.get()
        tables = self._readTables(dims=2)
        df = pd.concat([t for _, t in tables], ignore_index=True)
        source = tables[0][0] if len(tables) == 1 else self.starFiles.get()
        if len(df) == 0:
            raise InputError(source, 'no coordinates in the STAR file(s)')
        scale = 1.0
        if self.coordsSamplingRate.get():
            scale = self.coordsSamplingRate.get() / mics.getSamplingRate()
        coords = self._createSetOfCoordinates(mics)
        coords.setBoxSize(self.boxSize.get())
        try:
            convert.frame_to_coordinates2d(df, coords, mics, scale=scale, source=source)
        except Exception:
            coords.close()
            os.remove(coords.getFileName())
            raise
        self._defineOutputs(**{OUT_COORDS2D: coords})
        self._defineSourceRelation(self.inputMicrographs, coords)

    def _validate(self):
        errors = self._validateStar(2)
        mics = self.inputMicrographs.get()
        if mics is not None and not mics.getSamplingRate():
            errors.append('The input micrographs have no sampling rate')
        return errors

    def _summary(self):
        if not self.hasAttribute(OUT_COORDS2D):
            return ['Output not ready yet.']
        return [f'{getattr(self, OUT_COORDS2D).getSize()} coordinates imported from {self.starFiles.get()}.']

    def _methods(self):
        return []
