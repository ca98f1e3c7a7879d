"""Rotations in RELION's Euler convention and the (z, y, x) array frame.

RELION's (rot, tilt, psi) give the matrix A = Rz(psi)·Ry(tilt)·Rz(rot) written with passive rotations,
the transpose of the active intrinsic ZYZ rotation Rz(rot)·Ry(tilt)·Rz(psi). Measured with
`relion_reconstruct --3d_rot` (see tests/io/test_relion.py), a subtomogram at those angles is, for positions
x (x, y, z order, relative to the box centre), ``particle(x) = reference(Aᵀ x)``: the reference rotated
actively by A. Use `particle_from_reference` / `reference_from_particle` rather than `rotate_volume` with
a hand-picked matrix, so every module follows that one convention.
"""
import numpy as np
from scipy.spatial.transform import Rotation


def euler_to_matrix(rot, tilt, psi):
    """RELION's A (3×3, acting on x, y, z column vectors) from angles in degrees."""
    return Rotation.from_euler('ZYZ', [rot, tilt, psi], degrees=True).as_matrix().T


def matrix_to_euler(matrix):
    """(rot, tilt, psi) in degrees of RELION's A matrix."""
    return tuple(Rotation.from_matrix(np.asarray(matrix).T).as_euler('ZYZ', degrees=True))


def random_eulers(n, rng):
    """`n` orientations uniformly distributed over SO(3), as RELION (rot, tilt, psi) rows in degrees."""
    rots = Rotation.random(n, random_state=rng)
    return np.atleast_2d(rots.inv().as_euler('ZYZ', degrees=True)) if n else np.zeros((0, 3))


def rotate_volume(volume, matrix, order=1, cval=0.0):
    """Resample a (z, y, x) volume as out(x) = volume(matrix · x) about the box centre (x, y, z frame).

    `particle_from_reference` and `reference_from_particle` apply it with RELION's convention.
    """
    from scipy.ndimage import affine_transform
    volume = np.asarray(volume, dtype=np.float32)
    # Reorder the x, y, z matrix to the array's z, y, x axes.
    perm = np.array([2, 1, 0])
    m_zyx = np.asarray(matrix)[np.ix_(perm, perm)]
    centre = (np.array(volume.shape) - 1) / 2.0
    offset = centre - m_zyx @ centre
    return affine_transform(volume, m_zyx, offset=offset, order=order, mode='constant', cval=cval)


def particle_from_reference(reference, rot, tilt, psi, order=1, cval=0.0):
    """The reference as it appears in a tomogram at RELION angles (rot, tilt, psi): reference(Aᵀ x)."""
    return rotate_volume(reference, euler_to_matrix(rot, tilt, psi).T, order=order, cval=cval)


def reference_from_particle(particle, rot, tilt, psi, order=1, cval=0.0):
    """A particle at RELION angles (rot, tilt, psi) turned back into the reference frame: particle(A y)."""
    return rotate_volume(particle, euler_to_matrix(rot, tilt, psi), order=order, cval=cval)


def wedge_mask(shape, tilt_range):
    """Boolean Fourier mask (unshifted fftfreq grid, axes z y x) of what a ±tilt_range series samples.

    Tilt axis Y, beam along Z (the usual tomogram and subtomogram orientation): a component is sampled
    when |kz| ≤ |kx|·tan(tilt_range); the rest is the missing wedge. ky is unrestricted.
    """
    nz, ny, nx = shape
    kz = np.abs(np.fft.fftfreq(nz)).reshape(-1, 1, 1)
    kx = np.abs(np.fft.fftfreq(nx)).reshape(1, 1, -1)
    inside = kz <= kx * np.tan(np.deg2rad(tilt_range)) + 1e-9
    return np.broadcast_to(inside, tuple(shape))
