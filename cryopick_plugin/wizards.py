"""Form wizards: fill box sizes and diameters from what the inputs already know.

Scipion finds the Wizard classes of a plugin in its `wizards` module and puts a wand button beside every
parameter named in a wizard's `_targets`. The values come from `suggest_box_size` / `suggest_diameter`,
plain functions of a protocol instance (no Tk), so they can be tested and used from scripts.

Rules (the same the protocols apply when a field is left empty):
- box = 1.5 × particle diameter, rounded to an even number of voxels / pixels;
- a coordinate set's particle diameter ≈ its box size / 1.5;
- a DeepETPicker label is about half the particle diameter (EMPIAR-10045: label 11, particle 23 voxels),
  odd so it stays centred on the voxel of the coordinate.
"""
import math

from pwem.wizards import EmWizard

from .engine.errors import InputError
from .protocols import (CryopickCryoSegNet, CryopickDeepCryoPicker, CryopickDogPick, CryopickExtractSubtomograms,
                        CryopickPick3D, CryopickTrainCryoSegNet, CryopickWeakLabels)

BOX_PER_DIAMETER = 1.5
LABEL_PER_DIAMETER = 0.5


def even(value):
    """Nearest even integer, halves rounded up (33 → 34, 15 → 16)."""
    return 2 * int(math.floor(float(value) / 2.0 + 0.5))


def box_from_diameter(diameter):
    """Even box edge of 1.5 × `diameter` (same unit), at least 4."""
    return max(4, even(BOX_PER_DIAMETER * float(diameter)))


def diameter_from_box(box):
    """Particle diameter a box of edge `box` was made for (inverse of `box_from_diameter`)."""
    return float(box) / BOX_PER_DIAMETER


def odd_label_diameter(particle_diameter):
    """Odd DeepETPicker label diameter (voxels) for a particle of `particle_diameter` voxels, at least 3."""
    half = LABEL_PER_DIAMETER * float(particle_diameter)
    # the odd number in [2k, 2k+2) for half in that range: 23 → 11.5 → 11 (DeepETPicker's 10045 setting)
    return max(3, 2 * int(half // 2) + 1)


def _pointed(protocol, name, what):
    obj = getattr(protocol, name).get()
    if obj is None:
        raise InputError(protocol.getClassLabel(), f'choose the {what} first')
    return obj


def _coordinates_box(coords, target_sampling=None):
    """Box size of a coordinate set, rescaled to `target_sampling` (Å/px) when both rates are known."""
    box = coords.getBoxSize()
    if not box:
        raise InputError('coordinates', 'the coordinate set has no box size')
    # 3D sets know their sampling rate; a 2D set's box is in pixels of the micrographs it was picked on
    sr = coords.getSamplingRate() if hasattr(coords, 'getSamplingRate') else None
    if target_sampling and sr and abs(sr - target_sampling) > 1e-3 * target_sampling:
        box = box * sr / target_sampling
    return float(box)


def _model_diameter_px(model):
    diameters = model.getDiameters()
    if not diameters:
        raise InputError('model', 'the model does not record a particle diameter')
    return max(float(d) for d in diameters)


def suggest_box_size(protocol):
    """Box size (int, voxels / pixels of the protocol's input) for `protocol`'s boxSize field.

    Raises InputError saying what is missing when the inputs do not tell.
    """
    if isinstance(protocol, CryopickExtractSubtomograms):
        coords = _pointed(protocol, 'inputCoordinates', 'coordinates')
        tomos = protocol.inputTomograms.get()
        box = _coordinates_box(coords, tomos.getSamplingRate() if tomos is not None else None)
        return max(4, even(box))
    if isinstance(protocol, CryopickDogPick):
        if not protocol.diameter.get():
            raise InputError(protocol.getClassLabel(), 'give the particle diameter first')
        return box_from_diameter(protocol.diameter.get())
    if isinstance(protocol, CryopickPick3D):
        model = _pointed(protocol, 'inputModel', 'trained model')
        info = model.getInfo()
        box = info.get('box_size') or info.get('meta', {}).get('box_size')
        if box:
            return int(box)
        # The model records label diameters (about half the particle): the box is 1.5 particle diameters.
        return box_from_diameter(_model_diameter_px(model) / LABEL_PER_DIAMETER)
    if isinstance(protocol, (CryopickDeepCryoPicker, CryopickCryoSegNet)):
        mics = _pointed(protocol, 'inputMicrographs', 'micrographs')
        if protocol.diameter.get():
            if not mics.getSamplingRate():
                raise InputError('micrographs', 'no sampling rate')
            return box_from_diameter(protocol.diameter.get() / mics.getSamplingRate())
        model = getattr(protocol, 'inputModel', None)
        if model is not None and model.get() is not None:
            return box_from_diameter(_model_diameter_px(model.get()))
        raise InputError(protocol.getClassLabel(), 'give the particle diameter first')
    raise InputError(protocol.getClassLabel(), 'no box size rule for this protocol')


def suggest_diameter(protocol):
    """Value for `protocol`'s diameter field, in the field's unit.

    Weak labels: odd label diameter in voxels from the coordinates' box size. 2D pickers: particle diameter
    in Å from the training coordinates' box size or from the model.
    """
    if isinstance(protocol, CryopickWeakLabels):
        coords = _pointed(protocol, 'inputCoordinates', 'particle centres')
        tomos = protocol.inputTomograms.get()
        box = _coordinates_box(coords, tomos.getSamplingRate() if tomos is not None else None)
        return odd_label_diameter(diameter_from_box(box))
    if isinstance(protocol, CryopickTrainCryoSegNet):
        coords = _pointed(protocol, 'inputCoordinates', 'training coordinates')
        mics = _pointed(protocol, 'inputMicrographs', 'micrographs')
        if not mics.getSamplingRate():
            raise InputError('micrographs', 'no sampling rate')
        return round(diameter_from_box(_coordinates_box(coords, mics.getSamplingRate())) * mics.getSamplingRate(), 1)
    if isinstance(protocol, (CryopickDeepCryoPicker, CryopickCryoSegNet)):
        model = _pointed(protocol, 'inputModel', 'trained model')
        sr = model.getSamplingRate()
        if not sr:
            mics = protocol.inputMicrographs.get()
            sr = mics.getSamplingRate() if mics is not None else None
        if not sr:
            raise InputError('model', 'no sampling rate to turn its diameter into Å')
        return round(_model_diameter_px(model) * sr, 1)
    raise InputError(protocol.getClassLabel(), 'no diameter rule for this protocol')


class _SuggestionWizard(EmWizard):
    """Sets the field it was opened from to the suggestion; says why when there is none."""
    _suggest = None

    def show(self, form, *args):
        name = getattr(form, 'wizParamName', None) or self._targets[0][1][0]
        try:
            value = type(self)._suggest(form.protocol)
        except InputError as e:
            form.showWarning(str(e))
            return
        form.setVar(name, value)


class CryopickBoxSizeWizard(_SuggestionWizard):
    """Box size from the input coordinates' box, the model's training box, or 1.5 × the diameter."""
    _targets = [(CryopickDogPick, ['boxSize']), (CryopickExtractSubtomograms, ['boxSize']),
                (CryopickPick3D, ['boxSize']), (CryopickDeepCryoPicker, ['boxSize']),
                (CryopickCryoSegNet, ['boxSize'])]
    _suggest = staticmethod(suggest_box_size)


class CryopickDiameterWizard(_SuggestionWizard):
    """Weak-label diameter from the coordinates; 2D particle diameter from the coordinates or the model."""
    _targets = [(CryopickWeakLabels, ['diameter']), (CryopickTrainCryoSegNet, ['diameter']),
                (CryopickDeepCryoPicker, ['diameter']), (CryopickCryoSegNet, ['diameter'])]
    _suggest = staticmethod(suggest_diameter)
