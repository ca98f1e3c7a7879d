"""What every cryopick viewer shares: figures made headless and cached, shown in one PNG window.

A viewer's `figures(obj)` returns PNG paths; it reads only files (engine outputs, Scipion set files,
tomograms, micrographs) so tests and scripts can call it without a display. Figures go to the protocol's
extra/viewer/ folder (for an output set: extra/viewer/<set file stem>/ of the protocol that made it) and
are remade only when one of the files they were drawn from is newer (`figures.up_to_date`).
`_visualize` wraps them in one `PngView`, or returns a message when there is nothing to show yet.
"""
import os

from pyworkflow.viewer import DESKTOP_TKINTER, Viewer

from ..engine.errors import InputError
from . import figures as fig
from .views import png_views

MAX_ITEMS = 10  # tomograms / micrographs drawn per viewer call (the first ones in tsId / name order)


def made_by_cryopick(obj):
    """True when a Scipion set lives in the run folder of a cryopick protocol (Runs/<id>_Cryopick...)."""
    try:
        path = obj.getFileName()
    except AttributeError:
        return False
    run = os.path.basename(os.path.dirname(os.path.abspath(path))) if path else ''
    return '_Cryopick' in run


def figure_dir(obj, fallback):
    """Where the figures of `obj` go: <protocol>/extra/viewer for a protocol, beside the set file for a
    set (<run>/extra/viewer/<set stem>), `fallback` when neither is writable."""
    if hasattr(obj, '_getExtraPath'):
        folder = os.path.abspath(obj._getExtraPath('viewer'))
    else:
        path = getattr(obj, 'getFileName', lambda: None)()
        folder = (os.path.join(os.path.dirname(os.path.abspath(path)), 'extra', 'viewer',
                               os.path.splitext(os.path.basename(path))[0]) if path else fallback)
    try:
        os.makedirs(folder, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(folder)
    except OSError:
        folder = fallback
        os.makedirs(folder, exist_ok=True)
    return folder


def cached(folder, name, sources, make):
    """Path of figure `name` in `folder`, drawn by `make(out_path)` unless newer than all `sources`."""
    out = os.path.join(folder, name)
    if not fig.up_to_date(out, *sources):
        make(out)
    return out


def safe_name(text):
    """A file-name-safe version of a tsId / micrograph name."""
    return ''.join(c if c.isalnum() or c in '-_.' else '_' for c in str(text)) or 'item'


class CryopickFigureViewer(Viewer):
    """Base of the cryopick viewers (subclasses set _targets, _label and define `figures`)."""
    _environments = [DESKTOP_TKINTER]
    _label = 'cryopick figures'

    def __init__(self, **kwargs):
        Viewer.__init__(self, **kwargs)

    def figures(self, obj):
        """PNG paths of the figures of `obj` (made or taken from the cache)."""
        raise NotImplementedError

    def _figureDir(self, obj):
        return figure_dir(obj, os.path.abspath(self._getTmpPath('cryopick_viewer')))

    def _visualize(self, obj, **kwargs):
        title = f'{self._label}: {obj.getObjLabel() or obj.getClassName()}' \
            if hasattr(obj, 'getObjLabel') else self._label
        try:
            paths = self.figures(obj)
        except (InputError, OSError, ValueError, KeyError) as exc:
            return [self.errorMessage(f'Cannot draw the figures: {exc}', title)]
        if not paths:
            return [self.infoMessage('Nothing to show yet: the results are not there (has the protocol '
                                     'finished?).', title)]
        return png_views(paths, title=title, tkParent=self.getTkRoot())
