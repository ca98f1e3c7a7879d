"""DISCA — template-free candidates and unsupervised clustering of subtomograms: DoG picking (`dog`), extraction
(`extract`), the YOPO network (`yopo`), the EM loop (`em`, `mixtures`, `features`), the post-hoc checks and
refinement (`checks`), model files and prediction (`model`), and a non-deep baseline (`baseline`)."""
