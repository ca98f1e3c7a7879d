"""Tests of engine/pick3d (DeepETPicker)."""
