"""Shared by the 2D picking protocols: micrograph bookkeeping, diameter in pixels, picks → SetOfCoordinates."""
import glob
import os

import pandas as pd
from pyworkflow.protocol import params
from pwem.protocols import ProtParticlePicking

from .. import convert
from ..constants import OUT_COORDS2D
from ..engine.io import star
from .protocol_base import _SET_READ_LOCK, CryopickProtocol


class CryopickPicking2DBase(CryopickProtocol, ProtParticlePicking):
    """Base of cryopick's 2D pickers (not shown in menus)."""
    _label = None
    CHUNK = 10  # micrographs per picking job: finished chunks are not redone on Continue

    def _defineDiameterParams(self, form, optional=False):
        if optional:
            form.addParam('diameter', params.FloatParam, allowsNull=True, default=None, label='Particle diameter (Å)',
                          help='Particle diameter in Å. Empty: the diameter the model was trained with.')
        else:
            form.addParam('diameter', params.FloatParam, default=200.0, label='Particle diameter (Å)',
                          help='Longest dimension of the particle in Ångström (e.g. 190 Å for β-galactosidase).')
        form.addParam('boxSize', params.IntParam, allowsNull=True, default=None, label='Box size (px)',
                      help='Box recorded with the coordinates for extraction. Empty: 1.5 × the diameter, even.')

    @staticmethod
    def _defineEdgeParam(form):
        form.addParam('edgeMargin', params.FloatParam, default=0.5, expertLevel=params.LEVEL_ADVANCED,
                      label='Skip picks near the edge (diameters)',
                      help='Picks whose centre is closer than this many particle diameters to the micrograph\'s '
                           'edge are dropped. 0.5: the particle is cut by the edge (it cannot be extracted '
                           'whole, and the picker sees half of it as padding); 0 keeps every pick.')

    def _edgeArgs(self):
        return ['--edge-margin', self.edgeMargin.get()]

    # ------------------------------------------------------------------ helpers
    def _diameterPx(self):
        return self.diameter.get() / self.inputMicrographs.get().getSamplingRate()

    def _box(self):
        return int(self.boxSize.get() or 2 * round(0.75 * self._diameterPx()))

    def _micChunks(self):
        names = list(convert.micrographs_by_name(self.inputMicrographs.get()))
        return [names[i:i + self.CHUNK] for i in range(0, len(names), self.CHUNK)]

    def _micPaths(self, names):
        # Steps running side by side must not read the set's SQLite at the same time (protocol_base).
        with _SET_READ_LOCK:
            cache = self.__dict__.setdefault('_micrographFilesCache', {})
            if not cache:
                cache.update({n: os.path.abspath(m.getFileName())
                              for n, m in convert.micrographs_by_name(self.inputMicrographs.get()).items()})
            return [cache[n] for n in names]

    def _picksDir(self):
        return os.path.abspath(self._getExtraPath('picks'))

    def _registerPicks(self):
        """Read <picks>/<stem>_picks.star for every micrograph and define the SetOfCoordinates output."""
        mics = self.inputMicrographs.get()
        by_stem = {os.path.splitext(os.path.basename(m.getFileName()))[0]: name
                   for name, m in convert.micrographs_by_name(mics).items()}
        tables = []
        for path in sorted(glob.glob(os.path.join(self._picksDir(), '*_picks.star'))):
            stem = os.path.basename(path)[:-len('_picks.star')]
            if stem not in by_stem:
                continue
            blocks = star.read_star_blocks(path)
            df = next((b for b in blocks.values() if isinstance(b, pd.DataFrame)), None)
            if df is None or len(df) == 0 or star.X not in df.columns:
                continue
            df = star.read_coordinates(path, dims=2)
            df[star.MIC] = by_stem[stem]
            tables.append(df)
        coords = self._createSetOfCoordinates(mics)
        coords.setBoxSize(self._box())
        if tables:
            convert.frame_to_coordinates2d(pd.concat(tables, ignore_index=True), coords, mics,
                                           source=self._picksDir())
        self._defineOutputs(**{OUT_COORDS2D: coords})
        self._defineSourceRelation(self.inputMicrographs, coords)
        return coords

    def _validateMicrographs(self):
        errors = []
        mics = self.inputMicrographs.get()
        if mics is None:
            return errors
        if mics.getSize() == 0:
            errors.append('The micrograph set is empty.')
            return errors
        if not mics.getSamplingRate():
            errors.append('The micrographs have no sampling rate.')
            return errors
        srs = {round(m.getSamplingRate(), 4) for m in mics.iterItems()}
        if len(srs) > 1:
            errors.append(f'The micrographs have different pixel sizes {sorted(srs)}: pick each pixel size '
                          f'separately.')
        dims = mics.getDim()
        if dims and self.diameter.get() and self._diameterPx() >= min(dims[:2]):
            errors.append(f'The particle diameter ({self._diameterPx():.0f} px) is larger than the micrographs '
                          f'({dims[0]}×{dims[1]} px).')
        if not self.diameter.get() or self.diameter.get() <= 0:
            errors.append('The particle diameter must be positive.')
        margin = self.edgeMargin.get() if self.hasAttribute('edgeMargin') else None
        if margin is not None and not 0 <= margin < 10:
            errors.append(f'Skip picks near the edge: {margin:g} diameters is not within 0–10.')
        return errors

    def _summary(self):
        if not self.hasAttribute(OUT_COORDS2D):
            return ['Picks not ready yet.']
        out = getattr(self, OUT_COORDS2D)
        return [f'{out.getSize()} particles picked on {self.inputMicrographs.get().getSize()} micrographs '
                f'(box {out.getBoxSize()} px).']
