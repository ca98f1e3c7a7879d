"""File formats: MRC volumes (memory-mapped, atomic writes), RELION STAR coordinate tables, cryopick model
files (weights + hyperparameters in one file), and RELION 3.1 subtomogram / particle exports."""
