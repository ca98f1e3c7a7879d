"""The β-galactosidase micrographs with expert annotation (EMPIAR-10017, CryoPPP masks) as ground truth.

The data folder (`default_betagal_dir()`) holds ``micrographs/<name>.jpg`` (8-bit, already denoised by
CryoSegNet's chain and vertically flipped relative to the original MRC) and ``masks/<name>_mask.jpg``: a
filled circle of diameter 108 px on every annotated particle. Centres are given in the JPG's own array
frame (x = column, y = row of the JPG), which is the frame a picker sees when it reads the JPG;
`to_mrc_frame` converts them to the original MRC's rows.

Recovering centres from a mask (`mask_centres`)
-----------------------------------------------
The mask is thresholded at 128 (JPEG blurs the circle edges). Touching or overlapping circles merge into
one blob, and circles at the image border are cut, so blob centroids are wrong for both. Instead every
circle of the known radius is located by a circular Hough transform of the blob outline, computed per
connected component on a crop around it:

1. outline = mask pixels with a background neighbour; the image border is not an outline (a circle cut by
   the border keeps the arcs it has, and the Hough vote still peaks at its true centre when that centre
   lies inside the image);
2. Hough accumulator for radius R (skimage.transform.hough_circle, normalised: the fraction of the
   circumference that votes), peaks at least 0.7·R apart with at least 15 % of the circumference (a
   circle mostly hidden by its neighbours keeps little outline of its own);
3. greedy selection, strongest peak first: a circle is kept when at least 90 % of its in-image disk lies
   inside the mask and it covers at least 15 % of a disk that the circles kept so far do not;
4. a blob left with no accepted circle (a smudge smaller than a cut circle, or an odd shape) contributes
   its distance-transform maximum when its area is at least a quarter of a disk.

The procedure is exact (to a pixel) on synthetic masks of touching, overlapping and border-cut circles;
see tests/pick2d/test_betagal.py.
"""
import dataclasses
import glob
import os

import numpy as np

from ..errors import InputError
from ..settings import default_data_dir

PIXEL_SIZE = 1.77  # Å / pixel, EMPIAR-10017 Falcon II
DIAMETER = 108     # px, diameter of the annotation circles
MASK_THRESHOLD = 128


@dataclasses.dataclass
class BetagalRecord:
    name: str                  # micrograph stem, e.g. 'Falcon_2012_06_12-15_07_41_0'
    micrograph: str            # path of the JPG
    mask: str                  # path of the mask JPG
    pixel_size: float          # Å / pixel
    diameter: float            # particle (annotation circle) diameter in pixels
    centres: np.ndarray        # (N, 2) float, x (column), y (row) in the JPG's array frame
    shape: tuple = ()          # (y, x) of the micrograph


def default_betagal_dir():
    """<data>/betagal ($CRYOPICK_DATA or ../shared/data beside a checkout), or None when absent."""
    data = default_data_dir()
    candidate = os.path.join(data, 'betagal') if data else None
    return candidate if candidate and os.path.isdir(candidate) else None


def _disk(radius):
    r = int(np.ceil(radius))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (xx ** 2 + yy ** 2) <= radius ** 2


def mask_centres(mask, radius, min_votes=0.15, min_distance=None, inside_fraction=0.9, new_fraction=0.15):
    """Centres (N, 2) x, y of the circles of `radius` whose union is the boolean `mask` (see module doc)."""
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.transform import hough_circle

    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise InputError('mask', f"expected a 2D mask, got shape {mask.shape}")
    radius = float(radius)
    min_distance = int(round(0.7 * radius)) if min_distance is None else int(min_distance)
    disk_area = np.pi * radius ** 2
    labels, n = ndi.label(mask)
    if n == 0:
        return np.zeros((0, 2))
    H, W = mask.shape
    pad = int(np.ceil(radius)) + 2
    centres = []
    for index, sl in enumerate(ndi.find_objects(labels), start=1):
        y0, y1 = max(sl[0].start - pad, 0), min(sl[0].stop + pad, H)
        x0, x1 = max(sl[1].start - pad, 0), min(sl[1].stop + pad, W)
        blob = labels[y0:y1, x0:x1] == index
        area = int(blob.sum())
        # Outline without the image border: the crop has a margin on every side that is not the image
        # border, so edge-replicating padding only matters where the blob meets the image border.
        inner = ndi.binary_erosion(np.pad(blob, 1, mode='edge'), structure=np.ones((3, 3)))[1:-1, 1:-1]
        outline = blob & ~inner
        found = _hough_circles(blob, outline, radius, min_votes, min_distance, inside_fraction,
                               new_fraction * disk_area, hough_circle, peak_local_max)
        if not found and area >= 0.25 * disk_area:
            dist = ndi.distance_transform_edt(np.pad(blob, 1, mode='edge'))[1:-1, 1:-1]
            yy, xx = np.unravel_index(int(np.argmax(dist)), dist.shape)
            found = [(float(xx), float(yy))]
        centres.extend((x + x0, y + y0) for x, y in found)
    return np.array(centres, dtype=float).reshape(-1, 2)


def _hough_circles(blob, outline, radius, min_votes, min_distance, inside_fraction, min_new_area,
                   hough_circle, peak_local_max):
    if not outline.any():
        return []
    r_int = int(round(radius))
    acc = hough_circle(outline, np.array([r_int]), normalize=True, full_output=False)[0]
    peaks = peak_local_max(acc, min_distance=max(1, min_distance), threshold_abs=min_votes,
                           exclude_border=False)
    if len(peaks) == 0:
        return []
    order = np.argsort(-acc[peaks[:, 0], peaks[:, 1]], kind='stable')
    disk = _disk(radius)
    r = disk.shape[0] // 2
    covered = np.zeros_like(blob)
    kept = []
    h, w = blob.shape
    for y, x in peaks[order]:
        ys, xs = slice(max(y - r, 0), min(y + r + 1, h)), slice(max(x - r, 0), min(x + r + 1, w))
        d = disk[ys.start - (y - r):ys.stop - (y - r), xs.start - (x - r):xs.stop - (x - r)]
        in_image = int(d.sum())
        if in_image == 0:
            continue
        inside = int((blob[ys, xs] & d).sum())
        if inside < inside_fraction * in_image:
            continue
        new = int((d & blob[ys, xs] & ~covered[ys, xs]).sum())
        if new < min_new_area:
            continue
        covered[ys, xs] |= d
        kept.append((float(x), float(y)))
    return kept


def read_mask_centres(mask_path, diameter=DIAMETER, threshold=MASK_THRESHOLD):
    """Read a mask image (JPG/PNG/MRC), threshold it and return its circle centres (N, 2) x, y."""
    from .micrograph_io import read_micrograph
    mask, _ = read_micrograph(mask_path)
    return mask_centres(mask >= threshold, diameter / 2.0)


def to_mrc_frame(centres, height):
    """Convert x, y in the (flipped) JPG frame to the original MRC array frame: y → height − 1 − y."""
    centres = np.asarray(centres, dtype=float).reshape(-1, 2).copy()
    centres[:, 1] = height - 1 - centres[:, 1]
    return centres


def load_betagal(data_dir=None, names=None):
    """Load the β-gal micrographs and mask-derived centres; return a list of BetagalRecord (sorted by name).

    data_dir  folder with micrographs/ and masks/ (default: `default_betagal_dir()`)
    names     optional subset of micrograph stems
    """
    import cv2
    data_dir = data_dir or default_betagal_dir()
    if not data_dir or not os.path.isdir(data_dir):
        raise InputError(data_dir or 'betagal data', "β-gal data folder not found (set $CRYOPICK_DATA)")
    mics = sorted(glob.glob(os.path.join(data_dir, 'micrographs', '*.jpg')))
    if not mics:
        raise InputError(data_dir, "no micrographs/*.jpg")
    records = []
    for mic in mics:
        name = os.path.splitext(os.path.basename(mic))[0]
        if names is not None and name not in names:
            continue
        mask = os.path.join(data_dir, 'masks', f'{name}_mask.jpg')
        if not os.path.exists(mask):
            raise InputError(mask, "mask for micrograph not found")
        header = cv2.imread(mic, cv2.IMREAD_GRAYSCALE)
        records.append(BetagalRecord(name=name, micrograph=mic, mask=mask, pixel_size=PIXEL_SIZE,
                                     diameter=float(DIAMETER), centres=read_mask_centres(mask),
                                     shape=tuple(header.shape)))
    return records


def truth_frame(records):
    """All records' centres as one coordinate table (rlnMicrographName = the JPG's file name)."""
    import pandas as pd
    from ..io import star
    frames = [star.coordinates_frame(r.centres, os.path.basename(r.micrograph), micrograph=True)
              for r in records]
    return pd.concat(frames, ignore_index=True) if frames else star.coordinates_frame(np.zeros((0, 2)))
