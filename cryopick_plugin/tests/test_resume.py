"""Resume after a kill ("Continue") and per-tomogram steps in parallel, in a throw-away Scipion project.

A DoG picking run over four tomograms is killed (protocol process and the engine job it started) once the
first tomogram's step has finished, then launched again in Continue mode. Finished steps must not run again
(their output files keep their modification time) and the final coordinate set must equal the one of an
uninterrupted run. The same protocol with 3 threads runs its per-tomogram steps at the same time and gives
the same coordinates as the serial run.
"""
import os
import re
import time

import numpy as np
import pandas as pd
import psutil

from pyworkflow.protocol.constants import MODE_RESUME, STATUS_FINISHED
from pyworkflow.tests import BaseTest, setupTestProject
from tomo.protocols import ProtImportTomograms

from cryopick_plugin import convert
from cryopick_plugin.constants import OUT_COORDS3D
from cryopick_plugin.engine.io import star
from cryopick_plugin.engine.io.mrc import write_mrc
from cryopick_plugin.protocols import CryopickDogPick

SHAPE = (40, 64, 64)
TS_IDS = [f'tomo_{i:03d}' for i in range(4)]
DIAMETER = 8.0


def _blob_tomogram(seed):
    """Noise with a dozen dark balls: DoG finds them, and different seeds give different picks."""
    rng = np.random.default_rng(seed)
    vol = rng.normal(size=SHAPE).astype(np.float32)
    zz, yy, xx = np.indices(SHAPE)
    for _ in range(12):
        c = rng.uniform([6, 6, 6], np.array(SHAPE) - 6)
        vol[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= 9] -= 3.0
    return vol


def _kill_tree(pid):
    """SIGKILL a process and everything it started, as a crash or an OOM kill would."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = root.children(recursive=True) + [root]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=20)


def _sorted_picks(prot, tomos):
    df = convert.coordinates3d_to_frame(getattr(prot, OUT_COORDS3D), tomos)
    cols = [star.TOMO, star.X, star.Y, star.Z, star.CLASS, star.SCORE]
    return df[cols].sort_values(cols[:4]).reset_index(drop=True)


class TestResumeAndParallel(BaseTest):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.dataDir = os.path.abspath(cls.proj.getPath('inputs'))
        os.makedirs(cls.dataDir, exist_ok=True)
        for i, ts in enumerate(TS_IDS):
            write_mrc(os.path.join(cls.dataDir, f'{ts}.mrc'), _blob_tomogram(100 + i), 10.0)
        cls.protTomos = cls.newProtocol(ProtImportTomograms, filesPath=cls.dataDir, filesPattern='tomo_*.mrc',
                                        samplingRate=10.0)
        cls.launchProtocol(cls.protTomos)
        cls.tomos = cls.protTomos.Tomograms
        # the uninterrupted, serial reference
        cls.reference = cls._dog(threads=1)
        cls.launchProtocol(cls.reference)
        cls.referencePicks = _sorted_picks(cls.reference, cls.tomos)

    @classmethod
    def _dog(cls, threads):
        return cls.newProtocol(CryopickDogPick, inputTomograms=cls.tomos, diameter=DIAMETER, maxPicks=30,
                               boxSize=12, numberOfThreads=threads)

    def test_reference_has_picks_in_every_tomogram(self):
        self.assertEqual(sorted(self.referencePicks[star.TOMO].unique()), TS_IDS)
        # different tomograms, different picks: equality below cannot come from identical inputs
        a = self.referencePicks[self.referencePicks[star.TOMO] == TS_IDS[0]]
        b = self.referencePicks[self.referencePicks[star.TOMO] == TS_IDS[1]]
        self.assertFalse(np.array_equal(star.xyz_array(a)[:5], star.xyz_array(b)[:5]))

    def test_kill_then_continue(self):
        prot = self._dog(threads=1)
        prot.setObjLabel('dog killed then continued')
        self.proj.launchProtocol(prot, wait=False)
        launcher_pid = prot.getPid()
        self.assertTrue(launcher_pid)
        # Kill as soon as Scipion has recorded the first tomogram's step as finished: the next one is
        # then starting or running.
        deadline = time.time() + 180
        while not self._finished_ts(prot) and time.time() < deadline:
            time.sleep(0.05)
        self.assertTrue(self._finished_ts(prot), 'the first tomogram was never picked')
        _kill_tree(launcher_pid)

        steps = prot.loadSteps()
        self.assertEqual(len([s for s in steps if s.funcName.get() == 'pickStep']), len(TS_IDS))
        done_ts = self._finished_ts(prot)
        # killed part-way: something finished, something did not, no output registered
        self.assertIn(TS_IDS[0], done_ts)
        self.assertLess(len(done_ts), len(TS_IDS))
        self.assertFalse(self._finished_output_step(steps))
        # whatever the engine had written is complete (atomic writes): a finished file reads back whole
        mtimes = {}
        for ts in done_ts:
            path = prot._getExtraPath(f'{ts}_dog.star')
            self.assertEqual(len(star.read_coordinates(path, dims=3)), 30)
            mtimes[ts] = os.stat(path).st_mtime_ns
        time.sleep(0.05)  # a rerun would write files with a visibly later mtime

        prot.runMode.set(MODE_RESUME)
        self.proj.launchProtocol(prot, wait=True)
        self.assertFalse(prot.isFailed(), prot.getErrorMessage())
        self.assertTrue(prot.isFinished())
        for ts, mtime in mtimes.items():
            self.assertEqual(os.stat(prot._getExtraPath(f'{ts}_dog.star')).st_mtime_ns, mtime,
                             f'{ts} was picked again after Continue')
        steps = prot.loadSteps()
        self.assertTrue(all(s.getStatus() == STATUS_FINISHED for s in steps))
        # the log of both runs: a step finished before the kill started once only, the others at least once
        with open(prot.getStdoutLog()) as fh:
            log = re.sub(r'\x1b\[[0-9;]*m', '', fh.read())  # colour codes
        self.assertEqual(log.count('RESUMING PROTOCOL'), 2)
        for i, ts in enumerate(TS_IDS):
            started = log.count(f'STARTED: pickStep, step {i + 1},')
            if ts in done_ts:
                self.assertEqual(started, 1, f'{ts}\n{log}')
            else:
                self.assertIn(started, (1, 2), f'{ts}\n{log}')
        pd.testing.assert_frame_equal(_sorted_picks(prot, self.tomos), self.referencePicks)
        # no leftovers of the killed write beside the outputs that could be mistaken for them
        self.assertEqual(sorted(f for f in os.listdir(prot._getExtraPath()) if f.endswith('_dog.star')),
                         sorted(f'{ts}_dog.star' for ts in TS_IDS))

    @staticmethod
    def _finished_ts(prot):
        """tsIds whose pick step Scipion has recorded as finished (the steps database may be busy)."""
        try:
            steps = prot.loadSteps()
        except Exception:
            return []
        done = [s.argsStr.get() for s in steps if s.funcName.get() == 'pickStep' and s.getStatus() == STATUS_FINISHED]
        return [ts for ts in TS_IDS if any(f'"{ts}"' in args for args in done)]

    @staticmethod
    def _finished_output_step(steps):
        return any(s.funcName.get() == 'createOutputStep' and s.getStatus() == STATUS_FINISHED for s in steps)

    def test_parallel_steps_same_result(self):
        prot = self._dog(threads=3)
        self.launchProtocol(prot)
        pd.testing.assert_frame_equal(_sorted_picks(prot, self.tomos), self.referencePicks)
        # the per-tomogram steps really ran at the same time (two worker threads)
        spans = sorted((s.initTime.datetime(), s.endTime.datetime()) for s in prot.loadSteps()
                       if s.funcName.get() == 'pickStep')
        self.assertEqual(len(spans), len(TS_IDS))
        overlaps = sum(1 for (a0, a1), (b0, b1) in zip(spans, spans[1:]) if b0 < a1)
        self.assertGreaterEqual(overlaps, 1, spans)
