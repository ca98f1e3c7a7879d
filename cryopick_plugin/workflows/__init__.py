"""Scripts that build whole cryopick pipelines in a new Scipion project."""
