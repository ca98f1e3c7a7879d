"""3D picking of three tomograms here and through SLURM: wall time and queue overhead per job.

Starts a private single-node SLURM (cryopick_plugin/tests/cluster/start_slurm.sh; needs root and the
slurm-wlm / munge packages), writes the hosts.conf of `cryopick cluster-config`, and in a throw-away
Scipion project runs the same DeepETPicker picking protocol (CPU-preset network, random weights: the
speed does not depend on them) on three tomograms of --shape, one thread per engine command in all modes:

  here      the protocol on this machine, steps one after another
  per-step  one SLURM job per tomogram (QUEUE_FOR_JOBS=Y; one job at a time, one CPU each)
  whole     the whole protocol as one SLURM job (one CPU)

For each mode: the protocol's wall time from launch to finished, the engine commands' own wall time
(from the usage lines the protocol logs), and where the rest goes: per step, the step's duration in the
log minus its command's own time (for a step sent to SLURM: sbatch, scheduling, the job's start and
Scipion's polling of squeue), and outside the steps, the wall time minus the span from the first step's
start to the last one's end (the protocol process starting and registering the output; for a whole
protocol sent to SLURM also its job's submission and end). Each mode runs --repeat times; the table gives
medians.

  sudo .venv/bin/python bench/bench_cluster.py --shape 64 256 256 --repeat 2 --out bench/results/cluster.json
"""
import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CLUSTER = os.path.join(REPO, 'cryopick_plugin', 'tests', 'cluster')
TS_IDS = ['tomo_000', 'tomo_001', 'tomo_002']
USAGE = re.compile(r'cryopick pick3d (\S+): peak memory (\d+) MB, threads (\d+).*?, ([\d.]+) s, ')
STEP = re.compile(r'(STARTED|FINISHED): pickStep, step (\d+), time (\S+ \S+)')


def _headless(home):
    """A throw-away Scipion home, set before pyworkflow is imported (as the tests' conftest.py)."""
    os.environ['CRYOPICK_HOME'] = home
    os.environ['SCIPION_USER_DATA'] = os.path.join(home, 'ScipionUserData')
    for var in ('SCIPION_HOME', 'SCIPION_TESTS', 'SCIPION_HOSTS'):
        os.environ.pop(var, None)


def _wait(project, prot, timeout=3600):
    deadline = time.time() + timeout
    project._updateProtocol(prot)
    while prot.isActive():
        if time.time() > deadline:
            raise RuntimeError(f'{prot.getRunName()} still running after {timeout} s')
        time.sleep(0.2)
        project._updateProtocol(prot)


def _run_mode(project, tomos, model, mode):
    from cryopick_plugin.protocols import CryopickPick3D
    prot = project.newProtocol(CryopickPick3D, inputTomograms=tomos, inputModel=model, numberOfThreads=1)
    prot.setObjLabel(f'pick3d {mode}')
    if mode != 'here':
        prot._useQueue.set(True)
        prot.setQueueParams(['cpu', {'JOB_MEMORY': '4G', 'JOB_TIME': '2', 'JOB_GPUS': '1',
                                     'QUEUE_FOR_JOBS': 'Y' if mode == 'per-step' else 'N'}])
    t0 = time.perf_counter()
    project.launchProtocol(prot, wait=True)
    _wait(project, prot)
    wall = time.perf_counter() - t0
    if not prot.isFinished():
        raise RuntimeError(f'{mode}: {prot.getErrorMessage()}')
    with open(prot.getLogPaths()[0], errors='replace') as fh:
        log = re.sub(r'\x1b\[[0-9;]*m', '', fh.read())
    usage = USAGE.findall(log)
    assert len(usage) == len(TS_IDS), usage
    engine = {u[0]: float(u[3]) for u in usage}
    times = {}
    for what, step, stamp in STEP.findall(log):
        times[(what, int(step))] = datetime.datetime.fromisoformat(stamp)
    # steps are inserted in sorted tsId order: step i picks TS_IDS[i - 1]
    durations = [(times[('FINISHED', i)] - times[('STARTED', i)]).total_seconds() for i in range(1, 4)]
    step_overhead = [d - engine[f'{ts}.mrc'] for d, ts in zip(durations, TS_IDS)]
    span = (max(times[('FINISHED', i)] for i in range(1, 4)) - min(times[('STARTED', i)] for i in range(1, 4)))
    return {'mode': mode, 'wall_s': round(wall, 2), 'engine_s': [engine[f'{ts}.mrc'] for ts in TS_IDS],
            'engine_sum_s': round(sum(engine.values()), 2), 'step_overhead_s': [round(x, 2) for x in step_overhead],
            'outside_steps_s': round(wall - span.total_seconds(), 2),
            'peak_mb': max(int(u[1]) for u in usage), 'picks': prot.output3DCoordinates.getSize()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--shape', type=int, nargs=3, default=(64, 256, 256), metavar=('Z', 'Y', 'X'))
    ap.add_argument('--repeat', type=int, default=1, help='runs of each mode (the table gives the median)')
    ap.add_argument('--out', default=None, help='JSON with every run')
    args = ap.parse_args(argv)
    if args.out:
        args.out = os.path.abspath(args.out)   # the project becomes the working folder
    if os.geteuid() != 0:
        sys.exit('bench_cluster.py: run as root (slurmd starts the jobs as the submitting user)')

    home = tempfile.mkdtemp(prefix='cryopick-bench-cluster-')
    _headless(home)
    slurm_dir = os.path.join(home, 'slurm')
    # owned by this process: should it be killed, start_slurm.sh's watchdog stops that SLURM
    started = subprocess.run(['bash', os.path.join(CLUSTER, 'start_slurm.sh'), slurm_dir, str(os.getpid())],
                             capture_output=True, text=True)
    if started.returncode:
        sys.exit(started.stderr.strip() or started.stdout.strip())
    os.environ['SLURM_CONF'] = os.path.join(slurm_dir, 'slurm.conf')
    try:
        import numpy as np
        import torch
        import cryopick_plugin  # noqa: F401  (headless Scipion)
        from pyworkflow.project import Manager
        from tomo.protocols import ProtImportTomograms
        from cryopick_plugin.commands.cluster_config import hosts_conf
        from cryopick_plugin.engine import settings
        from cryopick_plugin.engine.io import model_io
        from cryopick_plugin.engine.io.mrc import write_mrc
        from cryopick_plugin.engine.pick3d.resunet3d import PRESETS, build
        from cryopick_plugin.protocols import CryopickImportModel

        with open(os.environ['SCIPION_HOSTS'], 'w') as fh:
            fh.write(hosts_conf(['cpu'], gpu_partition='gpu', hours=2, mem='4G'))
        project = Manager().createProject('bench_cluster')
        os.chdir(project.getPath())
        data = os.path.join(home, 'data')
        rng = np.random.default_rng(0)
        for ts in TS_IDS:
            write_mrc(os.path.join(data, f'{ts}.mrc'), rng.normal(size=tuple(args.shape)).astype(np.float32), 10.0)
        torch.manual_seed(0)
        cfg = PRESETS['cpu']
        net = build('cpu').eval()
        model_file = os.path.join(home, 'cpu_preset.pt')
        model_io.save_model(model_file, 'deepetpicker', net.arch(), net.state_dict(),
                            {'voxel_size': 10.0, 'diameters': {'1': 9}, 'patch': cfg['patch'],
                             'pad_infer': cfg['pad'], 'thresholds': {'t_seg': 0.5, 't_lm': 0.1}})
        imp = project.newProtocol(ProtImportTomograms, filesPath=data, filesPattern='tomo_*.mrc', samplingRate=10.0)
        project.launchProtocol(imp, wait=True)
        mod = project.newProtocol(CryopickImportModel, modelFile=model_file, method=0)
        project.launchProtocol(mod, wait=True)

        runs = []
        for _ in range(args.repeat):
            for mode in ('here', 'per-step', 'whole'):
                runs.append(_run_mode(project, imp.Tomograms, mod.outputModel, mode))
                print(json.dumps(runs[-1]), flush=True)
    finally:
        subprocess.run(['bash', os.path.join(CLUSTER, 'stop_slurm.sh'), slurm_dir], capture_output=True)

    precision = settings.resolve_precision(os.environ.get('CRYOPICK_PRECISION', 'auto'), 'cpu')
    load = os.getloadavg()
    n_jobs = {'here': 0, 'per-step': len(TS_IDS), 'whole': 1}
    # Per repeat: the time outside the engine commands beyond running here, per SLURM job (the load
    # changes between repeats, the commands' own time is left out).
    for i, r in enumerate(runs):
        here = runs[i - i % 3]
        if n_jobs[r['mode']]:
            r['extra_per_job_s'] = round(((r['wall_s'] - r['engine_sum_s'])
                                          - (here['wall_s'] - here['engine_sum_s'])) / n_jobs[r['mode']], 2)
    summary = {}
    for mode in ('here', 'per-step', 'whole'):
        mine = [r for r in runs if r['mode'] == mode]
        summary[mode] = {k: statistics.median(r[k] for r in mine)
                         for k in ('wall_s', 'engine_sum_s', 'outside_steps_s', 'peak_mb')}
        summary[mode]['engine_per_tomogram_s'] = statistics.median(e for r in mine for e in r['engine_s'])
        summary[mode]['step_overhead_s'] = statistics.median(o for r in mine for o in r['step_overhead_s'])
        summary[mode]['extra_per_job_s'] = (statistics.median(r['extra_per_job_s'] for r in mine)
                                            if n_jobs[mode] else None)
    print(f"\nshape {tuple(args.shape)}, precision {precision}, {args.repeat} run(s) per mode, "
          f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    print('| mode | SLURM jobs | protocol wall (s) | engine, per tomogram (s) | per step: duration − engine (s) | '
          'outside the steps (s) | beyond "here", per job (s) | peak memory per command (MB) |')
    print('|---|---|---|---|---|---|---|---|')
    for mode, s in summary.items():
        extra = f"{s['extra_per_job_s']:.1f}" if s['extra_per_job_s'] is not None else '–'
        print(f"| {mode} | {n_jobs[mode]} | {s['wall_s']:.1f} | {s['engine_per_tomogram_s']:.1f} | "
              f"{s['step_overhead_s']:.1f} | {s['outside_steps_s']:.1f} | {extra} | {s['peak_mb']:.0f} |")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, 'w') as fh:
            json.dump({'shape': list(args.shape), 'precision': precision, 'load': load, 'runs': runs,
                       'summary': summary, 'date': time.strftime('%Y-%m-%d %H:%M')}, fh, indent=2)
    shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
