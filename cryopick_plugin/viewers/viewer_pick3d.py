"""Viewer of 3D picks: tomogram slices with the picks drawn, and score histograms per class.

For CryopickPick3D and CryopickDogPick runs and for any SetOfCoordinates3D a cryopick protocol made. The
circles have the particle radius (the model's per-class diameter for DeepETPicker, the form's diameter for
DoG, a third of the box otherwise: boxes are 1.5 × the diameter) and the class colour (groupId).
"""
import os

from tomo.objects import SetOfCoordinates3D

from .. import convert
from ..constants import OUT_COORDS3D
from ..engine.io import star
from ..protocols import CryopickDogPick, CryopickPick3D
from . import figures as fig
from .viewer_base import MAX_ITEMS, CryopickFigureViewer, cached, made_by_cryopick, safe_name


def default_radius(coords):
    """Particle radius (voxels) implied by a set's box size (box = 1.5 × diameter), 5 when unknown."""
    box = coords.getBoxSize() if hasattr(coords, 'getBoxSize') else None
    return box / 3.0 if box else 5.0


def coordinates3d_figures(coords, folder, radius=None, class_labels=None, score_label='score',
                          max_tomograms=MAX_ITEMS):
    """Slices with picks for each tomogram of a SetOfCoordinates3D (the first `max_tomograms` by tsId),
    then one score histogram per class over all of them. radius: voxels, {class: voxels} or None (from
    the box size). Returns the PNG paths."""
    set_file = coords.getFileName()
    df = convert.coordinates3d_to_frame(coords)
    tomos = convert.tomograms_by_name(coords.getPrecedents())
    radius = default_radius(coords) if radius is None else radius
    paths = []
    for tsId in list(tomos)[:max_tomograms]:
        tomo_file = os.path.abspath(tomos[tsId].getFileName())
        rows = df[df[star.TOMO] == tsId]

        def make(out, tomo_file=tomo_file, rows=rows, tsId=tsId):
            fig.tomogram_slices(tomo_file, rows, out, radius=radius, class_labels=class_labels,
                                title=f'{tsId}: {len(rows)} picks')
        paths.append(cached(folder, f'slices_{safe_name(tsId)}.png', [set_file, tomo_file], make))
    paths.append(cached(folder, 'score_histogram.png', [set_file],
                        lambda out: fig.score_histograms(df, out, xlabel=score_label,
                                                         title=f'{score_label.capitalize()} per class, '
                                                               f'{len(df)} picks in {len(tomos)} tomograms')))
    return paths


class CryopickCoordinates3DViewer(CryopickFigureViewer):
    """Tomogram slices with the picks drawn (coloured by class) and score histograms per class."""
    _label = 'cryopick: tomogram slices with picks'
    _targets = [CryopickPick3D, CryopickDogPick, SetOfCoordinates3D]

    @classmethod
    def can_handle_this_instance(cls, instance):
        # Other plugins' coordinate sets keep their own viewers; ours are recognised by their run folder.
        if isinstance(instance, SetOfCoordinates3D):
            return made_by_cryopick(instance)
        return True

    def _coordinates(self, obj):
        """(SetOfCoordinates3D or None, radius) of a protocol or a set."""
        if isinstance(obj, SetOfCoordinates3D):
            return obj, None
        coords = getattr(obj, OUT_COORDS3D, None)
        radius = None
        if isinstance(obj, CryopickDogPick) and obj.diameter.get():
            radius = obj.diameter.get() / 2.0
        elif isinstance(obj, CryopickPick3D) and obj.inputModel.get() is not None:
            diameters = obj.inputModel.get().getDiameters()
            if diameters:
                radius = {i + 1: d / 2.0 for i, d in enumerate(diameters)}
        return coords, radius

    def figures(self, obj):
        coords, radius = self._coordinates(obj)
        if coords is None:
            return []
        return coordinates3d_figures(coords, self._figureDir(obj), radius=radius)
