"""2D pick tables and the checks on the inputs of 2D picking, shared by the pickers and their SAM stage."""
import numpy as np
import pandas as pd

from ..errors import InputError
from ..io import star

COLUMNS = [star.X, star.Y, star.SCORE, star.DIAMETER]


def check_micrograph(image, source='micrograph'):
    """The image as a float32 (y, x) array; InputError for RGB, wrong dimensionality, NaN or constant."""
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.shape[0] > 4:
        raise InputError(source, f"is a colour image (shape {arr.shape}); give a single-channel micrograph")
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise InputError(source, f"expected a 2D micrograph, found shape {arr.shape}")
    if min(arr.shape) < 8:
        raise InputError(source, f"micrograph of shape {arr.shape} is too small")
    arr = arr.astype(np.float32, copy=False)
    if not np.all(np.isfinite(arr)):
        raise InputError(source, "micrograph holds NaN or infinite values")
    if float(arr.max()) == float(arr.min()):
        raise InputError(source, "micrograph is constant")
    return arr


def check_diameter(diameter_px, shape, source='diameter'):
    d = float(diameter_px)
    if not np.isfinite(d) or d <= 1:
        raise InputError(source, f"particle diameter must be more than 1 pixel, got {diameter_px}")
    if d >= min(shape):
        raise InputError(source, f"particle diameter {d:g} px does not fit in a micrograph of "
                                 f"{shape[1]} × {shape[0]} pixels")
    return d


def picks_frame(xy, scores, diameters):
    xy = np.asarray(xy, dtype=float).reshape(-1, 2)
    return pd.DataFrame({star.X: xy[:, 0], star.Y: xy[:, 1],
                         star.SCORE: np.asarray(scores, dtype=float).reshape(-1),
                         star.DIAMETER: np.broadcast_to(np.asarray(diameters, dtype=float), (len(xy),)).copy()})
