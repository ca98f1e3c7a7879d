"""Helpers shared by the pipeline scripts: projects, running protocols, reporting.

Works the same under `scipion3 python script.py` (Scipion's own environment) and with the plugin's
venv Python (the package sets up a headless Scipion when imported first).
"""
import os
import time

import cryopick_plugin  # noqa: F401  (sets up a headless Scipion when needed, before pyworkflow loads)
from pyworkflow.project import Manager


class PipelineError(RuntimeError):
    """A protocol of a pipeline failed; the message is the protocol's own error."""


def new_project(name, overwrite=False):
    """Create a Scipion project (in SCIPION_USER_DATA/projects); replace an old one only if asked."""
    manager = Manager()
    if manager.hasProject(name):
        if not overwrite:
            name = f"{name}_{time.strftime('%Y%m%d_%H%M%S')}"
        else:
            manager.deleteProject(name)
    project = manager.createProject(name)
    # A project works from its own folder (its database path is relative), as in Scipion's GUI and tests.
    os.chdir(project.getPath())
    return project


def run(project, protocol_class, label=None, **params):
    """Create, launch and wait for a protocol; raise PipelineError with its message if it fails."""
    prot = project.newProtocol(protocol_class, **params)
    if label:
        prot.setObjLabel(label)
    started = time.time()
    project.launchProtocol(prot, wait=True)
    prot = project.getProtocol(prot.getObjId())
    if not prot.isFinished():
        raise PipelineError(f"{prot.getRunName()} failed: {prot.getErrorMessage() or prot.getStatus()}"
                            f" (logs: {os.path.join(project.getPath(), prot.getLogPaths()[0])})")
    prot._cryopickSeconds = time.time() - started
    return prot


def describe(prot):
    """One line per output of a finished protocol: name, class and size."""
    lines = []
    for name, output in prot.iterOutputAttributes():
        size = output.getSize() if hasattr(output, 'getSize') else ''
        lines.append(f"  {name}: {type(output).__name__}" + (f" ({size} items)" if size != '' else ''))
    return lines
