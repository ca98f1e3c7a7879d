"""Helpers shared by the pipeline scripts: projects, running protocols, reporting.

Works the same under `scipion3 python script.py` (Scipion's own environment) and with the plugin's
venv Python (the package sets up a headless Scipion when imported first).
"""
import os
import re
import threading
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


def run(project, protocol_class, label=None, follow=None, **params):
    """Create, launch and wait for a protocol; raise PipelineError with its message if it fails.

    follow: a callable given each line the protocol's cryopick jobs log while it runs (their progress,
    ETA, device and precision), with the timestamp and logger name stripped; None to stay quiet."""
    prot = project.newProtocol(protocol_class, **params)
    if label:
        prot.setObjLabel(label)
    started = time.time()
    if follow is None:
        project.launchProtocol(prot, wait=True)
    else:
        _launch_following(project, prot, follow)
    prot = project.getProtocol(prot.getObjId())
    if not prot.isFinished():
        raise PipelineError(f"{prot.getRunName()} failed: {prot.getErrorMessage() or prot.getStatus()}"
                            f" (logs: {os.path.join(project.getPath(), prot.getLogPaths()[0])})")
    prot._cryopickSeconds = time.time() - started
    return prot


# "2026-12-05 23:53:12,514 cryopick_plugin.engine.pick3d.training INFO: message" -> "message"
_ENGINE_LOG_LINE = re.compile(r'^\S+ \S+ cryopick_plugin\.\S+ (?:INFO|WARNING|ERROR): (.*)$')


def _launch_following(project, prot, follow, poll_s=1.0):
    """Launch and wait (in a thread), meanwhile passing the engine's log lines of the run to `follow`.

    cryopick jobs log through Python's logging to the run's stderr file, which Scipion writes as the job
    runs; it is read from where the last poll stopped."""
    launcher = threading.Thread(target=project.launchProtocol, args=(prot,), kwargs={'wait': True}, daemon=True)
    launcher.start()
    path, offset, partial = None, 0, ''
    while True:
        finished = not launcher.is_alive()
        if path is None:
            logs = prot.getLogPaths() if prot.getObjId() else []
            path = os.path.join(project.getPath(), logs[1]) if len(logs) > 1 else None
        if path and os.path.exists(path):
            with open(path, errors='replace') as fh:
                fh.seek(offset)
                chunk = fh.read()
                offset = fh.tell()
            lines = (partial + chunk).split('\n')
            partial = lines.pop()
            for line in lines:
                found = _ENGINE_LOG_LINE.match(line.strip())
                if found:
                    follow(found.group(1))
        if finished:
            return
        launcher.join(poll_s)


def describe(prot):
    """One line per output of a finished protocol: name, class and size."""
    lines = []
    for name, output in prot.iterOutputAttributes():
        size = output.getSize() if hasattr(output, 'getSize') else ''
        lines.append(f"  {name}: {type(output).__name__}" + (f" ({size} items)" if size != '' else ''))
    return lines
