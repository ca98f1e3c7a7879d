"""Contrast transfer function of a transmission electron microscope (weak-phase approximation).

Conventions (those of RELION):

- defocus is given in µm and is POSITIVE FOR UNDERFOCUS, the usual imaging condition;
- the phase aberration is χ(k) = π λ Δf k² − (π/2) Cs λ³ k⁴, k the spatial frequency in 1/Å;
- CTF(k) = √(1 − A²) sin χ + A cos χ, A the amplitude contrast. It is positive (≈ A) at low frequency:
  it transfers positive projected density as positive image values, i.e. the contrast of an image whose
  particles are bright. A raw micrograph shows particles dark; the simulators multiply by −1 for that.
- an optional B-factor envelope exp(−B k² / 4) damps high frequencies.
"""
import numpy as np


def electron_wavelength(voltage_kv):
    """Relativistic electron wavelength in Å at an acceleration voltage in kV."""
    v = float(voltage_kv) * 1e3
    return 12.2643247 / np.sqrt(v * (1.0 + 0.978466e-6 * v))


def ctf_1d(freq, defocus_um, voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.07, bfactor=0.0):
    """CTF at spatial frequencies `freq` (1/Å, any array shape); see the module docstring."""
    k2 = np.square(np.asarray(freq, dtype=np.float64))
    lam = electron_wavelength(voltage_kv)
    dz = float(defocus_um) * 1e4  # Å
    cs = float(cs_mm) * 1e7  # Å
    chi = np.pi * lam * dz * k2 - 0.5 * np.pi * cs * lam ** 3 * k2 * k2
    a = float(amplitude_contrast)
    ctf = np.sqrt(1.0 - a * a) * np.sin(chi) + a * np.cos(chi)
    if bfactor:
        ctf = ctf * np.exp(-float(bfactor) * k2 / 4.0)
    return ctf


def frequency_grid(shape, pixel_size_A):
    """|k| in 1/Å on the unshifted FFT grid (np.fft.fftfreq layout) of an array of `shape` (any ndim)."""
    axes = [np.fft.fftfreq(int(n), d=float(pixel_size_A)) for n in shape]
    k2 = np.zeros(tuple(int(n) for n in shape))
    for i, f in enumerate(axes):
        k2 = k2 + np.square(f).reshape([-1 if j == i else 1 for j in range(len(shape))])
    return np.sqrt(k2)


def ctf_2d(shape, pixel_size_A, defocus_um, voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.07,
           bfactor=0.0):
    """Real CTF on the unshifted FFT grid of a (y, x) image; multiply ``np.fft.fft2(image)`` by it.

    defocus_um > 0 is underfocus. Works for any ``shape`` length (a 3D shape gives the isotropic 3D
    version, |k| in all three directions).
    """
    return ctf_1d(frequency_grid(shape, pixel_size_A), defocus_um, voltage_kv, cs_mm, amplitude_contrast,
                  bfactor)


def ctf_zeros(defocus_um, pixel_size_A=None, voltage_kv=300.0, cs_mm=2.7, n=5, amplitude_contrast=0.07):
    """Spatial frequencies (1/Å, increasing) of the first `n` zeros of the CTF for an underfocus.

    Zeros are where χ(k) = mπ − atan(A/√(1 − A²)), m = 1, 2, ... (solved as a quadratic in k²). With a
    pixel size, only the zeros below Nyquist (1 / (2·pixel)) are returned, so the array may be shorter.
    """
    lam = electron_wavelength(voltage_kv)
    dz = float(defocus_um) * 1e4
    cs = float(cs_mm) * 1e7
    a = float(amplitude_contrast)
    phase = np.arctan2(a, np.sqrt(1.0 - a * a))
    zeros = []
    m = 1
    while len(zeros) < n:
        target = m * np.pi - phase
        # (π/2)·Cs·λ³·u² − π·λ·Δf·u + target = 0 with u = k²; the smaller root is the branch where χ
        # still grows with k (before the spherical-aberration term turns it back).
        qa, qb = 0.5 * np.pi * cs * lam ** 3, -np.pi * lam * dz
        disc = qb * qb - 4 * qa * target
        if disc < 0:
            break
        u = (-qb - np.sqrt(disc)) / (2 * qa) if qa > 0 else target / (-qb)
        if u <= 0:
            break
        k = float(np.sqrt(u))
        if pixel_size_A and k > 0.5 / float(pixel_size_A):
            break
        zeros.append(k)
        m += 1
    return np.array(zeros)
