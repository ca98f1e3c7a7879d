"""2D micrograph picking: reading and preprocessing shared by both pickers (`micrograph_io`, `preprocess`,
`picks`, the β-galactosidase example data in `betagal`); DeepCryoPicker in `deepcryopicker/`, CryoSegNet in `cryosegnet/`."""
