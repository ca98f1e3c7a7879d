"""Helpers shared by the pipeline scripts: projects, running protocols, reporting.

Works the same under `scipion3 python script.py` (Scipion's own environment) and with the plugin's
venv Python (the package sets up a headless Scipion when imported first).
"""
import json
import os
import re
import threading
import time

import cryopick_plugin  # noqa: F401  (sets up a headless Scipion when needed, before pyworkflow loads)
from pyworkflow.project import Manager


class PipelineError(RuntimeError):
    """A protocol of a pipeline failed; the message is the protocol's own error."""


# The queue of hosts.conf that cryopick protocols go to ((name, parameters) or None: run here); see use_queue.
_QUEUE = None


def add_queue_args(parser):
    """--queue / --queue-params: send the pipeline's cryopick protocols to a queue of hosts.conf."""
    group = parser.add_argument_group('cluster (a hosts.conf from `cryopick cluster-config`)')
    group.add_argument('--queue', metavar='NAME',
                       help='run every cryopick protocol through this queue of hosts.conf (a SLURM partition) '
                            'instead of on this machine; imports and set filters still run here')
    group.add_argument('--queue-params', metavar='JSON',
                       help='queue parameters, e.g. \'{"JOB_MEMORY": "32G", "JOB_TIME": "4", "QUEUE_FOR_JOBS": "Y"}\' '
                            '(default: the queue\'s defaults in hosts.conf)')


def use_queue(name, params_json=None):
    """Send the cryopick protocols that `run` launches from now on to queue `name` of Scipion's hosts.conf
    (None: run them here). Checked at once: the queue must exist and the parameters must be a JSON object."""
    global _QUEUE
    if not name:
        if params_json:
            raise PipelineError('--queue-params needs --queue NAME')
        _QUEUE = None
        return None
    import pyworkflow as pw
    from pyworkflow.protocol.hosts import HostConfig
    try:
        params = json.loads(params_json) if params_json else {}
    except ValueError as e:
        raise PipelineError(f'--queue-params: not JSON ({e})') from None
    if not isinstance(params, dict):
        raise PipelineError(f'--queue-params: expected a JSON object such as {{"JOB_MEMORY": "16G"}}, got {params_json}')
    hosts_file = pw.Config.SCIPION_HOSTS
    host = HostConfig.load(hosts_file).get('localhost') if os.path.exists(hosts_file) else None
    queues = dict(host.getQueueSystem().getQueues() or {}) if host and host.getQueueSystem().hasName() else {}
    if name not in queues:
        raise PipelineError(f"{hosts_file}: no queue '{name}' (queues: {', '.join(queues) or 'none'}); write one "
                            f"with `cryopick cluster-config --partition {name} > {hosts_file}`")
    # The form's defaults for that queue, then what was asked for.
    values = {var: default for var, default, *_ in queues[name]}
    values.update({k: str(v) for k, v in params.items()})
    _QUEUE = (name, values)
    return _QUEUE


def queue_protocol(prot):
    """Mark a cryopick protocol for the queue chosen with use_queue (others always run here)."""
    if _QUEUE and type(prot).__module__.startswith('cryopick_plugin.'):
        prot._useQueue.set(True)
        prot.setQueueParams([_QUEUE[0], dict(_QUEUE[1])])


def wait_queued(project, prot, poll_s=2.0):
    """Wait until a protocol sent to the queue as one job has left it (launchProtocol returns once it is
    submitted); the job's state comes back through the protocol's own database."""
    while prot.useQueue() and prot.isActive():
        time.sleep(poll_s)
        project._updateProtocol(prot)


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
    queue_protocol(prot)
    started = time.time()
    if follow is None:
        project.launchProtocol(prot, wait=True)
        wait_queued(project, prot)
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
        if finished and prot.useQueue():
            project._updateProtocol(prot)
            finished = not prot.isActive()
        if path is None:
            # The run's folder is known only once the launch has saved the protocol: ask until the file exists.
            logs = prot.getLogPaths() if prot.getObjId() else []
            found = os.path.join(project.getPath(), logs[1]) if len(logs) > 1 else None
            path = found if found and os.path.exists(found) else None
        if path:
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
