"""Tests of engine/sim (the simulators)."""
