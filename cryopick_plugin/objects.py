"""Scipion objects of cryopick: trained models."""
import json
import os

import pyworkflow.object as pwobj
from pwem.objects import EMObject


class CryopickModel(EMObject):
    """A trained cryopick network: the model file plus what it was trained for.

    The model file (torch checkpoint written by the engine) holds its own hyperparameters; the attributes
    here mirror the ones Scipion forms and validation need without opening it.
    """

    def __init__(self, path=None, method=None, **kwargs):
        EMObject.__init__(self, **kwargs)
        self._path = pwobj.String(path)
        self._method = pwobj.String(method)         # 'deepetpicker', 'disca', 'deepcryopicker', 'cryosegnet'
        self._samplingRate = pwobj.Float()          # Å per voxel / pixel of the training data
        self._numClasses = pwobj.Integer()
        self._diameters = pwobj.String()            # JSON list, voxels / pixels, one per class
        self._info = pwobj.String()                 # JSON of the model's metadata

    def getPath(self):
        return self._path.get()

    def setPath(self, path):
        self._path.set(path)

    def getMethod(self):
        return self._method.get()

    def setMethod(self, method):
        self._method.set(method)

    def getSamplingRate(self):
        return self._samplingRate.get()

    def setSamplingRate(self, value):
        self._samplingRate.set(value)

    def getNumClasses(self):
        return self._numClasses.get()

    def setNumClasses(self, value):
        self._numClasses.set(value)

    def getDiameters(self):
        return json.loads(self._diameters.get() or '[]')

    def setDiameters(self, values):
        self._diameters.set(json.dumps([float(v) for v in values]))

    def getInfo(self):
        return json.loads(self._info.get() or '{}')

    def setInfo(self, info):
        self._info.set(json.dumps(info, sort_keys=True, default=str))

    def exists(self):
        return bool(self.getPath()) and os.path.exists(self.getPath())

    def __str__(self):
        sr = self.getSamplingRate()
        return (f"{self.getMethod() or 'cryopick'} model, {self.getNumClasses() or '?'} class(es)"
                + (f", {sr:g} Å/px" if sr else ''))
