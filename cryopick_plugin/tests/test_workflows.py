"""The pipeline scripts of cryopick_plugin/workflows, run as a user runs them, on tiny simulated data.

Each script runs in a child process with the plugin's Python and the headless Scipion environment that
conftest.py put in os.environ (what `scipion3 python script.py` provides): the supervised 3D one through
scipion-app's own launcher (`scipion python <file>`), the label-free one as a plain file path and the 2D one
as a module. The tests then open the project the script made and check that every protocol finished with
non-empty outputs, and that the scores the script printed are there and consistent with those outputs.
"""
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKFLOWS = os.path.join(REPO, 'cryopick_plugin', 'workflows')
SCORE = re.compile(r"SCORE (?P<what>[^:]+): precision (?P<p>[\d.]+), recall (?P<r>[\d.]+), F1 (?P<f1>[\d.]+) "
                   r"\((?P<tp>\d+) of (?P<n_pred>\d+) picks match (?P<n_true>\d+) true particles\)")
TIMEOUT = 900


def _env():
    env = dict(os.environ)
    bindir = os.path.dirname(sys.executable)
    # `scipion python` runs the first `python` on PATH, as in an activated Scipion environment.
    env['PATH'] = bindir + os.pathsep + env.get('PATH', '')
    env.setdefault('OMP_NUM_THREADS', '1')
    return env


def _run(cmd, tmp_path, env=None):
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env or _env(), capture_output=True, text=True,
                          timeout=TIMEOUT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} exited with {proc.returncode}:\n{out[-6000:]}"
    return proc.stdout


def _scores(stdout):
    """{what: metrics} from the SCORE lines a script printed."""
    found = {}
    for m in SCORE.finditer(stdout):
        found[m.group('what')] = {k: float(v) for k, v in m.groupdict().items() if k != 'what'}
    return found


def _project(name, monkeypatch):
    """Load a project the script made and work in its folder (its sets are stored with relative paths);
    monkeypatch brings the test session back to its own folder afterwards."""
    from pyworkflow.project import Manager
    manager = Manager()
    assert manager.hasProject(name), f"project {name} was not created"
    cwd = os.getcwd()
    project = manager.loadProject(name)  # this changes the working folder
    os.chdir(cwd)
    monkeypatch.chdir(project.getPath())  # remembers cwd, restored after the test
    return project


def _finished_runs(project):
    """{protocol class name: [finished protocols]}; fails on any protocol that did not finish."""
    runs = {}
    for prot in project.getRuns():
        assert prot.isFinished(), f"{prot.getRunName()} is {prot.getStatus()}: {prot.getErrorMessage()}"
        runs.setdefault(prot.getClassName(), []).append(prot)
    return runs


def _outputs_non_empty(prot):
    sizes = {}
    for name, output in prot.iterOutputAttributes():
        if hasattr(output, 'getSize'):
            sizes[name] = output.getSize()
    assert sizes or any(True for _ in prot.iterOutputAttributes()), f"{prot.getRunName()} has no output"
    return sizes


def _check_consistent(score):
    assert 0 <= score['p'] <= 1 and 0 <= score['r'] <= 1 and 0 <= score['f1'] <= 1
    assert score['tp'] <= min(score['n_pred'], score['n_true'])
    if score['n_pred']:
        assert score['p'] == pytest.approx(score['tp'] / score['n_pred'], abs=1e-3)
    assert score['r'] == pytest.approx(score['tp'] / score['n_true'], abs=1e-3)


def test_supervised_3d_through_the_scipion_launcher(tmp_path, monkeypatch):
    """import → weak labels → train → pick → extract → RELION, launched as `scipion python <file>`."""
    launcher = os.path.join(os.path.dirname(sys.executable), 'scipion')
    assert os.path.exists(launcher), 'scipion-app\'s launcher is not installed in this environment'
    env = _env()
    # scipion-app refuses to start without an existing SCIPION_HOME (its installation folder).
    env['SCIPION_HOME'] = str(tmp_path / 'scipion_home')
    os.makedirs(env['SCIPION_HOME'])
    name = 'wf_supervised'
    stdout = _run([launcher, 'python', os.path.join(WORKFLOWS, 'supervised_3d.py'), '--simulate',
                   '--project', name, '--count', '2', '--shape', '48', '96', '96', '--per-class', '5',
                   '--epochs', '1', '--patience', '1', '--no-tune', '--t-lm', '0.05'], tmp_path, env)
    project = _project(name, monkeypatch)
    runs = _finished_runs(project)
    for cls in ('ProtImportTomograms', 'CryopickImportCoordinates3D', 'CryopickWeakLabels', 'CryopickTrain3D',
                'CryopickPick3D', 'CryopickExtractSubtomograms'):
        assert len(runs.get(cls, [])) == 1, f"{cls} missing from {sorted(runs)}"
    assert _outputs_non_empty(runs['CryopickImportCoordinates3D'][0]) == {'output3DCoordinates': 20}
    assert _outputs_non_empty(runs['CryopickWeakLabels'][0]) == {'outputTomoMasks': 2}
    assert runs['CryopickTrain3D'][0].outputModel.exists()
    picks = runs['CryopickPick3D'][0].output3DCoordinates.getSize()
    subtomos = runs['CryopickExtractSubtomograms'][0].outputSubtomograms.getSize()
    assert 0 < subtomos <= picks

    scores = _scores(stdout)
    overall = scores['DeepETPicker picks vs truth']
    _check_consistent(overall)
    assert overall['n_pred'] == picks and overall['n_true'] == 20
    # even one epoch finds most particles at this SNR (precision is low at this low t_lm without tuning)
    assert overall['r'] >= 0.5 and overall['tp'] >= 10, overall
    assert 'DeepETPicker picks vs truth [tomo_001, validation]' in scores

    # the RELION export lists every extracted subtomogram, and the picks as coordinates
    from cryopick_plugin.engine.io import star
    relion_dir = os.path.join(project.getPath(), 'relion')
    blocks = star.read_star_blocks(os.path.join(relion_dir, 'particles_subtomo.star'))
    particles = blocks['particles']
    assert len(particles) == subtomos
    assert int(blocks['optics']['rlnImageDimensionality'].iloc[0]) == 3
    for image in particles['rlnImageName']:
        assert os.path.exists(image if os.path.isabs(image) else os.path.join(relion_dir, image))
    coords = star.read_coordinates(os.path.join(relion_dir, 'coordinates.star'), dims=3)
    assert len(coords) == picks
    assert set(coords[star.TOMO]) <= {'tomo_000', 'tomo_001'}


def test_label_free_3d_as_a_file(tmp_path, monkeypatch):
    """DoG → extract → DISCA → chosen class → weak labels → train → pick, run as `python <file>`."""
    name = 'wf_label_free'
    stdout = _run([sys.executable, os.path.join(WORKFLOWS, 'label_free_3d.py'), '--simulate', '--project', name,
                   '--count', '2', '--shape', '48', '96', '96', '--per-class', '8', '--box', '24',
                   '--candidates', '30', '--k-max', '3', '--max-iter', '2', '--epochs', '1', '--patience', '1',
                   '--no-tune', '--t-lm', '0.05'], tmp_path)
    runs = _finished_runs(_project(name, monkeypatch))
    for cls in ('ProtImportTomograms', 'CryopickDogPick', 'CryopickExtractSubtomograms', 'CryopickDisca',
                'ProtSetFilter', 'CryopickWeakLabels', 'CryopickTrain3D', 'CryopickPick3D'):
        assert len(runs.get(cls, [])) == 1, f"{cls} missing from {sorted(runs)}"
    subtomos = runs['CryopickExtractSubtomograms'][0].outputSubtomograms.getSize()
    disca = runs['CryopickDisca'][0]
    sizes = {int(c.getObjId()): c.getSize() for c in disca.outputClasses.iterItems()}
    assert sum(sizes.values()) == subtomos >= 20

    # the chosen class (printed) is the filter's output, renumbered class 1, and trained the picker
    chosen = int(re.search(r"Chosen class: (\d+) \(", stdout).group(1))
    assert chosen in sizes
    selected = next(out for _, out in runs['ProtSetFilter'][0].iterOutputAttributes())
    assert selected.getSize() == sizes[chosen]
    assert set(selected.getUniqueValues('_groupId')) == {1}
    masks = runs['CryopickWeakLabels'][0].outputTomoMasks
    assert masks.getSize() == len(set(selected.getUniqueValues('_tomoId')))
    assert runs['CryopickTrain3D'][0].outputModel.exists()

    scores = _scores(stdout)
    dog = scores['DoG candidates vs truth']
    _check_consistent(dog)
    assert dog['n_true'] == 32 and dog['r'] > 0.5, dog  # DoG finds most particles at this SNR
    final = scores['label-free picks vs truth (all classes)']
    _check_consistent(final)
    assert final['n_pred'] == runs['CryopickPick3D'][0].output3DCoordinates.getSize()
    assert final['n_true'] == 32


def test_class_choice_rule():
    """Centre contrast tells a centred dark blob from noise; the largest non-junk class wins."""
    import numpy as np
    from cryopick_plugin.workflows.common import PipelineError
    from cryopick_plugin.workflows.label_free_3d import centre_contrast, choose_class
    rng = np.random.default_rng(0)
    grid = np.indices((16, 16, 16)) - 7.5
    blob = -np.exp(-(grid ** 2).sum(axis=0) / (2 * 3.0 ** 2)) + 0.05 * rng.standard_normal((16, 16, 16))
    noise = 0.05 * rng.standard_normal((16, 16, 16))
    assert centre_contrast(blob) > 1.0
    assert centre_contrast(-blob, polarity='bright') > 1.0
    assert abs(centre_contrast(noise)) < 0.5
    classes = [{'class': 1, 'size': 40, 'contrast': centre_contrast(noise)},   # largest but junk
               {'class': 2, 'size': 25, 'contrast': centre_contrast(blob)},
               {'class': 3, 'size': 12, 'contrast': centre_contrast(blob) * 0.9}]
    chosen, reason = choose_class(classes)
    assert chosen == 2 and 'junk: 1' in reason
    assert choose_class(classes, requested=3)[0] == 3
    with pytest.raises(PipelineError):
        choose_class(classes, requested=7)


def test_picking_2d_as_a_module(tmp_path, monkeypatch):
    """Micrographs → DeepCryoPicker, CryoSegNet trained on its picks → comparison, run with `python -m`."""
    import cryopick_plugin.protocols as protocols
    name = 'wf_picking_2d'
    stdout = _run([sys.executable, '-m', 'cryopick_plugin.workflows.picking_2d', '--simulate', '--project', name,
                   '--count', '3', '--epochs', '2', '--no-preprocess', '--val-fraction', '0.34', '--lr', '1e-3'],
                  tmp_path)
    runs = _finished_runs(_project(name, monkeypatch))
    for cls in ('ProtImportMicrographs', 'CryopickDeepCryoPicker', 'CryopickTrainCryoSegNet', 'CryopickCryoSegNet'):
        assert len(runs.get(cls, [])) == 1, f"{cls} missing from {sorted(runs)}"
    dcp = runs['CryopickDeepCryoPicker'][0].outputCoordinates.getSize()
    csn = runs['CryopickCryoSegNet'][0].outputCoordinates.getSize()
    assert dcp > 0
    assert runs['CryopickTrainCryoSegNet'][0].outputModel.exists()
    assert f"CryoSegNet trains on the DeepCryoPicker ({dcp} picks)" in stdout

    scores = _scores(stdout)
    for what, n in (('DeepCryoPicker vs truth', dcp), ('CryoSegNet vs truth', csn)):
        _check_consistent(scores[what])
        assert scores[what]['n_pred'] == n and scores[what]['n_true'] == 180
    assert scores['DeepCryoPicker vs truth']['f1'] > 0.2

    if csn == 0:
        # CryoSegNet's U-Net learns little in two CPU epochs on three micrographs: the script must say so
        assert 'Comparison skipped: CryoSegNet or the DeepCryoPicker found no particle.' in stdout
        return
    m = re.search(r"COMPARE CryoSegNet \((\d+) picks\) with DeepCryoPicker \((\d+) picks\) within [\d.]+ px: "
                  r"both (\d+), only CryoSegNet (\d+), only DeepCryoPicker (\d+); precision ([\d.]+), "
                  r"recall ([\d.]+), F1 ([\d.]+), Jaccard ([\d.]+)", stdout)
    assert m, stdout[-3000:]
    n_a, n_b, both, only_a, only_b = (int(m.group(i)) for i in range(1, 6))
    assert (n_a, n_b) == (csn, dcp)
    assert both + only_a == n_a and both + only_b == n_b
    assert float(m.group(9)) == pytest.approx(both / (n_a + n_b - both), abs=1e-3)
    if hasattr(protocols, 'CryopickCompareCoordinates'):
        cmp = runs['CryopickCompareCoordinates'][0]
        assert (cmp.intersection.getSize(), cmp.onlyA.getSize(), cmp.onlyB.getSize()) == (both, only_a, only_b)
