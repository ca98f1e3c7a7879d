"""Run the demo pipeline in a new Scipion project.

Simulates a few small tomograms from real macromolecule density maps, imports them into a new Scipion
project with scipion-em-tomo, imports their ground truth as a SetOfCoordinates3D, and reports what it made
and where. The project can then be opened in the Scipion GUI.
"""
from cryopick_plugin.workflows import demo as _demo


def add_args(parser):
    _demo.add_args(parser)


def main(args):
    return _demo.main(args)
