"""Importing coordinates from STAR into a real (throw-away) Scipion project.

Checks positions with scipion-em-tomo's own Coordinate3D readers (bottom-left-corner and centre conventions),
so a flip or half-box shift made on both the writing and the reading side of our convert.py cannot pass.
"""
import os

import numpy as np
import pandas as pd

from pyworkflow.tests import BaseTest, setupTestProject
from pwem.protocols import ProtImportMicrographs
from tomo import constants as tconst
from tomo.protocols import ProtImportTomograms

from cryopick_plugin import convert
from cryopick_plugin.engine.io import star
from cryopick_plugin.engine.io.mrc import write_mrc
from cryopick_plugin.protocols import CryopickImportCoordinates3D, CryopickImportCoordinates2D

SHAPE = (21, 33, 45)  # z, y, x: odd everywhere, different on each axis
TOMO_SR = 10.0
STAR_SR = 5.0         # picks given on a 2x finer grid than the tomograms


def _write_inputs(folder):
    rng = np.random.default_rng(1)
    names = ['tomo_a', 'tomo_b']
    for name in names:
        write_mrc(os.path.join(folder, f'{name}.mrc'), rng.normal(size=SHAPE).astype(np.float32), TOMO_SR)
    # Positions in tomogram voxels, away from the centre on every axis so a flip would show.
    xyz = np.array([[3.0, 5.0, 2.0], [40.5, 30.0, 19.0], [10.0, 2.0, 15.5], [0.0, 0.0, 0.0]])
    table = pd.concat([
        star.coordinates_frame(xyz[:3] * TOMO_SR / STAR_SR, 'tomo_a', classes=[1, 2, 2], scores=[0.9, 0.5, 0.1],
                               angles=[[10, 20, 30], [0, 90, 0], [45, 45, 45]]),
        star.coordinates_frame(xyz[3:] * TOMO_SR / STAR_SR, 'tomo_b', classes=[3], scores=[0.7],
                               angles=[[0, 0, 0]]),
    ], ignore_index=True)
    star.write_coordinates(os.path.join(folder, 'picks.star'), table)
    bad = table.copy()
    bad.loc[0, star.TOMO] = 'tomo_zz'
    star.write_coordinates(os.path.join(folder, 'bad_tsid.star'), bad)
    outside = table.copy()
    outside.loc[1, star.X] = 500.0
    star.write_coordinates(os.path.join(folder, 'outside.star'), outside)
    return xyz, table


class TestImportCoordinates3D(BaseTest):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.dataDir = os.path.abspath(cls.proj.getPath('inputs'))
        os.makedirs(cls.dataDir, exist_ok=True)
        cls.xyz, cls.table = _write_inputs(cls.dataDir)
        # A non-default origin (Å): Scipion stores positions relative to it, our STAR positions are not.
        cls.protTomos = cls.newProtocol(ProtImportTomograms, filesPath=cls.dataDir, filesPattern='tomo_*.mrc',
                                        samplingRate=TOMO_SR, setOrigCoord=True, x=37.0, y=-12.0, z=55.0)
        cls.launchProtocol(cls.protTomos)
        cls.tomos = cls.protTomos.Tomograms

    def _import(self, star_name, **kwargs):
        prot = self.newProtocol(CryopickImportCoordinates3D, inputTomograms=self.tomos,
                                starFiles=os.path.join(self.dataDir, star_name), coordsSamplingRate=STAR_SR,
                                boxSize=12, **kwargs)
        return prot

    def test_import_positions_links_and_round_trip(self):
        prot = self._import('picks.star')
        self.launchProtocol(prot)
        coords = prot.output3DCoordinates
        self.assertEqual(coords.getSize(), 4)
        self.assertAlmostEqual(coords.getSamplingRate(), TOMO_SR)
        self.assertEqual(coords.getBoxSize(), 12)
        tomos = {t.getTsId(): t.clone() for t in self.tomos}
        self.assertEqual(sorted(tomos), ['tomo_a', 'tomo_b'])
        got = {}
        for tsId, tomo in tomos.items():
            # iterCoordinates(volume=...) is tomo's own tsId link; getPosition its own origin handling.
            for coord in coords.iterCoordinates(volume=tomo):
                self.assertEqual(coord.getTomoId(), tsId)
                blc = coord.getPosition(tconst.BOTTOM_LEFT_CORNER)
                centre = coord.getPosition(tconst.CENTER_GRAVITY)
                dims = tomo.getDim()
                np.testing.assert_allclose(np.array(blc) - np.array(centre), 0.5 * np.array(dims), atol=1e-6)
                got.setdefault(tsId, []).append((blc, coord.getGroupId(), coord.getScore()))
        np.testing.assert_allclose([g[0] for g in got['tomo_a']], self.xyz[:3], atol=1e-4)
        np.testing.assert_allclose([g[0] for g in got['tomo_b']], self.xyz[3:], atol=1e-4)
        self.assertEqual([g[1] for g in got['tomo_a']], [1, 2, 2])
        np.testing.assert_allclose([g[2] for g in got['tomo_a']], [0.9, 0.5, 0.1])
        # The orientation from the STAR is stored as a transform (RELION convention).
        first = next(iter(coords.iterCoordinates(volume=tomos['tomo_a'])))
        from cryopick_plugin.engine.geometry import euler_to_matrix
        np.testing.assert_allclose(first.getMatrix(convention=tconst.TR_RELION)[:3, :3],
                                   euler_to_matrix(10, 20, 30), atol=1e-6)
        # Round trip back to a table at the STAR's sampling rate.
        back = convert.coordinates3d_to_frame(coords, self.tomos, sampling_rate=STAR_SR)
        back = back.sort_values([star.TOMO, star.X]).reset_index(drop=True)
        ref = self.table.sort_values([star.TOMO, star.X]).reset_index(drop=True)
        np.testing.assert_allclose(star.xyz_array(back), star.xyz_array(ref), atol=1e-4)
        self.assertEqual(back[star.TOMO].tolist(), ref[star.TOMO].tolist())
        self.assertEqual(back[star.CLASS].tolist(), ref[star.CLASS].tolist())

    def _assert_fails_cleanly(self, prot, expected):
        with self.assertRaises(Exception):
            self.launchProtocol(prot)
        prot = self.updateProtocol(prot) if hasattr(self, 'updateProtocol') else prot
        self.assertTrue(prot.isFailed())
        self.assertIn(expected, prot.getErrorMessage())
        self.assertFalse(prot.hasAttribute('output3DCoordinates'))
        self.assertEqual([f for f in os.listdir(prot.getPath()) if f.endswith('.sqlite') and 'coordinates' in f], [])

    def test_unknown_tsid_fails_with_one_line_naming_file(self):
        prot = self._import('bad_tsid.star')
        self._assert_fails_cleanly(prot, 'bad_tsid.star: rows refer to tomograms not in the input set: tomo_zz')

    def test_coordinates_outside_fail(self):
        prot = self._import('outside.star')
        self._assert_fails_cleanly(prot, 'outside.star: 1 coordinate(s) outside the volume')


class TestImportCoordinates2D(BaseTest):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.dataDir = os.path.abspath(cls.proj.getPath('inputs'))
        os.makedirs(cls.dataDir, exist_ok=True)
        rng = np.random.default_rng(2)
        for name in ('mic_1', 'mic_2'):
            write_mrc(os.path.join(cls.dataDir, f'{name}.mrc'), rng.normal(size=(41, 63)).astype(np.float32), 2.0)
        table = star.coordinates_frame([[5, 30], [60, 2], [11, 11]], ['mic_1.mrc', 'mic_1.mrc', 'mic_2.mrc'],
                                       scores=[0.3, 0.2, 0.1], micrograph=True)
        star.write_coordinates(os.path.join(cls.dataDir, 'picks2d.star'), table)
        cls.protMics = cls.newProtocol(ProtImportMicrographs, filesPath=cls.dataDir, filesPattern='mic_*.mrc',
                                       samplingRate=2.0)
        cls.launchProtocol(cls.protMics)

    def test_import_2d(self):
        mics = self.protMics.outputMicrographs
        prot = self.newProtocol(CryopickImportCoordinates2D, inputMicrographs=mics,
                                starFiles=os.path.join(self.dataDir, 'picks2d.star'), boxSize=16)
        self.launchProtocol(prot)
        coords = prot.outputCoordinates
        self.assertEqual(coords.getSize(), 3)
        self.assertEqual(coords.getBoxSize(), 16)
        by_mic = {}
        names = {m.getObjId(): convert.mic_name(m) for m in mics}
        for c in coords.iterItems():
            by_mic.setdefault(names[c.getMicId()], []).append(c.getPosition())
        self.assertEqual(sorted(by_mic['mic_1']), [(5, 30), (60, 2)])
        self.assertEqual(by_mic['mic_2'], [(11, 11)])
        back = convert.coordinates2d_to_frame(coords, mics)
        self.assertEqual(sorted(zip(back[star.X], back[star.Y])), [(5.0, 30.0), (11.0, 11.0), (60.0, 2.0)])


class TestEngineErrorsReachTheProtocol(BaseTest):
    """Bad data found by the engine fails the protocol with the engine's one-line message."""

    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.dataDir = os.path.abspath(cls.proj.getPath('inputs'))
        os.makedirs(cls.dataDir, exist_ok=True)
        write_mrc(os.path.join(cls.dataDir, 'flat.mrc'), np.full((20, 30, 40), 3.0, np.float32), 10.0)

    def test_constant_tomogram(self):
        from cryopick_plugin.protocols import CryopickDogPick
        tomos = self.newProtocol(ProtImportTomograms, filesPath=self.dataDir, filesPattern='flat.mrc',
                                 samplingRate=10.0)
        self.launchProtocol(tomos)
        dog = self.newProtocol(CryopickDogPick, inputTomograms=tomos.Tomograms, diameter=6.0)
        with self.assertRaises(Exception):
            self.launchProtocol(dog)
        message = dog.getErrorMessage()
        self.assertIn('flat.mrc: is constant (every voxel is 3)', message)
        self.assertNotIn('\n', message.strip())
        self.assertFalse(dog.hasAttribute('output3DCoordinates'))
