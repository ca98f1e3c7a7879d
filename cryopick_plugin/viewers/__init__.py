"""Viewers of cryopick outputs (Scipion finds the Viewer classes re-exported here).

The figures themselves are made by `figures` (matplotlib only, usable without Scipion); `views.PngView`
shows them in a Tk window.
"""
from .viewer_training import CryopickTrainingViewer  # noqa: F401
from .viewer_pick3d import CryopickCoordinates3DViewer  # noqa: F401
from .viewer_disca import CryopickDiscaViewer  # noqa: F401
from .viewer_picking2d import CryopickPicking2DViewer  # noqa: F401
