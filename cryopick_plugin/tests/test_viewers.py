"""Viewers: figures made headless from small synthetic results, and the Viewer classes' wiring.

Figures are checked as images (valid PNG, sensible size) and, where it is cheap, for what they draw: a
pick changes pixels where it should and nowhere else. No Scipion protocol runs here; the files a finished
protocol leaves are written by hand (with the engine's own writers where there are any).
"""
import json
import os

import numpy as np
import pytest
from PIL import Image

from cryopick_plugin.engine.io import mrc, star
from cryopick_plugin.engine.pick2d import preprocess as preprocess2d
from cryopick_plugin.engine.errors import InputError
from cryopick_plugin.engine.pick3d.training import write_history
from cryopick_plugin.viewers import figures as fig


def _image(path):
    assert os.path.exists(path), path
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == 'PNG'
        assert 300 <= img.width <= 3000 and 200 <= img.height <= 4000, img.size
        return np.asarray(img.convert('RGB'), dtype=np.int16)


def _diff(a, b):
    assert a.shape == b.shape
    return np.abs(a - b).sum(axis=2) > 30


@pytest.fixture
def tomogram(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / 'tomo_001.mrc'
    mrc.write_mrc(path, rng.normal(size=(32, 48, 64)).astype(np.float32), 10.0)
    return str(path)


# -------------------------------------------------------------------------------------------- figures
def test_learning_curves_from_the_trainer_history(tmp_path):
    model = tmp_path / 'model.pt'
    history = []
    for epoch in range(1, 11):
        record = {'epoch': epoch, 'train_loss': 1.0 / epoch, 'lr': 1e-3, 'seconds': 1.0}
        if epoch % 2 == 0:  # validation every other epoch, as train3d does with val_every=2
            record.update(val_loss=1.2 / epoch, val_precision=0.5, val_recall=0.5, val_f1=epoch / 10,
                          val_score=0.5 - abs(epoch - 6) / 20)
        history.append(record)
    write_history(model, history)
    rows = fig.read_history(str(model) + '.history.csv')
    assert len(rows) == 10 and np.isnan(rows[0]['val_loss']) and rows[1]['val_f1'] == pytest.approx(0.2)
    assert fig.best_epoch_of(rows) == 6  # highest val_score, not highest F1 (epoch 10)
    assert fig.read_history(str(model) + '.history.json')[5]['val_score'] == pytest.approx(0.5)
    out = fig.learning_curves(rows, tmp_path / 'lc.png')
    _image(out)


def test_read_history_formats_and_errors(tmp_path):
    side = tmp_path / 'csn.pt.json'
    side.write_text(json.dumps({'method': 'cryosegnet', 'meta': {'best_epoch': 1, 'history': [
        {'epoch': 0, 'train_loss': None, 'val_loss': 0.9, 'val_dice': 0.1},
        {'epoch': 1, 'train_loss': 0.7, 'val_loss': 0.6, 'val_dice': 0.4}]}}))
    rows = fig.read_history(side)
    assert [r['epoch'] for r in rows] == [0, 1] and np.isnan(rows[0]['train_loss'])
    assert fig.best_epoch_of(rows) == 1
    with pytest.raises(InputError, match='not found'):
        fig.read_history(tmp_path / 'missing.csv')
    bad = tmp_path / 'bad.json'
    bad.write_text(json.dumps({'nothing': 1}))
    with pytest.raises(InputError, match='no per-epoch history'):
        fig.read_history(bad)


def test_tomogram_slices_draw_a_pick_on_the_slice_that_cuts_it(tmp_path, tomogram):
    # z slices at 8, 16, 23 (fractions 0.25, 0.5, 0.75 of 31); xz at y = 23
    empty = _image(fig.tomogram_slices(tomogram, None, tmp_path / 'none.png', radius=4))
    # Picks cut by no slice (|z - slice| > 4 and |y - 23| > 4), one of class 2 each: same legend everywhere.
    two = np.array([2])
    base = _image(fig.tomogram_slices(tomogram, star.coordinates_frame(np.array([[20.0, 10.0, 1.0]]), 't', two),
                                      tmp_path / 'base.png', radius=4, title='x'))
    same = _image(fig.tomogram_slices(tomogram, star.coordinates_frame(np.array([[50.0, 40.0, 30.0]]), 't', two),
                                      tmp_path / 'far.png', radius=4, title='x'))
    assert not _diff(same, base).any()
    assert empty.shape == base.shape

    near = star.coordinates_frame(np.array([[56.0, 40.0, 16.0]]), 't', classes=two)
    drawn = _image(fig.tomogram_slices(tomogram, near, tmp_path / 'near.png', radius=4, title='x'))
    changed = _diff(drawn, base)
    rows, cols = np.nonzero(changed)
    assert len(rows) > 20
    h, w = changed.shape
    # Only the middle xy panel (z = 16), top row of panels: the pick is not near y = 23, so not in xz.
    assert w / 3 < cols.min() and cols.max() < 2 * w / 3
    assert rows.max() < h / 2
    # x = 56 of 64 lies in the right part of that panel, y = 40 of 48 in its upper part (y points up).
    assert cols.mean() > w / 2 + w / 12
    assert rows.mean() < h / 4


def test_score_histograms_and_empty_scores(tmp_path):
    df = star.coordinates_frame(np.zeros((6, 3)), 't', classes=np.array([1, 1, 1, 2, 2, 2]),
                                scores=np.linspace(0.1, 0.9, 6))
    _image(fig.score_histograms(df, tmp_path / 'h.png'))
    _image(fig.score_histograms(df.drop(columns=[star.SCORE]), tmp_path / 'none.png'))


def test_micrograph_picks_use_row_downwards_and_colour_by_score(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.normal(size=(300, 400)).astype(np.float32)
    path = tmp_path / 'mic.mrc'
    mrc.write_mrc(path, image, 1.0)
    none = star.coordinates_frame(np.zeros((0, 2)), 'mic', micrograph=True)
    base = _image(fig.micrograph_picks(path, none, tmp_path / 'a.png', radius=15, title='t',
                                       score_range=(0, 1)))
    picks = star.coordinates_frame(np.array([[330.0, 50.0]]), 'mic', scores=np.array([0.9]), micrograph=True)
    drawn = _image(fig.micrograph_picks(image, picks, tmp_path / 'b.png', radius=15, title='t',
                                        score_range=(0, 1)))
    # the colour bar is drawn in both (fixed range); only the circle differs
    rows, cols = np.nonzero(_diff(drawn, base))
    assert len(rows) > 20
    h, w = base.shape[:2]
    assert rows.mean() < h / 3        # row 50 of 300: near the top (row 0 at the top)
    assert w / 2 < cols.mean() < w    # column 330 of 400: right half (colour bar excluded by the diff)


def test_probability_map_and_preprocessing_stages(tmp_path):
    rng = np.random.default_rng(2)
    prob = rng.random((120, 160)).astype(np.float32)
    mrc.write_mrc(tmp_path / 'p.mrc', prob, 1.0)
    picks = star.coordinates_frame(np.array([[300.0, 100.0]]), 'm', scores=np.array([0.5]), micrograph=True)
    _image(fig.probability_map(str(tmp_path / 'p.mrc'), tmp_path / 'p.png', picks, image_shape=(240, 320),
                               radius=10))
    _, stages = preprocess2d.run_chain(rng.normal(size=(96, 128)).astype(np.float32), 'cryosegnet',
                                       keep_stages=True)
    assert stages[0][0] == 'input' and len(stages) > 3
    _image(fig.preprocessing_stages(stages, tmp_path / 's.png'))
    with pytest.raises(InputError):
        fig.preprocessing_stages([], tmp_path / 'x.png')


def _disca_dir(folder, n=60, iterations=4, k=3):
    """What `cryopick disca` leaves in its --out folder (history.json, embeddings.npz, class averages)."""
    rng = np.random.default_rng(3)
    os.makedirs(folder, exist_ok=True)
    labels = rng.integers(0, k, size=(iterations, n))
    np.savez_compressed(os.path.join(folder, 'embeddings.npz'),
                        embeddings=rng.normal(size=(iterations, n, 2)).astype(np.float32), labels=labels)
    averages = []
    for c in range(k):
        name = f'class_{c + 1:03d}_average.mrc'
        mrc.write_mrc(os.path.join(folder, name), rng.normal(size=(10, 10, 10)).astype(np.float32), 10.0)
        averages.append({'class': c + 1, 'file': name, 'size': int((labels[-1] == c).sum()), 'aligned': False})
    history = {'iterations': [{'iteration': i, 'k': k, 'bic': 100.0 - i, 'ddbi': 1.0 / (i + 1),
                               'changed': 1.0 / (i + 1), 'sizes': [20] * k} for i in range(iterations)],
               'kept_iteration': 2, 'k': k, 'class_averages': averages}
    with open(os.path.join(folder, 'history.json'), 'w') as fh:
        json.dump(history, fh)
    return history


def test_disca_figures(tmp_path):
    history = _disca_dir(tmp_path / 'disca')
    _image(fig.disca_history(str(tmp_path / 'disca' / 'history.json'), tmp_path / 'h.png'))
    _image(fig.disca_feature_space(str(tmp_path / 'disca' / 'embeddings.npz'), tmp_path / 'f.png', kept_iteration=2))
    averages = [dict(a, file=str(tmp_path / 'disca' / a['file'])) for a in history['class_averages']]
    _image(fig.class_average_slices(averages, tmp_path / 'a.png'))
    with pytest.raises(InputError):
        fig.disca_feature_space(np.zeros((2, 5, 2)), tmp_path / 'bad.png', labels=np.zeros((3, 5)))


def test_disca_history_marks_a_final_k_changed_by_the_checks(tmp_path):
    from PIL import Image
    history = _disca_dir(tmp_path / 'disca')
    same = np.asarray(Image.open(fig.disca_history(history, tmp_path / 'same.png')))
    changed = np.asarray(Image.open(fig.disca_history(dict(history, k=history['k'] + 1), tmp_path / 'split.png')))
    assert same.shape == changed.shape and np.any(same != changed)
    # refinement iterations after the split check are shaded (grey, behind the curves)
    refined = dict(history, iterations=[dict(h, phase='refine' if h['iteration'] >= 3 else 'cluster')
                                        for h in history['iterations']])
    shaded = np.asarray(Image.open(fig.disca_history(refined, tmp_path / 'refined.png')))
    assert shaded.shape == same.shape and np.any(shaded != same)


def test_many_iterations_keep_first_kept_and_last(tmp_path):
    assert fig.shown_iterations(5, 2, max_panels=12) == [0, 1, 2, 3, 4]
    for n, kept, cap in ((30, 17, 6), (30, 0, 4), (100, 51, 12), (13, 12, 12)):
        shown = fig.shown_iterations(n, kept, max_panels=cap)
        assert len(shown) <= cap and {0, kept, n - 1} <= set(shown), (n, kept, cap, shown)
        assert shown == sorted(set(shown))
    emb = np.random.default_rng(4).normal(size=(30, 20, 2))
    _image(fig.disca_feature_space(emb, tmp_path / 'f.png', labels=np.zeros((30, 20), int), kept_iteration=17,
                                   max_panels=6))


def test_up_to_date_cache(tmp_path):
    src, png = tmp_path / 'a.json', tmp_path / 'a.png'
    src.write_text('{}')
    assert not fig.up_to_date(png, src)
    png.write_bytes(b'x')
    os.utime(src, (1000, 1000))
    assert fig.up_to_date(png, src, tmp_path / 'missing')
    os.utime(src, None)
    os.utime(png, (1000, 1000))
    assert not fig.up_to_date(png, src)


# -------------------------------------------------------------------------------------------- viewers
class _Project:
    """Stands in for the Scipion project a Viewer is given (only checked for being there)."""


class _FakeRun:
    """The parts of a finished protocol the DISCA / 2D viewers read: its extra folder and inputs."""

    def __init__(self, folder):
        self.folder = str(folder)

    def _getExtraPath(self, *names):
        return os.path.join(self.folder, 'extra', *names)


def test_viewer_classes_target_the_protocols(tmp_path):
    from pyworkflow.viewer import DESKTOP_TKINTER
    from tomo.objects import SetOfCoordinates3D
    from cryopick_plugin import viewers
    from cryopick_plugin.objects import CryopickModel
    from cryopick_plugin.protocols import (CryopickCryoSegNet, CryopickDeepCryoPicker, CryopickDisca,
                                           CryopickDiscaPredict, CryopickDogPick, CryopickPick3D, CryopickTrain3D,
                                           CryopickTrainCryoSegNet)
    expected = {viewers.CryopickTrainingViewer: {CryopickTrain3D, CryopickTrainCryoSegNet, CryopickModel},
                viewers.CryopickCoordinates3DViewer: {CryopickPick3D, CryopickDogPick, SetOfCoordinates3D},
                viewers.CryopickDiscaViewer: {CryopickDisca, CryopickDiscaPredict},
                viewers.CryopickPicking2DViewer: {CryopickDeepCryoPicker, CryopickCryoSegNet}}
    for cls, targets in expected.items():
        assert targets <= set(cls._targets), cls
        assert cls._environments == [DESKTOP_TKINTER]
        viewer = cls(project=_Project(), tmpPath=str(tmp_path / 'Tmp'))
        assert callable(viewer.figures) and viewer._label.startswith('cryopick')


def test_disca_viewer_makes_and_caches_figures(tmp_path):
    from pyworkflow.viewer import MessageView
    from cryopick_plugin.viewers import CryopickDiscaViewer
    from cryopick_plugin.viewers.views import PngView
    run = _FakeRun(tmp_path / 'Runs' / '000005_CryopickDisca')
    viewer = CryopickDiscaViewer(project=_Project(), tmpPath=str(tmp_path / 'Tmp'))
    views = viewer._visualize(run)
    assert len(views) == 1 and isinstance(views[0], MessageView)  # nothing there yet
    _disca_dir(run._getExtraPath('disca'))
    paths = viewer.figures(run)
    assert [os.path.basename(p) for p in paths] == ['disca_history.png', 'disca_feature_space.png',
                                                     'disca_class_averages.png']
    for p in paths:
        assert os.path.dirname(p) == run._getExtraPath('viewer')
        _image(p)
    stamps = [os.path.getmtime(p) for p in paths]
    os.utime(paths[0], (stamps[0] - 100, stamps[0] - 100))  # older than its source: must be redrawn
    assert viewer.figures(run) == paths
    assert os.path.getmtime(paths[0]) > stamps[0] - 100 and os.path.getmtime(paths[1]) == stamps[1]
    views = viewer._visualize(run)
    assert len(views) == 1 and isinstance(views[0], PngView) and views[0].getPaths() == paths


def test_coordinates_viewer_on_real_scipion_sets(tmp_path, tomogram):
    from tomo import constants as tconst
    from tomo.objects import Coordinate3D, SetOfCoordinates3D, SetOfTomograms, Tomogram
    from cryopick_plugin.viewers import CryopickCoordinates3DViewer
    from cryopick_plugin.viewers.viewer_base import made_by_cryopick
    run = tmp_path / 'Runs' / '000007_CryopickDogPick'
    run.mkdir(parents=True)
    tomos = SetOfTomograms(filename=str(run / 'tomograms.sqlite'))
    tomos.setSamplingRate(10.0)
    t = Tomogram(location=tomogram)
    t.setSamplingRate(10.0)
    t.setTsId('tomo_001')
    tomos.append(t)
    tomos.write()
    coords = SetOfCoordinates3D(filename=str(run / 'coordinates.sqlite'))
    coords.setPrecedents(tomos)
    coords.setSamplingRate(10.0)
    coords.setBoxSize(12)
    for (x, y, z), group in (((56, 40, 16), 1), ((10, 10, 8), 2)):
        c = Coordinate3D()
        c.setVolume(t)
        c.setPosition(x, y, z, tconst.BOTTOM_LEFT_CORNER)
        c.setGroupId(group)
        c.setScore(0.5)
        coords.append(c)
    coords.write()
    assert made_by_cryopick(coords) and CryopickCoordinates3DViewer.can_handle_this_instance(coords)
    other = SetOfCoordinates3D(filename=str(tmp_path / 'elsewhere.sqlite'))
    assert not CryopickCoordinates3DViewer.can_handle_this_instance(other)

    viewer = CryopickCoordinates3DViewer(project=_Project(), tmpPath=str(tmp_path / 'Tmp'))
    paths = viewer.figures(coords)
    assert [os.path.basename(p) for p in paths] == ['slices_tomo_001.png', 'score_histogram.png']
    assert os.path.dirname(paths[0]) == str(run / 'extra' / 'viewer' / 'coordinates')
    for p in paths:
        _image(p)


def test_picking2d_figures_from_a_picks_folder(tmp_path):
    from cryopick_plugin.viewers.viewer_picking2d import picking2d_figures, read_picks2d
    rng = np.random.default_rng(5)
    picks_dir, mics = tmp_path / 'extra' / 'picks', {}
    picks_dir.mkdir(parents=True)
    for i in range(2):
        path = tmp_path / f'mic_{i}.mrc'
        mrc.write_mrc(path, rng.normal(size=(120, 160)).astype(np.float32), 2.0)
        mics[f'mic_{i}'] = str(path)
    table = star.coordinates_frame(np.array([[40.0, 30.0], [100.0, 90.0]]), 'mic_0.mrc',
                                   scores=np.array([0.3, 0.8]), micrograph=True)
    table[star.DIAMETER] = [20.0, 24.0]
    star.write_coordinates(picks_dir / 'mic_0_picks.star', table)
    mrc.write_mrc(picks_dir / 'mic_0_prob.mrc', rng.random((120, 160)).astype(np.float32), 2.0)
    assert len(read_picks2d(str(picks_dir / 'mic_1_picks.star'))) == 0  # no picks file: no picks
    paths = picking2d_figures(mics, str(picks_dir), str(tmp_path / 'viewer'), chain='cryosegnet')
    names = [os.path.basename(p) for p in paths]
    assert names[:3] == ['picks_mic_0.png', 'probability_mic_0.png', 'picks_mic_1.png']
    assert names[3].startswith('preprocessing_cryosegnet_') and names[4] == 'score_histogram.png'
    for p in paths:
        _image(p)
    # another chain setting gets its own figure instead of a stale one
    other = picking2d_figures(mics, str(picks_dir), str(tmp_path / 'viewer'), chain='cryosegnet',
                              chain_options={'switches': {'nlmeans': False}})
    assert other[3] != paths[3] and os.path.exists(other[3])


def test_training_viewer_reads_model_histories(tmp_path):
    from cryopick_plugin.viewers.viewer_training import model_figures
    model = tmp_path / 'deepetpicker_model.pt'
    (tmp_path / 'deepetpicker_model.pt.json').write_text(json.dumps({'method': 'deepetpicker',
                                                                      'meta': {'best_epoch': 2}}))
    write_history(model, [{'epoch': e, 'train_loss': 1.0 / e, 'val_loss': 0.5, 'val_score': 0.1 * e}
                          for e in (1, 2, 3)])
    paths = model_figures(model, str(tmp_path / 'v'))
    assert [os.path.basename(p) for p in paths] == ['deepetpicker_model_learning_curves.png']
    _image(paths[0])
    disca = tmp_path / 'disca_model.pt'
    (tmp_path / 'disca_model.pt.json').write_text(json.dumps({'method': 'disca', 'meta': {
        'best_iteration': 1, 'history': [{'iteration': i, 'k': 2, 'bic': 5.0 - i, 'ddbi': 0.5} for i in range(3)]}}))
    _image(model_figures(disca, str(tmp_path / 'v'))[0])
    dcp = tmp_path / 'deepcryopicker_model.pt'
    (tmp_path / 'deepcryopicker_model.pt.json').write_text(json.dumps({'method': 'deepcryopicker', 'meta': {}}))
    assert model_figures(dcp, str(tmp_path / 'v')) == []  # no per-epoch history to draw


def test_png_view_fits_images_without_a_display(tmp_path):
    from cryopick_plugin.viewers.views import PngView, fit_size, png_views
    assert fit_size((2000, 1000), (1000, 1000)) == (1000, 500)
    assert fit_size((300, 200), (1000, 1000)) == (300, 200)
    view = PngView(str(tmp_path / 'a.png'), title='t')
    assert view.getPaths() == [str(tmp_path / 'a.png')] and view.getTitle() == 't'
    assert png_views([]) == [] and len(png_views(['a.png', 'b.png'])) == 1


def test_picking2d_viewer_preprocesses_like_the_method(tmp_path):
    from cryopick_plugin.objects import CryopickModel
    from cryopick_plugin.protocols import CryopickCryoSegNet, CryopickDeepCryoPicker
    from cryopick_plugin.viewers import CryopickPicking2DViewer
    viewer = CryopickPicking2DViewer(project=_Project(), tmpPath=str(tmp_path / 'Tmp'))
    switches = {'blur': True, 'nlmeans': False, 'wiener': True, 'clahe': True, 'guided': True}
    (tmp_path / 'csn.pt.json').write_text(json.dumps({'method': 'cryosegnet', 'meta': {'preprocess': switches}}))
    csn = CryopickCryoSegNet()
    csn.inputModel.set(CryopickModel(path=str(tmp_path / 'csn.pt'), method='cryosegnet'))
    # CryoSegNet denoises at full resolution with the model's own switches
    assert viewer._chain(csn) == ('cryosegnet', {'bin_factor': 1.0, 'switches': switches})
    dcp = CryopickDeepCryoPicker()
    dcp.polarity.set(1)
    assert viewer._chain(dcp) == ('deepcryopicker', {'polarity': 'bright'})
