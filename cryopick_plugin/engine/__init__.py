"""Numerical engine of cryopick.

Everything under this package works on numpy arrays, torch tensors and plain files (MRC, STAR). It never
imports pyworkflow, pwem or tomo, so each stage can be run, timed and debugged outside Scipion through the
`cryopick` command. Array axis order is (z, y, x); coordinates in files are x, y, z in voxels (pixels) of
the volume (micrograph) they refer to, with the origin at the first voxel.

One folder per method (`pick3d/` DeepETPicker, `disca/` DISCA with DoG candidates and extraction, `pick2d/`
DeepCryoPicker and CryoSegNet), `sim/` for the simulators and `io/` for file formats; `evaluate`, `settings`,
`errors` and `geometry` (rotations, missing wedge) are shared by all.
"""
