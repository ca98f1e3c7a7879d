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
        """Run `cryopick <command> <args>` (args: list of strings, quoted here) as a job of this protocol."""
        if not isinstance(args, str):
            args = ' '.join(shlex.quote(str(a)) for a in args)
        threads = self.numberOfThreads.get() if hasattr(self, 'numberOfThreads') else 1
        if getattr(self, 'stepsExecutionMode', None) == params.STEPS_PARALLEL and (threads or 1) > 1:
            # The threads already run steps side by side: one compute thread per job avoids oversubscription.
            threads = 1
        # torch and BLAS use as many threads as the protocol was given, not every core of the node.
        error_file = os.path.abspath(self._getTmpPath(f'{command}_error.txt'))
        os.makedirs(os.path.dirname(error_file), exist_ok=True)
        if os.path.exists(error_file):
            os.remove(error_file)
        try:
            Plugin.runCryopick(self, command, args, gpu=gpu,
                               extra_env={'OMP_NUM_THREADS': max(1, int(threads or 1)),
                                          'CRYOPICK_ERROR_FILE': error_file})
        except Exception:
            # Bad input: fail with the engine's one-line message (file + problem), not a shell command line.
            if os.path.exists(error_file):
                with open(error_file) as fh:
                    raise RuntimeError(fh.read().strip()) from None
            raise

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
