"""3D protocols chained in a throw-away Scipion project on simulated tomograms.

import tomograms → import truth (STAR) → DoG candidates → subtomogram extraction; truth → weak labels.
Asserts on the output sets: sizes, sampling rates, tsId links, positions and the files behind them.
"""
import json
import os

import numpy as np
import pandas as pd

from pyworkflow.tests import BaseTest, setupTestProject
from tomo import constants as tconst
from tomo.protocols import ProtImportTomograms

from cryopick_plugin import convert
from cryopick_plugin.engine.io import mrc, star
from cryopick_plugin.engine.evaluate import evaluate_picks
from cryopick_plugin.engine.sim.tomograms import simulate_tomogram, write_simulated_tomogram
from cryopick_plugin.protocols import (CryopickImportCoordinates3D, CryopickDogPick, CryopickExtractSubtomograms,
                                       CryopickWeakLabels, CryopickDisca, CryopickDiscaPredict, CryopickTrain3D,
                                       CryopickPick3D, CryopickImportModel, CryopickCompareCoordinates)

SHAPE = (56, 112, 112)
CLASSES = ('3j9i', '1bxn')


class TestProtocols3D(BaseTest):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.dataDir = os.path.abspath(cls.proj.getPath('simulated'))
        os.makedirs(cls.dataDir, exist_ok=True)
        cls.truth = []
        for i in range(2):
            sim = simulate_tomogram(shape=SHAPE, classes=CLASSES, n_per_class=10, snr=0.5, seed=10 + i,
                                    name=f'tomo_{i:03d}')
            write_simulated_tomogram(sim, cls.dataDir)
            cls.truth.append(sim.truth)
        cls.truth = pd.concat(cls.truth, ignore_index=True)
        cls.diameter = max(sim.meta['diameters_vox'].values())
        cls.protTomos = cls.newProtocol(ProtImportTomograms, filesPath=cls.dataDir, filesPattern='tomo_*.mrc',
                                        samplingRate=10.0)
        cls.launchProtocol(cls.protTomos)
        cls.protTruth = cls.newProtocol(CryopickImportCoordinates3D, inputTomograms=cls.protTomos.Tomograms,
                                        starFiles=os.path.join(cls.dataDir, 'tomo_*_truth.star'), boxSize=24)
        cls.launchProtocol(cls.protTruth)

    def test_truth_import(self):
        coords = self.protTruth.output3DCoordinates
        self.assertEqual(coords.getSize(), len(self.truth))
        back = convert.coordinates3d_to_frame(coords, self.protTomos.Tomograms)
        for ts in ('tomo_000', 'tomo_001'):
            np.testing.assert_allclose(
                np.sort(star.xyz_array(back[back[star.TOMO] == ts]), axis=0),
                np.sort(star.xyz_array(self.truth[self.truth[star.TOMO] == ts]), axis=0), atol=1e-4)

    def test_dog_then_extract(self):
        dog = self.newProtocol(CryopickDogPick, inputTomograms=self.protTomos.Tomograms,
                               diameter=float(self.diameter), maxPicks=40, boxSize=24)
        self.launchProtocol(dog)
        picks = dog.output3DCoordinates
        self.assertGreater(picks.getSize(), 0)
        self.assertAlmostEqual(picks.getSamplingRate(), 10.0)
        self.assertEqual(picks.getBoxSize(), 24)
        df = convert.coordinates3d_to_frame(picks, self.protTomos.Tomograms)
        self.assertEqual(sorted(df[star.TOMO].unique()), ['tomo_000', 'tomo_001'])
        # The candidates are real particles: most of the truth is found at this easy SNR.
        scores = evaluate_picks(df, self.truth, radius=self.diameter / 2)
        self.assertGreater(scores['localisation']['recall'], 0.6)
        # the compare protocol gives the same counts as the evaluator, as Scipion sets
        cmp = self.newProtocol(CryopickCompareCoordinates, inputCoordinatesA=picks,
                               inputCoordinatesB=self.protTruth.output3DCoordinates, radius=self.diameter / 2)
        self.launchProtocol(cmp)
        loc = scores['localisation']
        self.assertEqual((cmp.intersection.getSize(), cmp.onlyA.getSize(), cmp.onlyB.getSize()),
                         (loc['tp'], loc['fp'], loc['fn']))
        self.assertEqual(set(cmp.intersection.getUniqueValues('_tomoId')), {'tomo_000', 'tomo_001'})

        ext = self.newProtocol(CryopickExtractSubtomograms, inputCoordinates=picks, boxSize=24, binning=2)
        self.launchProtocol(ext)
        subtomos = ext.outputSubtomograms
        self.assertGreater(subtomos.getSize(), 0)
        self.assertLessEqual(subtomos.getSize(), picks.getSize())
        self.assertAlmostEqual(subtomos.getSamplingRate(), 20.0)
        tomos = convert.tomograms_by_name(self.protTomos.Tomograms)
        for subtomo in subtomos.iterItems():
            self.assertTrue(os.path.exists(subtomo.getFileName()))
            data, voxel = mrc.open_volume(subtomo.getFileName())
            self.assertEqual(data.shape, (12, 12, 12))
            self.assertAlmostEqual(voxel, 20.0, places=3)
            coord = subtomo.getCoordinate3D()
            self.assertIn(coord.getTomoId(), tomos)
            # the box lies inside the tomogram: its centre is at least half a box from every border
            coord.setVolume(tomos[coord.getTomoId()])
            x, y, z = coord.getPosition(tconst.BOTTOM_LEFT_CORNER)
            self.assertTrue(12 <= x <= SHAPE[2] - 12 and 12 <= y <= SHAPE[1] - 12 and 12 <= z <= SHAPE[0] - 12)

    def test_weak_labels(self):
        prot = self.newProtocol(CryopickWeakLabels, inputTomograms=self.protTomos.Tomograms,
                                inputCoordinates=self.protTruth.output3DCoordinates, diameter=7)
        self.launchProtocol(prot)
        masks = prot.outputTomoMasks
        self.assertEqual(masks.getSize(), 2)
        tomos = convert.tomograms_by_name(self.protTomos.Tomograms)
        for mask in masks.iterItems():
            self.assertEqual(mask.getVolName(), tomos[mask.getTsId()].getFileName())
            self.assertAlmostEqual(mask.getSamplingRate(), 10.0)
            data, _ = mrc.open_volume(mask.getFileName())
            self.assertEqual(data.shape, SHAPE)
            rows = self.truth[self.truth[star.TOMO] == mask.getTsId()]
            self.assertEqual(set(np.unique(data)) - {0}, set(rows[star.CLASS].unique()))
            # every centre carries its own class
            for _, r in rows.iterrows():
                z, y, x = (int(round(r[c])) for c in (star.Z, star.Y, star.X))
                self.assertEqual(int(data[z, y, x]), int(r[star.CLASS]))

    def test_truth_extract_disca_and_predict(self):
        """Subtomograms at the true positions → DISCA → classes, cluster coordinates, model → predict."""
        ext = self.newProtocol(CryopickExtractSubtomograms, inputCoordinates=self.protTruth.output3DCoordinates,
                               boxSize=24)
        self.launchProtocol(ext)
        subtomos = ext.outputSubtomograms
        n = subtomos.getSize()
        self.assertGreaterEqual(n, 20)
        # no tilt given: the missing wedge comes from the tomograms' acquisition (imported at -60…60°)
        disca = self.newProtocol(CryopickDisca, inputSubtomograms=subtomos, kMin=2, kMax=3, maxIter=2,
                                 refineIter=2, alignRefine=False)
        self.assertRegex(' '.join(disca.summary()), r"±60° from the .*acquisition \(-60…60°\)")
        self.launchProtocol(disca)
        classes = disca.outputClasses
        sizes = [c.getSize() for c in classes.iterItems()]
        self.assertEqual(sum(sizes), n)            # every subtomogram in exactly one class
        self.assertGreaterEqual(len(sizes), 2)
        for cls in classes.iterItems():
            self.assertTrue(os.path.exists(cls.getRepresentative().getFileName()))
        coords = disca.output3DCoordinates
        self.assertEqual(coords.getSize(), n)
        self.assertEqual(sorted(set(coords.getUniqueValues('_groupId'))), list(range(1, len(sizes) + 1)))
        self.assertEqual(set(coords.getUniqueValues('_tomoId')), {'tomo_000', 'tomo_001'})
        # cluster coordinates sit where the subtomograms were cut
        back = convert.coordinates3d_to_frame(coords, self.protTomos.Tomograms)
        truth = self.truth
        from cryopick_plugin.engine.evaluate import match_points
        pairs, dist = match_points(star.xyz_array(back), star.xyz_array(truth), 0.5)
        self.assertEqual(len(pairs), n)
        # the split check ran by default and is recorded with the model's meta
        history = json.load(open(disca._getExtraPath('disca', 'history.json')))
        self.assertIn('split_check', history['meta'])
        self.assertEqual(history['meta']['wedge'], {'source': 'given', 'tilt_range': 60.0})
        self.assertIn('-60…60', history['wedge_note'])
        self.assertIn('orientation_merge', history['meta'])
        self.assertEqual(history['k'], len(sizes))
        # the refinement setting reached the engine (it runs only after an accepted split)
        described = json.load(open(disca._getExtraPath('disca', 'disca_model.pt.json')))
        self.assertEqual(described['meta']['options']['refine_iter'], 2)
        model = disca.outputModel
        self.assertEqual(model.getMethod(), 'disca')
        self.assertTrue(model.exists())
        # the alignment refinement, on by default, runs after the clustering: its classes are the output,
        # with aligned class averages
        aligned = self.newProtocol(CryopickDisca, inputSubtomograms=subtomos, kMin=2, kMax=3, maxIter=1)
        self.assertTrue(aligned.alignRefine.get())
        self.launchProtocol(aligned)
        refined = json.load(open(aligned._getExtraPath('disca', 'history.json')))
        self.assertEqual(refined['alignment']['tilt_range'], 60.0)
        self.assertEqual(refined['alignment']['k'], refined['k'])
        self.assertEqual([a['aligned'] for a in refined['class_averages']], [True] * refined['k'])
        self.assertEqual(sum(c.getSize() for c in aligned.outputClasses.iterItems()), n)
        self.assertIn('aligned and wedge-compensated', ' '.join(aligned.summary()))
        pred = self.newProtocol(CryopickDiscaPredict, inputSubtomograms=subtomos, inputModel=model)
        self.launchProtocol(pred)
        self.assertEqual(sum(c.getSize() for c in pred.outputClasses.iterItems()), n)
        # the refined run's model predicts its classes (against the references), so the same subtomograms
        # fall into classes of the same sizes
        again = self.newProtocol(CryopickDiscaPredict, inputSubtomograms=subtomos, inputModel=aligned.outputModel)
        self.launchProtocol(again)
        predicted = sorted(c.getSize() for c in again.outputClasses.iterItems())
        refined_sizes = sorted(c.getSize() for c in aligned.outputClasses.iterItems())
        self.assertEqual(len(predicted), len(refined_sizes))
        self.assertLessEqual(sum(abs(a - b) for a, b in zip(predicted, refined_sizes)), 0.1 * n)

    def test_labels_train_pick_and_model_import(self):
        """Weak labels → training (2 short epochs) → picking → model import → picking again."""
        labels = self.newProtocol(CryopickWeakLabels, inputTomograms=self.protTomos.Tomograms,
                                  inputCoordinates=self.protTruth.output3DCoordinates, diameter=7)
        self.launchProtocol(labels)
        train = self.newProtocol(CryopickTrain3D, inputLabels=labels.outputTomoMasks,
                                 inputCoordinates=self.protTruth.output3DCoordinates, validationTsIds='tomo_001',
                                 epochs=2, valEvery=1, patience=1, tune=False)
        self.launchProtocol(train)
        model = train.outputModel
        self.assertEqual(model.getMethod(), 'deepetpicker')
        self.assertTrue(model.exists())
        self.assertAlmostEqual(model.getSamplingRate(), 10.0)
        self.assertTrue(os.path.exists(model.getPath() + '.history.csv'))
        pick = self.newProtocol(CryopickPick3D, inputTomograms=self.protTomos.Tomograms, inputModel=model,
                                tLm=0.05)
        self.launchProtocol(pick)
        picks = pick.output3DCoordinates
        self.assertAlmostEqual(picks.getSamplingRate(), 10.0)
        self.assertEqual(picks.getBoxSize(), 24)  # from the training coordinates
        self.assertTrue(set(picks.getUniqueValues('_tomoId')) <= {'tomo_000', 'tomo_001'})
        for coord in picks.iterItems():
            self.assertIn(coord.getGroupId(), (1, 2))
        flipped = self.newProtocol(CryopickPick3D, inputTomograms=self.protTomos.Tomograms, inputModel=model,
                                   tLm=0.05, flipAverage=True)
        self.launchProtocol(flipped)
        self.assertTrue(flipped.isFinished())
        with open(flipped.getLogPaths()[0]) as fh:   # the option reached the command
            self.assertIn('--flip-average', fh.read())
        self.assertAlmostEqual(flipped.output3DCoordinates.getSamplingRate(), 10.0)
        imported = self.newProtocol(CryopickImportModel, modelFile=model.getPath(), method=0)
        self.launchProtocol(imported)
        self.assertEqual(imported.outputModel.getMethod(), 'deepetpicker')
        self.assertNotEqual(imported.outputModel.getPath(), model.getPath())
        wrong = self.newProtocol(CryopickImportModel, modelFile=model.getPath(), method=1)  # as a DISCA model
        errors = wrong.validate()
        self.assertTrue(any('is a deepetpicker model, expected a disca model' in e for e in errors), errors)
