"""Reading, writing and downsampling 2D micrographs.

A micrograph is a float32 array of shape (y, x): x is the column, y the row of the array exactly as the
file stores it (the MRC data block, or the image rows top to bottom for JPG/PNG/TIFF). No flip is applied
anywhere: a coordinate (x, y) always means ``image[y, x]`` of the array returned by `read_micrograph`.

Supported inputs: MRC (2D, or a 3D file with a single section), and greyscale JPG / PNG / TIFF of any bit
depth (read unchanged, so 16-bit PNGs keep their range). Colour images are refused rather than silently
converted, because which channel mix is "the" intensity is a decision for the user.
"""
import os

import numpy as np

from ..errors import InputError
from ..io.mrc import atomic_path, open_volume, write_mrc

MRC_EXTENSIONS = ('.mrc', '.mrcs', '.map', '.rec', '.st')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.tif', '.tiff', '.bmp')


def _extension(path):
    return os.path.splitext(os.fspath(path))[1].lower()


def read_micrograph(path):
    """Read a 2D micrograph; return (float32 (y, x) array, pixel size in Å or None when unknown).

    Raises InputError naming the file when it is missing, unreadable, not 2D, a colour image, or holds
    NaN/inf or a constant value.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(path, "file not found")
    ext = _extension(path)
    if ext in IMAGE_EXTENSIONS:
        image, pixel = _read_image(path), None
    else:
        # Anything else is tried as MRC: mrcfile refuses non-MRC content with a clear message.
        data, voxel = open_volume(path, ndim=2)
        image = np.array(data, dtype=np.float32)
        pixel = float(voxel) if voxel and voxel > 0 else None
    if not np.all(np.isfinite(image)):
        raise InputError(path, "contains NaN or infinite values")
    if float(image.max()) == float(image.min()):
        raise InputError(path, f"is constant (every pixel is {float(image.min()):g})")
    return image, pixel


def _read_image(path):
    import cv2
    image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise InputError(path, "not a readable image file")
    if image.ndim == 3:
        if image.shape[2] == 1:
            image = image[:, :, 0]
        elif image.shape[2] in (3, 4):
            raise InputError(path, f"RGB image ({image.shape[2]} channels): convert to greyscale")
        else:
            raise InputError(path, f"image with {image.shape[2]} channels: expected greyscale")
    if image.ndim != 2 or min(image.shape) < 2:
        raise InputError(path, f"expected a 2D image, found an array of shape {tuple(image.shape)}")
    return image.astype(np.float32)


def to_uint8(image):
    """Min–max scale to 0..255 uint8 (a constant image gives zeros)."""
    image = np.asarray(image, dtype=np.float32)
    lo, hi = float(image.min()), float(image.max())
    if hi <= lo:
        return np.zeros(image.shape, np.uint8)
    return np.clip(np.rint((image - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def write_micrograph(path, image, pixel_size=None):
    """Write a 2D image atomically; the format follows the extension.

    MRC (.mrc/.mrcs/.map): float32 (or the integer type given), with the pixel size in the header.
    PNG/TIFF: uint8 and uint16 arrays are written as they are, anything else is min–max scaled to uint8.
    JPG: always min–max scaled to uint8 (lossy; for viewing only). Returns `path`.
    """
    path = os.fspath(path)
    image = np.asarray(image)
    if image.ndim != 2:
        raise InputError(path, f"expected a 2D image to write, got shape {image.shape}")
    ext = _extension(path)
    if ext in IMAGE_EXTENSIONS:
        import cv2
        if image.dtype == np.uint8 or (image.dtype == np.uint16 and ext in ('.png', '.tif', '.tiff')):
            out = image
        else:
            out = to_uint8(image)
        with atomic_path(path, suffix=ext) as tmp:
            if not cv2.imwrite(tmp, out):
                raise InputError(path, "could not write the image")
        return path
    if ext not in MRC_EXTENSIONS:
        raise InputError(path, f"unknown image extension '{ext}' (use .mrc, .png, .tif or .jpg)")
    return write_mrc(path, image, pixel_size or 1.0)


def downsampled_shape(shape, factor):
    """Shape (y, x) of an image downsampled by `factor` (each side rounded, at least 1)."""
    return tuple(max(1, int(round(s / float(factor)))) for s in shape)


def downsample(image, factor, method='area'):
    """Shrink an image by `factor` (>= 1; 1 returns a float32 copy).

    method 'area': each output pixel is the mean of the input pixels it covers (OpenCV INTER_AREA; for an
    integer factor that divides the size this is exact binning). Cheap, no ringing; a mild anti-alias.
    method 'fourier': the centred block of the spectrum is kept (Fourier cropping). An ideal low-pass, the
    standard for cryo-EM, at the cost of slight ringing around sharp edges and one FFT of the full image.

    Output pixel centres relate to input ones by `to_original_coordinates`.
    """
    image = np.asarray(image, dtype=np.float32)
    factor = float(factor)
    if not factor >= 1:
        raise InputError('downsample factor', f"must be >= 1, got {factor:g}")
    if factor == 1:
        return image.copy()
    out_shape = downsampled_shape(image.shape, factor)
    if method == 'area':
        import cv2
        return cv2.resize(image, (out_shape[1], out_shape[0]), interpolation=cv2.INTER_AREA)
    if method == 'fourier':
        return _fourier_crop(image, out_shape)
    raise InputError('downsample method', f"unknown method '{method}' (area or fourier)")


def _fourier_crop(image, out_shape):
    spectrum = np.fft.fftshift(np.fft.fft2(image))
    (h, w), (oh, ow) = image.shape, out_shape
    y0, x0 = h // 2 - oh // 2, w // 2 - ow // 2
    cropped = spectrum[y0:y0 + oh, x0:x0 + ow]
    out = np.fft.ifft2(np.fft.ifftshift(cropped)).real * (oh * ow / (h * w))
    return out.astype(np.float32)


def to_original_coordinates(xy, small_shape, original_shape, method='area'):
    """Map (x, y) positions in a downsampled image back to pixels of the original image.

    'area' resampling aligns pixel edges (centre i of the small image sits at (i + 0.5)·s − 0.5), Fourier
    cropping aligns the first pixel (i·s), where s is original / small size along each axis.
    """
    xy = np.asarray(xy, dtype=float).reshape(-1, 2)
    scale = np.array([original_shape[1] / small_shape[1], original_shape[0] / small_shape[0]])
    if method == 'fourier':
        return xy * scale
    return (xy + 0.5) * scale - 0.5


def to_small_coordinates(xy, small_shape, original_shape, method='area'):
    """Inverse of `to_original_coordinates`."""
    xy = np.asarray(xy, dtype=float).reshape(-1, 2)
    scale = np.array([original_shape[1] / small_shape[1], original_shape[0] / small_shape[0]])
    if method == 'fourier':
        return xy / scale
    return (xy + 0.5) / scale - 0.5


# A particle whose centre lies closer than half its diameter to the micrograph's edge is cut by it: it
# cannot be extracted whole, annotators leave it out, and the picker's view of it is half reflection
# padding. 2D pickers drop such picks by default (`away_from_edge`; β-gal: every pick that close to the
# edge was false, F1 +0.03–0.05 for both pickers; bench/README §3).
EDGE_MARGIN = 0.5


def away_from_edge(xy, shape, margin_px):
    """Boolean mask of the (x, y) positions (pixel centres, origin at the first pixel) at least
    `margin_px` from every edge of an image of `shape` (rows, columns)."""
    xy = np.asarray(xy, dtype=float).reshape(-1, 2)
    h, w = shape[:2]
    edge = np.minimum.reduce([xy[:, 0] + 0.5, xy[:, 1] + 0.5, w - 0.5 - xy[:, 0], h - 0.5 - xy[:, 1]])
    return edge >= float(margin_px)
