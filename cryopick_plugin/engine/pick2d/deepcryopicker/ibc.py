"""Unsupervised particle candidates for DeepCryoPicker: clustering, mask cleaning, candidate regions.

Pixel clustering of a preprocessed micrograph (float [0, 1], particles bright — invert dark-particle
micrographs first):

- `ibc_labels`: intensity-based clustering of AutoCryoPicker: k centres at step, 2·step, … k·step above
  the minimum (step = range / k), each pixel to the nearest centre, no iteration;
- `kmeans_labels`: k-means on pixel intensities (scikit-learn, fitted on a subsample);
- `fcm_labels`: fuzzy c-means (m = 2, ε = 1e-3, 100 iterations) on the 256-bin intensity histogram, which
  gives the same centres as on all pixels at a fraction of the cost;
- `super_labels`: SuperCryoPicker's super-clustering: SLIC superpixels (skimage), each replaced by its mean
  intensity, then IBC on that image — irregular particles (β-gal) come out as whole superpixel groups.

Labels are ordered by cluster intensity (0 = darkest). `foreground` keeps the brightest cluster(s),
`clean_mask` removes specks, fills holes and smooths, `slab_mask` marks regions thicker than any particle
(carbon, thick ice, contamination) to leave out, `candidate_regions` measures every region
(regionprops) and splits merged blobs at distance-transform maxima, `select_good` flags regions whose
shape looks like one isolated particle (size against the mean, circularity, axis ratio, solidity,
Feret box), and `hough_centres` refines round particles with a circular Hough transform.
"""
import numpy as np

from ...errors import InputError

METHODS = ('ibc', 'kmeans', 'fcm', 'super')
SHAPES = ('irregular', 'round', 'square')


def _order_by_centre(labels, centres):
    order = np.argsort(np.argsort(np.asarray(centres).ravel()))
    return order[labels].astype(np.int32)


def ibc_labels(image, k=4):
    """Intensity-based clustering: pixel → nearest of k evenly spaced intensity centres (0 = darkest)."""
    image = np.asarray(image, dtype=np.float32)
    lo, hi = float(image.min()), float(image.max())
    step = (hi - lo) / k if hi > lo else 1.0
    centres = lo + step * np.arange(1, k + 1)
    return np.argmin(np.abs(image[..., None] - centres), axis=-1).astype(np.int32)


def kmeans_labels(image, k=4, seed=0, max_fit=200_000):
    """K-means (3 restarts) on intensities; labels ordered by centre intensity."""
    from sklearn.cluster import KMeans
    values = np.asarray(image, dtype=np.float32).reshape(-1, 1)
    rng = np.random.default_rng(seed)
    fit = values if len(values) <= max_fit else values[rng.choice(len(values), max_fit, replace=False)]
    km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(fit)
    return _order_by_centre(km.predict(values).reshape(np.shape(image)), km.cluster_centers_)


def fcm_labels(image, k=3, m=2.0, eps=1e-3, max_iter=100):
    """Fuzzy c-means on intensities (via the weighted 256-bin histogram); hard labels by membership."""
    img = np.asarray(image, dtype=np.float32)
    lo, hi = float(img.min()), float(img.max())
    counts, edges = np.histogram(img, bins=256, range=(lo, hi if hi > lo else lo + 1))
    x = 0.5 * (edges[:-1] + edges[1:])
    w = counts.astype(np.float64)
    centres = np.quantile(img, (np.arange(k) + 0.5) / k).astype(np.float64)
    for _ in range(max_iter):
        d = np.abs(x[:, None] - centres[None, :]) + 1e-12
        u = 1.0 / np.sum((d[:, :, None] / d[:, None, :]) ** (2 / (m - 1)), axis=2)
        um = (u ** m) * w[:, None]
        new = (um * x[:, None]).sum(0) / np.maximum(um.sum(0), 1e-12)
        done = np.max(np.abs(new - centres)) < eps * max(hi - lo, 1e-12)
        centres = new
        if done:
            break
    labels = np.argmin(np.abs(img[..., None] - centres), axis=-1)
    return _order_by_centre(labels, centres)


def super_labels(image, n_segments=1500, k=4, compactness=1.0, seed=0):
    """SLIC superpixels, each set to its mean intensity, then IBC; returns (labels, superpixel ids).

    compactness 1 suits images in [0, 1]: much lower lets noisy segments fragment and be merged back
    into a handful of huge ones by the connectivity step."""
    from skimage.segmentation import slic
    img = np.asarray(image, dtype=np.float32)
    segments = slic(img, n_segments=int(n_segments), compactness=compactness, channel_axis=None,
                    start_label=0, enforce_connectivity=True)
    sums = np.bincount(segments.ravel(), weights=img.ravel())
    counts = np.maximum(np.bincount(segments.ravel()), 1)
    means = (sums / counts).astype(np.float32)
    return ibc_labels(means[segments], k), segments


def cluster_labels(image, method='ibc', k=4, seed=0, n_segments=1500):
    """Dispatch to one clustering method; labels ordered by intensity (0 = darkest)."""
    if method == 'ibc':
        return ibc_labels(image, k)
    if method == 'kmeans':
        return kmeans_labels(image, k, seed)
    if method == 'fcm':
        return fcm_labels(image, k)
    if method == 'super':
        return super_labels(image, n_segments, k, seed=seed)[0]
    raise InputError('clustering', f"unknown method '{method}' ({', '.join(METHODS)})")


def foreground(labels, k, keep=1):
    """Boolean mask of the `keep` brightest clusters."""
    return np.asarray(labels) >= (k - keep)


def disk_area(diameter):
    return np.pi * (diameter / 2.0) ** 2


def clean_mask(mask, diameter, min_fraction=0.2):
    """Remove specks under min_fraction of a particle's area, fill holes, open with a small disk."""
    from scipy import ndimage as ndi
    from skimage import morphology
    mask = np.asarray(mask, dtype=bool)
    area = disk_area(diameter)
    radius = max(1, int(round(diameter / 12)))
    mask = ndi.binary_opening(mask, structure=morphology.disk(radius))
    mask = morphology.remove_small_holes(mask, area_threshold=max(1, int(area // 2)))
    mask = morphology.remove_small_objects(mask, min_size=max(1, int(min_fraction * area)))
    return mask


def slab_mask(mask, diameter, thickness=0.75):
    """The regions of `mask` that hold a solid disc of radius `thickness` × diameter (distance-transform
    maximum above it), dilated by one diameter; boolean mask.

    Particles, alone or touching in a crowd, are never thicker than about one radius from their
    outline; carbon films, thick ice and contamination are. Clustering puts them in the particle
    cluster (after inversion they are the most contrasted objects), and the pieces their noisy edges break
    into pass the shape selection as "good particles" — on simulated micrographs with a carbon edge the
    classifier learnt the carbon. The dilation covers those edge pieces.
    """
    from scipy import ndimage as ndi
    from skimage.measure import label
    mask = np.asarray(mask, dtype=bool)
    dist = ndi.distance_transform_edt(mask)
    thick = dist > thickness * diameter
    if not thick.any():
        return np.zeros_like(mask)
    lab = label(mask)
    slabs = np.isin(lab, np.unique(lab[thick]))
    return ndi.binary_dilation(slabs, iterations=max(1, int(round(diameter))))


def candidate_regions(mask, diameter, split_above=1.6):
    """Measure each region of a cleaned mask; split blobs larger than `split_above` particles.

    Returns a list of dicts: x, y (centroid, or distance-transform peak of a split blob), area, circularity
    (4πA/P²), solidity, axis_ratio (minor/major), feret (max Feret diameter), merged (True when the region
    was split or is larger than split_above particles), label (region id in the mask).
    """
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.measure import label, regionprops
    lab = label(np.asarray(mask, dtype=bool))
    area_1 = disk_area(diameter)
    out = []
    for rp in regionprops(lab):
        perim = max(rp.perimeter, 1.0)
        base = dict(area=float(rp.area), circularity=float(min(1.0, 4 * np.pi * rp.area / perim ** 2)),
                    solidity=float(rp.solidity), feret=float(rp.feret_diameter_max),
                    axis_ratio=float(rp.minor_axis_length / max(rp.major_axis_length, 1e-6)),
                    label=int(rp.label))
        if rp.area <= split_above * area_1:
            cy, cx = rp.centroid
            out.append(dict(base, x=float(cx), y=float(cy), merged=False))
            continue
        y0, x0, y1, x1 = rp.bbox
        dist = ndi.distance_transform_edt(np.pad(rp.image, 1))[1:-1, 1:-1]
        peaks = peak_local_max(dist, min_distance=max(1, int(0.35 * diameter)),
                               threshold_abs=0.35 * diameter, exclude_border=False)
        if len(peaks) == 0:
            cy, cx = rp.centroid
            peaks_xy = [(cx, cy)]
        else:
            peaks_xy = [(x0 + px, y0 + py) for py, px in peaks]
        for px, py in peaks_xy:
            out.append(dict(base, x=float(px), y=float(py), merged=True))
    return out


def select_good(regions, diameter, shape='irregular'):
    """Flag regions that look like one isolated particle; returns a boolean array.

    Area within 0.5–1.6× the mean area of the unmerged regions (and 0.3–2× the expected disk), solidity
    ≥ 0.85; round views also need circularity ≥ 0.7 and axis ratio ≥ 0.75; square views a Feret diameter
    within 15 % of a square's diagonal (√(2A)) and axis ratio ≥ 0.75.
    """
    if shape not in SHAPES:
        raise InputError('shape', f"unknown particle shape '{shape}' ({', '.join(SHAPES)})")
    if not regions:
        return np.zeros(0, bool)
    area = np.array([r['area'] for r in regions])
    merged = np.array([r['merged'] for r in regions])
    single = area[~merged]
    mean_area = float(single.mean()) if len(single) else disk_area(diameter)
    rel = area / mean_area
    expected = area / disk_area(diameter)
    good = (~merged) & (rel >= 0.5) & (rel <= 1.6) & (expected >= 0.3) & (expected <= 2.0)
    good &= np.array([r['solidity'] for r in regions]) >= 0.85
    axis = np.array([r['axis_ratio'] for r in regions])
    if shape == 'round':
        good &= (np.array([r['circularity'] for r in regions]) >= 0.7) & (axis >= 0.75)
    elif shape == 'square':
        feret = np.array([r['feret'] for r in regions])
        good &= (np.abs(feret / np.sqrt(2 * area) - 1) <= 0.15) & (axis >= 0.75)
    return good


def hough_centres(mask, diameter, min_votes=0.35):
    """Centres (N, 2) x, y of round particles: circular Hough transform of the mask outline, radii
    0.35–0.65 of the diameter, peaks at least 0.6·diameter apart."""
    from scipy import ndimage as ndi
    from skimage.transform import hough_circle, hough_circle_peaks
    mask = np.asarray(mask, dtype=bool)
    outline = mask & ~ndi.binary_erosion(mask)
    radii = np.unique(np.clip(np.round(np.linspace(0.35, 0.65, 7) * diameter), 2, None).astype(int))
    acc = hough_circle(outline, radii, normalize=True)
    d = max(1, int(0.6 * diameter))
    _, cx, cy, _ = hough_circle_peaks(acc, radii, min_xdistance=d, min_ydistance=d, threshold=min_votes)
    return np.stack([cx, cy], axis=1).astype(float) if len(cx) else np.zeros((0, 2))
