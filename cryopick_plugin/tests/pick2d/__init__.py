"""Tests of engine/pick2d (micrograph I/O and preprocessing, DeepCryoPicker, CryoSegNet)."""
