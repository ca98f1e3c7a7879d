"""Names shared by the plugin, its protocols and viewers."""
from .engine.settings import TEMPLATES_VAR, DATA_VAR, DEVICE_VAR, MODELS_VAR, SAM_CHECKPOINT_VAR, PRECISION_VAR

__version__ = '0.1.0'

# Output names of the protocols (also the keys of their _possibleOutputs).
OUT_COORDS3D = 'output3DCoordinates'
OUT_COORDS2D = 'outputCoordinates'
OUT_TOMOMASKS = 'outputTomoMasks'
OUT_SUBTOMOS = 'outputSubtomograms'
OUT_CLASSES = 'outputClasses'
OUT_MODEL = 'outputModel'
OUT_TOMOGRAMS = 'outputTomograms'
