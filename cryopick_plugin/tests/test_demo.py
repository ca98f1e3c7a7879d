"""The README's main job, `cryopick demo`, end to end in a subprocess (tiny volumes, two epochs)."""
import os
import re
import subprocess
import sys


def test_demo_builds_project_trains_and_scores():
    out = subprocess.run([sys.executable, '-m', 'cryopick_plugin', 'demo', '--project', 'demo_test',
                          '--shape', '48', '96', '96', '--epochs', '2', '--snr', '0.1'],
                         capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    project_dir = re.search(r'Project: \S+ \((.+)\)', text).group(1)
    assert os.path.isdir(project_dir)
    assert 'Tomograms: SetOfTomograms (2 items)' in text
    n_truth = int(re.search(r'output3DCoordinates: SetOfCoordinates3D \((\d+) items\)', text).group(1))
    assert n_truth > 10
    for step in ('import simulated tomograms', 'import ground truth', 'weak labels', 'train 3D picker',
                 '3D picking', 'picks vs truth'):
        assert step in text, step
    assert 'outputModel: CryopickModel' in text
    assert re.search(r'precision \d\.\d+, recall \d\.\d+, F1 \d\.\d+', text)
