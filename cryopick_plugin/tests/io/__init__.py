"""Tests of engine/io (MRC, STAR, model files, RELION exports run through RELION itself)."""
