"""2D micrograph preprocessing: single steps and the CryoSegNet and DeepCryoPicker chains.

Every step takes and returns a float32 (y, x) image. A chain is an ordered list of named steps, each of
which can be switched off; `run_chain` runs one and can keep every intermediate image for a viewer.

No step flips the image. CryoSegNet's reader flips MRCs vertically (an I/O quirk of its code); here the
output keeps the input's frame, so picks made on a processed image are in the pixels of the array that
`micrograph_io.read_micrograph` returned (x = column, y = row).

CryoSegNet chain (`cryosegnet_chain`), after the reference's `denoise`:
  blur      Gaussian blur 9×9 (σ from the kernel size, ≈ 1.7), then z-score → min–max to 0..255
  nlmeans   OpenCV fastNlMeansDenoising, h = 10, template 7, search 21 (on uint8)
  wiener    Wiener deconvolution by a 9×9 Gaussian PSF (σ = 3) with noise-to-signal balance 30 — the
            reference's constant. With so large a balance the filter is ≈ conj(PSF)/30, a Gaussian
            smoothing, not a sharpening; the PSF here is centred (the reference pads it at the array
            corner, which shifts its output by about 4 px) and the image is mirror-padded first.
  clahe     OpenCV CLAHE, clip limit 2, 16×16 tiles
  guided    guided filter (box 20, ε = 0.1 on [0, 1] images) of the CLAHE image, guided by the Wiener
            image; cv2.ximgproc is not in the headless OpenCV wheel, so it is built from cv2.boxFilter
  → min–max to float32 [0, 1].

DeepCryoPicker chain (`deepcryopicker_chain`), after AutoCryoPicker's MATLAB demo:
  normalise         min–max to [0, 1] (mat2gray)
  contrast_stretch  saturate 1 % at each end (imadjust(stretchlim))
  hist_eq           global histogram equalisation (histeq)
  wiener            adaptive local Wiener filter 5×5 (wiener2), then histeq again when hist_eq is on
  clahe             CLAHE clip 0.02, then 0.99 (adapthisteq twice; skimage has no Rayleigh target)
  guided            self-guided filter ×4 (box 5, ε = 0.01, imguidedfilter defaults), then stretch
  morphology        grey opening with a radius-1 disk ×5 (imopen(strel('disk',1)) ×5)
  → float32 [0, 1].

Speed (4096² on one CPU core): NL-means dominates the CryoSegNet chain; pass ``bin_factor`` to
`run_chain` to work on a downsampled micrograph (see bench/README.md, section 3, for measured times).
"""
import numpy as np

from ..errors import InputError
from .micrograph_io import downsample, to_uint8

# ------------------------------------------------------------------------------------------ single steps


def minmax01(image):
    """Min–max to float32 [0, 1] (a constant image gives zeros)."""
    image = np.asarray(image, dtype=np.float32)
    lo, hi = float(image.min()), float(image.max())
    if hi <= lo:
        return np.zeros(image.shape, np.float32)
    return (image - lo) / (hi - lo)


def gaussian_blur(image, ksize=9, sigma=0.0):
    """OpenCV Gaussian blur with a ksize×ksize kernel (sigma 0: OpenCV derives it from ksize)."""
    import cv2
    return cv2.GaussianBlur(np.asarray(image, np.float32), (ksize, ksize), sigma,
                            borderType=cv2.BORDER_REFLECT_101)


def zscore_to_uint8_range(image):
    """Z-score, then min–max to 0..255 (float32 holding uint8 values), as CryoSegNet's standard_scaler."""
    image = np.asarray(image, dtype=np.float32)
    std = float(image.std())
    z = (image - float(image.mean())) / (std if std > 0 else 1.0)
    return to_uint8(z).astype(np.float32)


def nlmeans(image, h=10.0, template_window=7, search_window=21):
    """OpenCV fast non-local means on the image scaled to uint8; returns float32 in 0..255."""
    import cv2
    u8 = _as_uint8(image)
    return cv2.fastNlMeansDenoising(u8, None, h=float(h), templateWindowSize=int(template_window),
                                    searchWindowSize=int(search_window)).astype(np.float32)


def _as_uint8(image):
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    lo, hi = float(image.min()), float(image.max())
    if lo >= 0 and hi <= 255:
        return np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return to_uint8(image)


def gaussian_psf(size=9, sigma=3.0):
    """Normalised size×size Gaussian kernel (outer product of 1D Gaussians)."""
    from scipy.signal.windows import gaussian
    g = gaussian(size, sigma)
    psf = np.outer(g, g)
    return (psf / psf.sum()).astype(np.float64)


def wiener_deconvolve(image, psf=None, balance=30.0):
    """Wiener deconvolution with a constant noise-to-signal ratio `balance`.

    Filter conj(H) / (|H|² + balance) in Fourier space, H the transfer function of the (centred) `psf`
    (default 9×9 Gaussian, σ = 3). Small balance (≈ 0.01) sharpens a blur by that PSF; large balance
    smooths. The image is mirror-padded by the PSF size so the circular FFT does not wrap edges together.
    The output keeps the input's scale up to the factor of the filter (callers rescale).
    """
    image = np.asarray(image, dtype=np.float32)
    psf = gaussian_psf() if psf is None else np.asarray(psf, dtype=np.float64)
    pad = max(psf.shape)
    padded = np.pad(image, pad, mode='reflect')
    H, W = padded.shape
    kernel = np.zeros((H, W), np.float64)
    kh, kw = psf.shape
    kernel[:kh, :kw] = psf
    # Centre the PSF on pixel (0, 0) so the filter introduces no shift.
    kernel = np.roll(kernel, (-(kh // 2), -(kw // 2)), axis=(0, 1))
    transfer = np.fft.rfft2(kernel)
    filt = np.conj(transfer) / (np.abs(transfer) ** 2 + float(balance))
    out = np.fft.irfft2(np.fft.rfft2(padded) * filt, s=(H, W))
    return out[pad:pad + image.shape[0], pad:pad + image.shape[1]].astype(np.float32)


def clahe(image, clip_limit=2.0, tiles=16):
    """OpenCV CLAHE on the min–max uint8 copy; returns float32 in 0..255."""
    import cv2
    op = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(int(tiles), int(tiles)))
    return op.apply(to_uint8(image)).astype(np.float32)


def guided_filter(image, guide=None, box=20, eps=0.1):
    """Guided filter (He et al. 2013) built from box filters; `image` and `guide` are float images.

    With guide = None the image guides itself (edge-preserving smoothing). `box` is the width of the
    averaging window in pixels and `eps` the regularisation, in the units of the squared intensities.
    """
    import cv2
    p = np.asarray(image, dtype=np.float32)
    g = p if guide is None else np.asarray(guide, dtype=np.float32)
    size = (int(box), int(box))

    def mean(a):
        return cv2.boxFilter(a, cv2.CV_32F, size, borderType=cv2.BORDER_REFLECT)

    mean_g, mean_p = mean(g), mean(p)
    var_g = mean(g * g) - mean_g * mean_g
    cov_gp = mean(g * p) - mean_g * mean_p
    a = cov_gp / (var_g + float(eps))
    b = mean_p - a * mean_g
    return (mean(a) * g + mean(b)).astype(np.float32)


def contrast_stretch(image, low=1.0, high=99.0):
    """Saturate `low` % and `100 - high` % of the pixels and rescale to [0, 1] (MATLAB stretchlim)."""
    image = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(image, [low, high])
    if hi <= lo:
        return minmax01(image)
    return np.clip((image - lo) / (hi - lo), 0, 1).astype(np.float32)


def hist_equalise(image):
    """Global histogram equalisation to [0, 1] (256 bins, like MATLAB histeq)."""
    from skimage import exposure
    return exposure.equalize_hist(minmax01(image), nbins=256).astype(np.float32)


def adaptive_wiener(image, size=5):
    """Local adaptive Wiener filter (MATLAB wiener2) with a size×size window."""
    from scipy.signal import wiener
    image = np.asarray(image, dtype=np.float64)
    with np.errstate(divide='ignore', invalid='ignore'):
        out = wiener(image, (size, size))
    return np.nan_to_num(out, nan=float(image.mean())).astype(np.float32)


def adaptive_hist_equalise(image, clip_limit=0.02):
    """Contrast-limited adaptive histogram equalisation (skimage, 8×8 tiles like adapthisteq)."""
    from skimage import exposure
    img = minmax01(image)
    kernel = (max(2, img.shape[0] // 8), max(2, img.shape[1] // 8))
    return exposure.equalize_adapthist(img, kernel_size=kernel, clip_limit=float(clip_limit)).astype(np.float32)


def grey_opening(image, radius=1, repeats=5):
    """Grey-level opening with a disk of `radius`, repeated (removes bright specks smaller than the disk)."""
    import cv2
    k = 2 * int(radius) + 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    out = np.asarray(image, dtype=np.float32)
    for _ in range(int(repeats)):
        out = cv2.morphologyEx(out, cv2.MORPH_OPEN, kernel)
    return out


# ------------------------------------------------------------------------------------------------ chains

CHAINS = ('cryosegnet', 'deepcryopicker')
CRYOSEGNET_SWITCHES = ('blur', 'nlmeans', 'wiener', 'clahe', 'guided')
DEEPCRYOPICKER_SWITCHES = ('normalise', 'contrast_stretch', 'hist_eq', 'wiener', 'clahe', 'guided',
                           'morphology')


def _cryosegnet_stages(image, blur=True, nlmeans_=True, wiener=True, clahe_=True, guided=True):
    stages = []
    img = np.asarray(image, dtype=np.float32)
    if blur:
        img = gaussian_blur(img, 9)
        stages.append(('blur', img))
    img = zscore_to_uint8_range(img)
    stages.append(('normalise', img))
    if nlmeans_:
        img = nlmeans(img, 10, 7, 21)
        stages.append(('nlmeans', img))
    if wiener:
        img = to_uint8(wiener_deconvolve(img, gaussian_psf(9, 3.0), balance=30.0)).astype(np.float32)
        stages.append(('wiener', img))
    guide = img
    if clahe_:
        img = clahe(img, 2.0, 16)
        stages.append(('clahe', img))
    if guided:
        img = guided_filter(img / 255.0, guide / 255.0, box=20, eps=0.1)
        stages.append(('guided', img))
    img = minmax01(img)
    stages.append(('result', img))
    return img, stages


def cryosegnet_chain(image, blur=True, nlmeans=True, wiener=True, clahe=True, guided=True):
    """CryoSegNet's denoising chain (see the module docstring); float32 (y, x) image → float32 [0, 1]."""
    return _cryosegnet_stages(image, blur, nlmeans, wiener, clahe, guided)[0]


def _deepcryopicker_stages(image, normalise=True, contrast_stretch_=True, hist_eq=True, wiener=True,
                           clahe_=True, guided=True, morphology=True):
    stages = []
    img = np.asarray(image, dtype=np.float32)
    if normalise:
        img = minmax01(img)
        stages.append(('normalise', img))
    if contrast_stretch_:
        img = contrast_stretch(img)
        stages.append(('contrast_stretch', img))
    if hist_eq:
        img = hist_equalise(img)
        stages.append(('hist_eq', img))
    if wiener:
        img = adaptive_wiener(img, 5)
        if hist_eq:
            img = hist_equalise(img)
        stages.append(('wiener', img))
    if clahe_:
        img = adaptive_hist_equalise(img, 0.02)
        img = adaptive_hist_equalise(img, 0.99)
        stages.append(('clahe', img))
    if guided:
        img = minmax01(img)
        for _ in range(4):
            img = guided_filter(img, None, box=5, eps=0.01)
        img = contrast_stretch(img)
        stages.append(('guided', img))
    if morphology:
        img = grey_opening(img, 1, 5)
        stages.append(('morphology', img))
    img = minmax01(img)
    stages.append(('result', img))
    return img, stages


def deepcryopicker_chain(image, normalise=True, contrast_stretch=True, hist_eq=True, wiener=True,
                         clahe=True, guided=True, morphology=True):
    """AutoCryoPicker / DeepCryoPicker preprocessing (see the module docstring) → float32 [0, 1]."""
    return _deepcryopicker_stages(image, normalise, contrast_stretch, hist_eq, wiener, clahe, guided,
                                  morphology)[0]


def run_chain(image, chain='cryosegnet', keep_stages=False, bin_factor=1, **switches):
    """Run a chain with its switches; return (result, [(stage name, image), ...]).

    bin_factor > 1 first downsamples the image by area averaging (see `micrograph_io.downsample`); the
    result then has the downsampled shape. The stage list holds 'input' (after binning) and every step
    that ran when keep_stages is True, and is empty otherwise.
    """
    known = {'cryosegnet': CRYOSEGNET_SWITCHES, 'deepcryopicker': DEEPCRYOPICKER_SWITCHES}
    if chain not in known:
        raise InputError('chain', f"unknown chain '{chain}' (cryosegnet or deepcryopicker)")
    unknown = set(switches) - set(known[chain])
    if unknown:
        raise InputError('chain', f"unknown switch(es) {sorted(unknown)} for the {chain} chain; "
                                  f"known: {', '.join(known[chain])}")
    flags = {k: bool(switches.get(k, True)) for k in known[chain]}
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise InputError('image', f"expected a 2D image, got shape {image.shape}")
    if bin_factor and float(bin_factor) > 1:
        image = downsample(image, float(bin_factor))
    if chain == 'cryosegnet':
        result, stages = _cryosegnet_stages(image, *[flags[k] for k in CRYOSEGNET_SWITCHES])
    else:
        result, stages = _deepcryopicker_stages(image, *[flags[k] for k in DEEPCRYOPICKER_SWITCHES])
    stages = [('input', image)] + stages if keep_stages else []
    return result, stages
