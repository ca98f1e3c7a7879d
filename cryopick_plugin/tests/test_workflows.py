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


def _project(name):
    """Load a project the script made (pyworkflow changes the working folder: restore it)."""
    from pyworkflow.project import Manager
    cwd = os.getcwd()
    try:
        manager = Manager()
        assert manager.hasProject(name), f"project {name} was not created"
        return manager.loadProject(name)
    finally:
        os.chdir(cwd)


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


def test_supervised_3d_through_the_scipion_launcher(tmp_path):
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
    project = _project(name)
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
    assert overall['f1'] > 0.2, overall  # even one epoch finds particles at this SNR
    assert 'DeepETPicker picks vs truth [tomo_001, validation]' in scores

    # the RELION export lists every extracted subtomogram, and the picks as coordinates
    from cryopick_plugin.engine import star
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
