"""Bad input across the cryopick protocols, one test per kind of problem, in a throw-away Scipion project.

Each case ends either in a correct result, or in a protocol that refuses to start (validation errors) or
fails with a one-line message naming the file and the problem, with no output registered and nothing
half-written left where an output belongs. Also: the memory a large tomogram costs (measured in a
subprocess, against the file size) and a full disk while an engine command writes its output.
"""
import glob
import importlib.util
import os
import resource
import subprocess
import sys

import numpy as np
import pandas as pd

from pyworkflow.tests import BaseTest, setupTestProject
from tomo.protocols import ProtImportTomograms

from cryopick_plugin import convert
from cryopick_plugin.constants import OUT_COORDS3D, OUT_SUBTOMOS, OUT_TOMOMASKS
from cryopick_plugin.engine.io import model_io, star
from cryopick_plugin.engine.pick3d import resunet3d
from cryopick_plugin.engine.io.mrc import write_mrc
from cryopick_plugin.protocols import (CryopickImportCoordinates3D, CryopickDogPick, CryopickPick3D,
                                       CryopickImportModel, CryopickWeakLabels, CryopickExtractSubtomograms)

SHAPE = (24, 48, 48)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _blobs(seed, shape=SHAPE):
    rng = np.random.default_rng(seed)
    vol = rng.normal(size=shape).astype(np.float32)
    zz, yy, xx = np.indices(shape)
    for _ in range(6):
        c = rng.uniform(6, np.array(shape) - 6)
        vol[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= 9] -= 3.0
    return vol


def _tiny_model(path, voxel):
    import torch
    torch.manual_seed(0)
    net = resunet3d.ResUNet3D(n_classes=1, widths=(4, 8))
    meta = {'voxel_size': voxel, 'diameters': {'1': 5}, 'patch': 16, 'pad_infer': 4,
            'thresholds': {'t_seg': 0.5, 't_lm': 0.1}}
    model_io.save_model(path, 'deepetpicker', net.arch(), net.state_dict(), meta)
    return path


def _write(folder, name, vol, voxel=10.0):
    os.makedirs(folder, exist_ok=True)
    return write_mrc(os.path.join(folder, name), vol, voxel)


class TestBadInput(BaseTest):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        d = cls.dataDir = os.path.abspath(cls.proj.getPath('inputs'))
        for i, ts in enumerate(('tomo_a', 'tomo_b')):
            vol = _blobs(i)
            _write(os.path.join(d, 'good'), f'{ts}.mrc', vol)
            _write(os.path.join(d, 'crop'), f'{ts}.mrc', vol[:, :20, :20])   # same tsIds, smaller
        _write(os.path.join(d, 'other'), 'tomo_c.mrc', _blobs(5))            # tsIds matching no coordinate
        nan = _blobs(6)
        nan[3, 4, 5] = np.nan
        _write(os.path.join(d, 'nan'), 'tomo_nan.mrc', nan)
        _write(os.path.join(d, 'flat'), 'tomo_flat.mrc', np.full(SHAPE, 2.5, np.float32))
        _write(os.path.join(d, 'truncated'), 'tomo_cut.mrc', _blobs(7))
        # coordinates: inside the full tomograms, several beyond the cropped ones (x or y >= 20)
        xyz = np.array([[10, 10, 10], [30, 12, 8], [12, 35, 15], [36, 36, 12]], float)
        table = pd.concat([star.coordinates_frame(xyz, 'tomo_a', classes=[1, 1, 1, 1]),
                           star.coordinates_frame(xyz[:2] + 1, 'tomo_b', classes=[1, 1])], ignore_index=True)
        star.write_coordinates(os.path.join(d, 'picks.star'), table)
        outside = table.copy()
        outside.loc[2, star.Z] = 24.5
        star.write_coordinates(os.path.join(d, 'outside.star'), outside)
        star.write_coordinates(os.path.join(d, 'empty.star'), table.iloc[:0])
        cls.models = {v: _tiny_model(os.path.join(d, f'model_{v:g}A.pt'), v) for v in (10.0, 20.0)}

        cls.tomos = {}
        for key, folder, sr in (('good', 'good', 10.0), ('good20', 'good', 20.0), ('crop', 'crop', 10.0),
                                ('other', 'other', 10.0), ('nan', 'nan', 10.0), ('flat', 'flat', 10.0),
                                ('truncated', 'truncated', 10.0)):
            prot = cls.newProtocol(ProtImportTomograms, filesPath=os.path.join(d, folder),
                                   filesPattern='*.mrc', samplingRate=sr)
            prot.setObjLabel(f'tomograms {key}')
            cls.launchProtocol(prot)
            cls.tomos[key] = prot.Tomograms
        cls.coords = cls.newProtocol(CryopickImportCoordinates3D, inputTomograms=cls.tomos['good'],
                                     starFiles=os.path.join(d, 'picks.star'), boxSize=8)
        cls.launchProtocol(cls.coords)
        cls.coords = cls.coords.output3DCoordinates
        cls.modelObjs = {}
        for voxel, path in cls.models.items():
            imp = cls.newProtocol(CryopickImportModel, modelFile=path, method=0)
            cls.launchProtocol(imp)
            cls.modelObjs[voxel] = imp.outputModel

    # ------------------------------------------------------------------ helpers
    def _fails(self, prot, expected, output):
        """Launch `prot`; it must fail with a one-line message containing `expected` and register nothing."""
        with self.assertRaises(Exception):
            self.launchProtocol(prot)
        self.assertTrue(prot.isFailed())
        message = prot.getErrorMessage().strip()
        self.assertIn(expected, message)
        self.assertNotIn('\n', message)
        self.assertNotIn('Traceback', message)
        self.assertFalse(prot.hasAttribute(output))
        return message

    def _refused(self, prot, expected):
        errors = prot.validate()
        self.assertTrue(any(expected in e for e in errors), errors)

    def _pick3d(self, tomos, voxel=10.0, **kwargs):
        return self.newProtocol(CryopickPick3D, inputTomograms=tomos, inputModel=self.modelObjs[voxel],
                                useGpu=False, **kwargs)

    # ------------------------------------------------------------------ sampling rate
    def test_coordinates_at_another_sampling_rate(self):
        prot = self.newProtocol(CryopickWeakLabels, inputTomograms=self.tomos['good20'],
                                inputCoordinates=self.coords, diameter=5)
        self._refused(prot, 'The coordinates are at 10 Å/px but the tomograms at 20 Å/px')

    def test_missing_coordinate_sampling_rate_values(self):
        prot = self.newProtocol(CryopickImportCoordinates3D, inputTomograms=self.tomos['good'],
                                starFiles=os.path.join(self.dataDir, 'picks.star'), coordsSamplingRate=-5.0)
        self._refused(prot, 'Coordinates sampling rate must be positive')

    def test_model_at_another_voxel_size(self):
        self._refused(self._pick3d(self.tomos['good'], voxel=20.0),
                      'The model was trained at 20 Å/voxel but the tomograms are at 10 Å/voxel')
        # allowed to rescale, the picks come back in the tomograms' own voxels
        prot = self._pick3d(self.tomos['good'], voxel=20.0, rescale=True, tSeg=0.01, tLm=0.01)
        self.launchProtocol(prot)
        picks = getattr(prot, OUT_COORDS3D)
        self.assertAlmostEqual(picks.getSamplingRate(), 10.0)
        df = convert.coordinates3d_to_frame(picks, self.tomos['good'])
        self.assertGreater(len(df), 0)
        xyz = star.xyz_array(df)
        self.assertTrue(np.all(xyz >= -0.5) and np.all(xyz <= np.array(SHAPE[::-1]) - 0.5))

    # ------------------------------------------------------------------ coordinates
    def test_coordinates_outside_their_tomogram(self):
        imp = self.newProtocol(CryopickImportCoordinates3D, inputTomograms=self.tomos['good'],
                               starFiles=os.path.join(self.dataDir, 'outside.star'), boxSize=8)
        self._fails(imp, 'outside.star: 1 coordinate(s) outside the volume', OUT_COORDS3D)
        # the same tsIds on smaller tomograms (e.g. a cropped version): the centres are not in them
        ext = self.newProtocol(CryopickExtractSubtomograms, inputCoordinates=self.coords,
                               inputTomograms=self.tomos['crop'], boxSize=8)
        self._fails(ext, 'tomo_a_coords.star: 3 coordinate(s) outside the volume of tomo_a', OUT_SUBTOMOS)
        # label maps of the smaller tomograms cannot hold centres beyond them
        labels = self.newProtocol(CryopickWeakLabels, inputTomograms=self.tomos['crop'],
                                  inputCoordinates=self.coords, diameter=5)
        self._fails(labels, 'outside the volume', OUT_TOMOMASKS)

    def test_empty_coordinate_set(self):
        imp = self.newProtocol(CryopickImportCoordinates3D, inputTomograms=self.tomos['good'],
                               starFiles=os.path.join(self.dataDir, 'empty.star'), boxSize=8)
        self._fails(imp, 'empty.star: no coordinates in the STAR file(s)', OUT_COORDS3D)
        # a picker that finds nothing gives an empty set (a correct result) ...
        dog = self.newProtocol(CryopickDogPick, inputTomograms=self.tomos['good'], diameter=5.0,
                               threshold=1e6, boxSize=8)
        self.launchProtocol(dog)
        empty = getattr(dog, OUT_COORDS3D)
        self.assertEqual(empty.getSize(), 0)
        # ... which the next protocols refuse before running
        self._refused(self.newProtocol(CryopickWeakLabels, inputTomograms=self.tomos['good'],
                                       inputCoordinates=empty, diameter=5), 'The coordinate set is empty.')
        self._refused(self.newProtocol(CryopickExtractSubtomograms, inputCoordinates=empty, boxSize=8),
                      'The coordinate set is empty.')

    def test_coordinates_matching_no_tomogram(self):
        imp = self.newProtocol(CryopickImportCoordinates3D, inputTomograms=self.tomos['other'],
                               starFiles=os.path.join(self.dataDir, 'picks.star'), boxSize=8)
        self._fails(imp, 'picks.star: rows refer to tomograms not in the input set: tomo_a, tomo_b', OUT_COORDS3D)
        labels = self.newProtocol(CryopickWeakLabels, inputTomograms=self.tomos['other'],
                                  inputCoordinates=self.coords, diameter=5)
        self._refused(labels, 'No coordinate refers to any of the input tomograms')

    # ------------------------------------------------------------------ tomograms
    def test_nan_tomogram(self):
        self._fails(self.newProtocol(CryopickDogPick, inputTomograms=self.tomos['nan'], diameter=5.0),
                    'tomo_nan.mrc: contains NaN or infinite values', OUT_COORDS3D)
        self._fails(self._pick3d(self.tomos['nan']), 'tomo_nan.mrc: contains NaN or infinite values', OUT_COORDS3D)

    def test_constant_tomogram(self):
        self._fails(self.newProtocol(CryopickDogPick, inputTomograms=self.tomos['flat'], diameter=5.0),
                    'tomo_flat.mrc: is constant (every voxel is 2.5)', OUT_COORDS3D)
        self._fails(self._pick3d(self.tomos['flat']), 'tomo_flat.mrc: is constant', OUT_COORDS3D)

    def test_truncated_mrc(self):
        # the file was fine when imported and lost its end later (a copy cut short, a full disk)
        tomo = next(iter(self.tomos['truncated'].iterItems()))
        path = os.path.realpath(tomo.getFileName())
        size = os.path.getsize(path)
        with open(path, 'r+b') as fh:
            fh.truncate(size - 4096)
        self._fails(self.newProtocol(CryopickDogPick, inputTomograms=self.tomos['truncated'], diameter=5.0),
                    'tomo_cut.mrc: not a readable MRC file', OUT_COORDS3D)
        self._fails(self._pick3d(self.tomos['truncated']), 'tomo_cut.mrc: not a readable MRC file', OUT_COORDS3D)

    # ------------------------------------------------------------------ resources
    def test_large_tomogram_memory_stays_below_its_size(self):
        """DoG picking of a 256 MiB tomogram grows the process's own memory by well under half the file.

        The growth is bounded by the tiles, not by the tomogram (bench/bench_memory.py: the same ~65 MiB for
        64 MiB and 256 MiB files), so a smaller file would only test the fixed tile cost.
        """
        bench = _bench_memory()
        work = os.path.abspath(self.proj.getPath('memory'))
        os.makedirs(work, exist_ok=True)
        big = bench.write_tomogram(os.path.join(work, 'big.mrc'), (64, 1024, 1024), seed=3, n_blobs=80)
        small = bench.write_tomogram(os.path.join(work, 'small.mrc'), (32, 48, 48), seed=4, n_blobs=3)
        file_mib = os.path.getsize(big) / 1024 ** 2
        env = dict(os.environ, OMP_NUM_THREADS='2')
        base = bench.measure(bench.commands(small, work)['dog-pick'], env=env)
        full = bench.measure(bench.commands(big, work)['dog-pick'], env=env)
        self.assertEqual((base['rc'], full['rc']), (0, 0), full['stderr'])
        growth = full['peak_anon_mib'] - base['peak_anon_mib']
        self.assertGreater(base['peak_anon_mib'], 10)  # the sampling saw the process
        self.assertLess(growth, 0.5 * file_mib, f'{growth:.0f} MiB for a {file_mib:.0f} MiB tomogram')
        picks = star.read_coordinates(os.path.join(work, 'big.mrc_dog.star'), dims=3)
        self.assertEqual(len(picks), 500)
        for path in (big, small):
            os.remove(path)

    def test_disk_full_in_engine_command(self):
        """The label map cannot be written whole: one-line error, no file at the destination, no leftovers."""
        work = os.path.abspath(self.proj.getPath('diskfull'))
        os.makedirs(work, exist_ok=True)
        tomo = _write(work, 'wide.mrc', np.zeros((64, 128, 128), np.float32) + _blobs(8, (64, 128, 128)))
        centres = os.path.join(work, 'centres.star')
        star.write_coordinates(centres, star.coordinates_frame([[60, 60, 30]], 'wide', classes=[1]))
        out = os.path.join(work, 'labels', 'wide_labels.mrc')
        limit = 256 * 1024   # the uint8 map is 1 MiB

        def small_files():
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

        proc = subprocess.run([sys.executable, '-m', 'cryopick_plugin', 'labels', tomo, centres, '--diameter', '5',
                               '--out', out], capture_output=True, text=True, preexec_fn=small_files, timeout=300)
        self.assertEqual(proc.returncode, 2, proc.stderr)
        last = proc.stderr.strip().splitlines()[-1]
        self.assertIn('cryopick labels: error:', last)
        self.assertIn('File too large', last)
        self.assertNotIn('Traceback', proc.stderr)
        self.assertFalse(os.path.exists(out))
        self.assertEqual(os.listdir(os.path.dirname(out)), [])   # no temporary file left behind
        # the same command with room enough writes the map
        proc = subprocess.run([sys.executable, '-m', 'cryopick_plugin', 'labels', tomo, centres, '--diameter', '5',
                               '--out', out], capture_output=True, text=True, timeout=300)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertTrue(os.path.exists(out))

    def test_disk_full_in_protocol(self):
        """Weak labels with a file-size limit below one label map: failed, clear, nothing registered."""
        d = os.path.join(self.dataDir, 'wide')
        _write(d, 'tomo_wide.mrc', _blobs(9, (64, 160, 160)))
        tomos = self.newProtocol(ProtImportTomograms, filesPath=d, filesPattern='*.mrc', samplingRate=10.0)
        self.launchProtocol(tomos)
        star.write_coordinates(os.path.join(d, 'wide.star'),
                               star.coordinates_frame([[80, 80, 30], [40, 100, 20]], 'tomo_wide', classes=[1, 1]))
        coords = self.newProtocol(CryopickImportCoordinates3D, inputTomograms=tomos.Tomograms,
                                  starFiles=os.path.join(d, 'wide.star'), boxSize=8)
        self.launchProtocol(coords)
        labels = self.newProtocol(CryopickWeakLabels, inputTomograms=tomos.Tomograms,
                                  inputCoordinates=coords.output3DCoordinates, diameter=5)
        # the limit sits between the project's databases (which must still be written) and the 1.6 MB map
        biggest_db = max(os.path.getsize(p) for p in glob.glob(os.path.join(self.proj.getPath(), '**', '*.sqlite'),
                                                               recursive=True))
        limit = 1024 * 1024
        self.assertLess(3 * biggest_db, limit)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            message = self._fails(labels, 'File too large', OUT_TOMOMASKS)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        self.assertIn('tomo_wide_labels.mrc', message)
        extra = labels._getExtraPath()
        self.assertEqual(sorted(f for f in os.listdir(extra) if f.endswith('.mrc') or '.part' in f), [])
        self.assertEqual([p for p in glob.glob(os.path.join(labels.getPath(), '*.sqlite'))
                          if 'tomomasks' in os.path.basename(p)], [])


def _bench_memory():
    spec = importlib.util.spec_from_file_location('bench_memory', os.path.join(ROOT, 'bench', 'bench_memory.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

