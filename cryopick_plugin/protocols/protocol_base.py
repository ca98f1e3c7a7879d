"""What every cryopick protocol shares: running engine commands as jobs, GPU fields, tsId bookkeeping.

Protocols never compute: each step writes the inputs the engine needs (through `convert`), runs one
`cryopick <command>` as a Scipion job (so it can go to a queue and shows in the log), and registers the
engine's output files as Scipion objects. Per-tomogram steps are keyed by tsId strings in sorted order, so
"Continue" finds them again and skips the finished ones.
"""
import json
import os
import shlex
import threading
import uuid

from pyworkflow.protocol import params
from pwem.protocols import EMProtocol

from .. import Plugin, convert
from ..engine.io import star

# Scipion runs the steps of a parallel protocol as threads of one process, and the mapper of a set's SQLite
# file is shared between them: two steps iterating one input set at the same moment crashed the protocol
# process (a segmentation fault, seen with three DoG steps). Input sets are read under this lock, once.
_SET_READ_LOCK = threading.Lock()


class CryopickProtocol(EMProtocol):
    """Base of cryopick protocols (not shown in menus)."""
    _label = None

    # ------------------------------------------------------------------ form helpers
    @staticmethod
    def _defineComputeParams(form, gpu=True):
        if gpu:
            form.addHidden(params.USE_GPU, params.BooleanParam, default=True,
                           label='Use GPU', help='Run the network on a GPU when one is available. Without '
                                                 'CUDA the CPU is used whatever this says.')
            form.addHidden(params.GPU_LIST, params.StringParam, default='0', label='GPU IDs',
                           help='GPUs to use (CUDA numbering), e.g. "0" or "0,1".')
        form.addParallelSection(threads=1, mpi=0)

    # ------------------------------------------------------------------ running engine commands
    def _runCryopick(self, command, args, gpu=False):
        """Run `cryopick <command> <args>` (args: list of strings, quoted here) as a job of this protocol.

        Locally, or with the whole protocol sent to a queue, the job is a child process; with one queue job
        per step (useQueueForSteps) Scipion submits it and only waits for it to leave the queue, so whether
        the command finished is read back here. Either way the command's peak memory, threads and time go
        to the protocol log."""
        label = os.path.basename(str(args[0])) if not isinstance(args, str) and args else ''
        if not isinstance(args, str):
            args = ' '.join(shlex.quote(str(a)) for a in args)
        per_step_jobs = self.useQueueForSteps()
        threads = max(1, int((self.numberOfThreads.get() if hasattr(self, 'numberOfThreads') else 1) or 1))
        if per_step_jobs:
            # Each step is a queue job that asked for the protocol's threads as its CPUs: use what the job
            # got (SLURM_CPUS_PER_TASK), what it asked for under a queue that does not say.
            threads = f'job:{threads}'
        elif getattr(self, 'stepsExecutionMode', None) == params.STEPS_PARALLEL and threads > 1:
            # The threads already run steps side by side: one compute thread per job avoids oversubscription.
            threads = 1
        # Files of this job only (steps of one command run side by side).
        tmp = os.path.abspath(self._getTmpPath())
        os.makedirs(tmp, exist_ok=True)
        job = f'{command}-{uuid.uuid4().hex[:10]}'
        error_file, usage_file, done_file = (os.path.join(tmp, job + ext) for ext in ('_error.txt', '_usage.json',
                                                                                       '.done'))
        if per_step_jobs:
            # A queue job that is cancelled or killed leaves no error message: only success leaves this file.
            args += f' && touch {shlex.quote(done_file)}'
        env = {'CRYOPICK_THREADS': threads, 'CRYOPICK_ERROR_FILE': error_file, 'CRYOPICK_USAGE_FILE': usage_file}
        if isinstance(threads, int):
            env['OMP_NUM_THREADS'] = threads
        try:
            try:
                Plugin.runCryopick(self, command, args, gpu=gpu, extra_env=env)
            except Exception:
                # Bad input: fail with the engine's one-line message (file + problem), not a shell command line.
                self._raiseEngineError(error_file)
                raise
            self._raiseEngineError(error_file)
            if per_step_jobs and not os.path.exists(done_file):
                raise RuntimeError(f'cryopick {command}{" " + label if label else ""}: the queue job ended before the '
                                   f'command finished (cancelled, over its time or memory limit, or its node '
                                   f'failed); its output: {os.path.abspath(self._getLogsPath())}/*.out, *.err')
            self._logUsage(command, label, usage_file)
        finally:
            for path in (error_file, usage_file, done_file):
                if os.path.exists(path):
                    os.remove(path)

    @staticmethod
    def _raiseEngineError(error_file):
        if os.path.exists(error_file):
            with open(error_file) as fh:
                raise RuntimeError(fh.read().strip()) from None

    def _logUsage(self, command, label, usage_file):
        """One log line per engine job: what it used, so that users can size a queue job's --mem."""
        if not os.path.exists(usage_file):
            return
        try:
            use = self._readJson(usage_file)
        except (OSError, ValueError):
            return
        blas = use.get('blas_threads') or []
        pools = ', '.join(f'{name} {value}' for name, value in
                          (('torch', use.get('torch_threads')), ('BLAS', '/'.join(map(str, blas)) or None))
                          if value is not None)
        where = f"SLURM job {use['slurm_job_id']} on {use['host']}" if use.get('slurm_job_id') else use.get('host')
        self.info(f"cryopick {command}{' ' + label if label else ''}: peak memory {use['peak_rss_mb']:.0f} MB, "
                  f"threads {use.get('threads') or 'default'}{f' ({pools})' if pools else ''}, "
                  f"{use['wall_s']:.1f} s, {where}")

    # ------------------------------------------------------------------ paths
    def _tsPath(self, tsId, suffix):
        """extra/<tsId><suffix>, absolute (jobs may run elsewhere than the project folder)."""
        return os.path.abspath(self._getExtraPath(f'{tsId}{suffix}'))

    @staticmethod
    def _absFile(obj):
        return os.path.abspath(obj.getFileName())

    def _tomogramFile(self, tsId, tomograms=None):
        """Absolute file of tomogram `tsId` of the set that the callable `tomograms` returns (default:
        the inputTomograms), safe to call from steps running side by side: the set is got and read
        once, under a lock, and its tsId → file map kept for the other steps."""
        with _SET_READ_LOCK:
            tomograms = self.inputTomograms.get() if tomograms is None else tomograms()
            cache = self.__dict__.setdefault('_tomogramFilesCache', {})
            key = os.path.abspath(tomograms.getFileName())
            if key not in cache:
                cache[key] = {ts: self._absFile(t) for ts, t in convert.tomograms_by_name(tomograms).items()}
            return cache[key][tsId]

    # ------------------------------------------------------------------ coordinates ↔ STAR
    def _writeCoordinatesStar(self, coords, tomograms, path, tsId=None):
        """Write a SetOfCoordinates3D (optionally one tomogram's rows) as STAR in tomogram voxels."""
        df = convert.coordinates3d_to_frame(coords, tomograms)
        if tsId is not None:
            df = df[df[star.TOMO] == tsId]
        star.write_coordinates(path, df)
        return len(df)

    def _registerPerTomogramPicks(self, tomograms, tsIds, suffix, box_size, output_name, extra_sources=()):
        """Read extra/<tsId><suffix> STAR files (one per tomogram) into one SetOfCoordinates3D output."""
        import pandas as pd
        tables = []
        for tsId in tsIds:
            df = star.read_coordinates(self._tsPath(tsId, suffix), dims=3)
            df[star.TOMO] = tsId  # one file per tomogram: the link is the tsId, whatever the file name
            tables.append(df)
        df = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
        coords = self._createSetOfCoordinates3D(tomograms)
        coords.setSamplingRate(tomograms.getSamplingRate())
        coords.setBoxSize(box_size)
        if len(df):
            convert.frame_to_coordinates3d(df, coords, tomograms, source=self._getExtraPath())
        self._defineOutputs(**{output_name: coords})
        for source in (self.inputTomograms,) + tuple(extra_sources):
            self._defineSourceRelation(source, coords)
        return coords

    @staticmethod
    def _readJson(path):
        with open(path) as fh:
            return json.load(fh)

    @staticmethod
    def _writeJson(path, data):
        with open(path, 'w') as fh:
            json.dump(data, fh, indent=2, sort_keys=True, default=str)
