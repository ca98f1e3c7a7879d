"""2D protocols chained in a throw-away Scipion project on simulated micrographs.

import micrographs → import truth (STAR) → CryoSegNet training → CryoSegNet picking (U-Net path; no SAM
weights exist offline) and DeepCryoPicker (fully automatic). Asserts on the coordinate sets: sizes, box sizes,
micrograph links and positions inside the micrographs, plus validation errors for bad input.
"""
import os

import pandas as pd

from pyworkflow.tests import BaseTest, setupTestProject
from pwem.protocols import ProtImportMicrographs

from cryopick_plugin import convert
from cryopick_plugin.engine.io import star
from cryopick_plugin.engine.evaluate import evaluate_picks
from cryopick_plugin.engine.sim.micrographs import simulate_micrograph, write_simulated_micrograph
from cryopick_plugin.protocols import (CryopickImportCoordinates2D, CryopickTrainCryoSegNet, CryopickCryoSegNet,
                                       CryopickDeepCryoPicker, CryopickCompareCoordinates)

PIXEL = 5.0
SHAPE = (320, 384)


class TestProtocols2D(BaseTest):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.dataDir = os.path.abspath(cls.proj.getPath('simulated'))
        os.makedirs(cls.dataDir, exist_ok=True)
        truth = []
        for i in range(3):
            sim = simulate_micrograph(shape=SHAPE, template='1bxn', n_particles=20, snr=1.0, pixel_size=PIXEL,
                                      seed=20 + i, name=f'mic_{i:03d}')
            write_simulated_micrograph(sim, cls.dataDir)
            truth.append(sim.truth)
        cls.truth = pd.concat(truth, ignore_index=True)
        cls.truth[star.MIC] = cls.truth[star.MIC].map(lambda n: os.path.splitext(os.path.basename(n))[0])
        cls.diameterA = sim.meta['particle_diameter_px'] * PIXEL
        cls.protMics = cls.newProtocol(ProtImportMicrographs, filesPath=cls.dataDir, filesPattern='mic_*.mrc',
                                       samplingRate=PIXEL)
        cls.launchProtocol(cls.protMics)
        cls.protTruth = cls.newProtocol(CryopickImportCoordinates2D, inputMicrographs=cls.protMics.outputMicrographs,
                                        starFiles=os.path.join(cls.dataDir, 'mic_*_truth.star'), boxSize=48)
        cls.launchProtocol(cls.protTruth)

    def _check_picks(self, coords, box):
        mics = convert.micrographs_by_name(self.protMics.outputMicrographs)
        self.assertEqual(coords.getBoxSize(), box)
        df = convert.coordinates2d_to_frame(coords, self.protMics.outputMicrographs)
        self.assertTrue(set(df[star.MIC]) <= set(mics))
        self.assertTrue(((df[star.X] >= 0) & (df[star.X] < SHAPE[1]) & (df[star.Y] >= 0) & (df[star.Y] < SHAPE[0])).all())
        return df

    def test_truth_import(self):
        coords = self.protTruth.outputCoordinates
        self.assertEqual(coords.getSize(), len(self.truth))
        df = self._check_picks(coords, 48)
        scores = evaluate_picks(df, self.truth, radius=1.0)
        self.assertEqual(scores['localisation']['f1'], 1.0)

    def test_cryosegnet_train_and_pick(self):
        train = self.newProtocol(CryopickTrainCryoSegNet, inputMicrographs=self.protMics.outputMicrographs,
                                 inputCoordinates=self.protTruth.outputCoordinates, diameter=self.diameterA,
                                 epochs=2, preprocess=False, valFraction=0.34, learningRate=1e-3)
        self.launchProtocol(train)
        model = train.outputModel
        self.assertEqual(model.getMethod(), 'cryosegnet')
        self.assertTrue(model.exists())
        self.assertAlmostEqual(model.getSamplingRate(), PIXEL)
        pick = self.newProtocol(CryopickCryoSegNet, inputMicrographs=self.protMics.outputMicrographs,
                                inputModel=model, threshold=0.3, boxSize=40)
        self.launchProtocol(pick)
        self._check_picks(pick.outputCoordinates, 40)
        self.assertIn('U-Net-only', '\n'.join(pick.summary()))
        # a missing SAM checkpoint is refused before anything runs
        bad = self.newProtocol(CryopickCryoSegNet, inputMicrographs=self.protMics.outputMicrographs,
                               inputModel=model, samCheckpoint='/nonexistent/sam_vit_b.pth')
        self.assertTrue(any('Segment Anything checkpoint not found' in e for e in bad.validate()))

    def test_deepcryopicker(self):
        prot = self.newProtocol(CryopickDeepCryoPicker, inputMicrographs=self.protMics.outputMicrographs,
                                diameter=self.diameterA, clustering=1)  # k-means: the fastest that copes here
        self.launchProtocol(prot)
        df = self._check_picks(prot.outputCoordinates, int(2 * round(0.75 * self.diameterA / PIXEL)))
        self.assertGreater(len(df), 0)
        scores = evaluate_picks(df, self.truth, radius=self.diameterA / PIXEL / 2)
        self.assertGreater(scores['localisation']['f1'], 0.5, scores['localisation'])
        self.assertEqual(prot.outputModel.getMethod(), 'deepcryopicker')

    def test_bad_input_diameter_larger_than_micrograph(self):
        prot = self.newProtocol(CryopickDeepCryoPicker, inputMicrographs=self.protMics.outputMicrographs,
                                diameter=PIXEL * 1000)
        self.assertTrue(any('larger than the micrographs' in e for e in prot.validate()))

    def test_compare_coordinates(self):
        """Truth against a copy with 5 picks removed and 3 moved far: exact counts in the three output sets."""
        mics = self.protMics.outputMicrographs
        df = self.truth.copy().reset_index(drop=True)
        moved = df.iloc[5:8].copy()
        moved[star.X] = (moved[star.X] + 100) % SHAPE[1]
        altered = pd.concat([df.iloc[8:], moved], ignore_index=True)
        path = os.path.join(self.dataDir, 'altered.star')
        star.write_coordinates(path, altered)
        other = self.newProtocol(CryopickImportCoordinates2D, inputMicrographs=mics, starFiles=path, boxSize=48)
        self.launchProtocol(other)
        cmp = self.newProtocol(CryopickCompareCoordinates, inputCoordinatesA=other.outputCoordinates,
                               inputCoordinatesB=self.protTruth.outputCoordinates, radius=3.0)
        self.launchProtocol(cmp)
        # the moved picks may by chance land on another particle: count them from the data
        from cryopick_plugin.engine.evaluate import compare_sets
        _, only_a, only_b, _ = compare_sets(altered, df, 3.0)
        self.assertEqual(cmp.intersection.getSize(), len(altered) - len(only_a))
        self.assertEqual(cmp.onlyA.getSize(), len(only_a))
        self.assertEqual(cmp.onlyB.getSize(), len(only_b))
        self.assertGreaterEqual(cmp.onlyB.getSize(), 5)  # the removed picks
        self.assertIn('F1', '\n'.join(cmp.summary()))
