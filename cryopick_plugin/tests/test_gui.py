"""The GUI a Scipion user sees: menu entries, help texts, wizards, and the real project window.

Static checks run anywhere: every exported protocol is in protocols.conf (and in the tree Scipion builds from
it), every parameter has help, every protocol has a label, summary, methods and (methods) citations, and
the wizards compute box sizes and diameters from their inputs.

`test_project_window` opens the real Scipion project window under a virtual X display (Xvfb) on a project
with finished cryopick runs (tomogram import, STAR coordinate import, DoG candidates): it selects the
Tomography and SPA views, expands cryopick's section, clicks every cryopick protocol of the tree (which
opens its form), runs the wizards in a form, opens the cryopick viewers of the finished runs, and fails on
any Tk callback error, error dialog or logged error. The GUI runs in a child process (`python -m
cryopick_plugin.tests.test_gui PROJECT OUT_JSON SHOTS_DIR`) so Tk and the TkAgg backend the window selects
stay out of the test process. Screenshots are written with ImageMagick's `import`; set
CRYOPICK_SCREENSHOTS=<folder> to keep them (docs/screenshots holds a set).
"""
import configparser
import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
import time

import pytest

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'protocols.conf')
VIEW_3D, VIEW_2D = 'Tomography', 'Protocols SPA'
PROTOCOLS_3D = {'CryopickImportCoordinates3D', 'CryopickImportModel', 'CryopickDogPick',
                'CryopickExtractSubtomograms', 'CryopickDisca', 'CryopickDiscaPredict', 'CryopickWeakLabels',
                'CryopickTrain3D', 'CryopickPick3D', 'CryopickCompareCoordinates'}
PROTOCOLS_2D = {'CryopickImportCoordinates2D', 'CryopickImportModel', 'CryopickDeepCryoPicker',
                'CryopickTrainCryoSegNet', 'CryopickCryoSegNet', 'CryopickCompareCoordinates'}
# Protocols that implement a published method and so must cite it.
METHOD_PROTOCOLS = {'CryopickWeakLabels', 'CryopickTrain3D', 'CryopickPick3D', 'CryopickDogPick', 'CryopickDisca',
                    'CryopickDiscaPredict', 'CryopickDeepCryoPicker', 'CryopickTrainCryoSegNet',
                    'CryopickCryoSegNet'}
SCREEN = (1400, 900)


def exported_protocols():
    from pyworkflow.protocol import Protocol
    from cryopick_plugin import protocols
    return {name: cls for name, cls in vars(protocols).items()
            if inspect.isclass(cls) and issubclass(cls, Protocol) and cls.__module__.startswith('cryopick_plugin')}


def conf_protocols():
    """{view name: [protocol class names]} read from protocols.conf as Scipion does (ConfigParser + JSON)."""
    cp = configparser.ConfigParser()
    cp.optionxform = str
    cp.read(CONF)
    out = {}

    def walk(items, acc):
        for item in items:
            if item['tag'] == 'protocol':
                acc.append(item['value'])
            walk(item.get('children', []), acc)

    for view in cp.options('PROTOCOLS'):
        acc = []
        walk(json.loads(cp.get('PROTOCOLS', view)), acc)
        out[view] = acc
    return out


# ---------------------------------------------------------------------------------------------- static checks
def test_protocols_conf_lists_every_protocol():
    views = conf_protocols()
    assert set(views) == {VIEW_3D, VIEW_2D}
    exported = set(exported_protocols())
    listed = set(views[VIEW_3D]) | set(views[VIEW_2D])
    assert exported == listed, (exported - listed, listed - exported)
    assert set(views[VIEW_3D]) == PROTOCOLS_3D
    assert set(views[VIEW_2D]) == PROTOCOLS_2D
    for view, names in views.items():
        assert len(names) == len(set(names)), f'{view}: a protocol listed twice'


def test_scipion_builds_the_cryopick_menu():
    """The tree the project window shows, built by Scipion's own loader from every plugin's protocols.conf."""
    from pyworkflow import Config
    from pyworkflow.gui.project.viewprotocols_extra import ProtocolTreeConfig
    views = ProtocolTreeConfig.load(Config.getDomain(),
                                    os.path.join(Config.SCIPION_LOCAL_CONFIG, Config.SCIPION_PROTOCOLS))

    def protocols_under(node):
        found = [node.value] if node.tag == 'protocol' and node.visible else []
        for child in node.childs:
            found += protocols_under(child)
        return found

    for view, expected in ((VIEW_3D, PROTOCOLS_3D), (VIEW_2D, PROTOCOLS_2D)):
        sections = [c for c in views[view].childs if c.text == 'cryopick']
        assert len(sections) == 1, f'{view}: {len(sections)} cryopick sections'
        assert sections[0].visible
        assert set(protocols_under(sections[0])) == expected


@pytest.mark.parametrize('name', sorted(exported_protocols()))
def test_protocol_texts(name):
    cls = exported_protocols()[name]
    assert cls._label and cls._label.strip(), 'no _label'
    assert cls.__doc__ and len(cls.__doc__.strip()) > 40, 'no description (the form header shows it)'
    for method in ('_summary', '_methods', '_validate'):
        owner = next(c for c in cls.__mro__ if method in c.__dict__)
        assert owner.__module__.startswith('cryopick_plugin'), f'{method} not defined by cryopick'
    prot = cls()
    missing = [pname for pname, param in prot._definition.iterParams()
               if not str(param.help.get() or '').strip()]
    assert not missing, f'parameters without help: {missing}'
    # summary and methods work on a protocol that has not run (what the GUI shows for a new box)
    assert isinstance(prot._summary(), list)
    assert isinstance(prot._methods(), list)
    if name in METHOD_PROTOCOLS:
        from pyworkflow.utils import parseBibTex
        from cryopick_plugin import bibtex
        cites = prot._citations()
        assert cites and all(c in parseBibTex(bibtex.__doc__) for c in cites), cites
        assert any(f'[{c}]' in ' '.join(prot._methods()) for c in cites), 'methods text does not cite'


def test_wizards_are_registered():
    from pyworkflow import Config
    from pyworkflow.viewer import DESKTOP_TKINTER
    from cryopick_plugin import wizards
    from cryopick_plugin.protocols import (CryopickDogPick, CryopickWeakLabels, CryopickCryoSegNet,
                                           CryopickImportModel)
    domain = Config.getDomain()
    assert domain.findWizards(CryopickDogPick(), DESKTOP_TKINTER)['boxSize'] is wizards.CryopickBoxSizeWizard
    assert domain.findWizards(CryopickWeakLabels(), DESKTOP_TKINTER)['diameter'] is wizards.CryopickDiameterWizard
    found = domain.findWizards(CryopickCryoSegNet(), DESKTOP_TKINTER)
    assert set(found) >= {'boxSize', 'diameter'}
    assert domain.findWizards(CryopickImportModel(), DESKTOP_TKINTER) == {}
    # every target names a real parameter of its protocol
    for wiz in (wizards.CryopickBoxSizeWizard, wizards.CryopickDiameterWizard):
        for cls, names in wiz._targets:
            for pname in names:
                assert cls()._definition.getParam(pname) is not None, (cls.__name__, pname)


class _FakeForm:
    """What a wizard uses of a FormWindow: the protocol, setVar, showWarning."""

    def __init__(self, protocol, param):
        self.protocol, self.wizParamName = protocol, param
        self.values, self.warnings = {}, []

    def setVar(self, name, value):
        self.values[name] = value

    def showWarning(self, msg, header='Warning'):
        self.warnings.append(msg)


def _sets(tmp_path):
    from pwem.objects import SetOfCoordinates, SetOfMicrographs
    from tomo.objects import SetOfCoordinates3D, SetOfTomograms
    coords3d = SetOfCoordinates3D(filename=str(tmp_path / 'c3d.sqlite'))
    coords3d.setBoxSize(30)
    coords3d.setSamplingRate(10.0)
    tomos = SetOfTomograms(filename=str(tmp_path / 'tomos.sqlite'))
    tomos.setSamplingRate(20.0)  # the tomograms are binned 2× relative to the picks
    mics = SetOfMicrographs(filename=str(tmp_path / 'mics.sqlite'))
    mics.setSamplingRate(2.0)
    coords2d = SetOfCoordinates(filename=str(tmp_path / 'c2d.sqlite'))
    coords2d.setBoxSize(150)
    return coords3d, tomos, mics, coords2d


def _model(method, diameters, sampling, box=None):
    from cryopick_plugin.objects import CryopickModel
    model = CryopickModel(path='/nonexistent.pt', method=method)
    model.setDiameters(diameters)
    model.setSamplingRate(sampling)
    model.setInfo({'box_size': box} if box else {})
    return model


def test_wizard_values(tmp_path):
    from cryopick_plugin import wizards as W
    from cryopick_plugin.protocols import (CryopickDogPick, CryopickExtractSubtomograms, CryopickPick3D,
                                           CryopickWeakLabels, CryopickDeepCryoPicker, CryopickCryoSegNet,
                                           CryopickTrainCryoSegNet)
    coords3d, tomos, mics, coords2d = _sets(tmp_path)

    assert [W.box_from_diameter(d) for d in (20, 21, 11, 1)] == [30, 32, 16, 4]
    assert [W.odd_label_diameter(d) for d in (23, 20, 16, 2)] == [11, 11, 9, 3]

    dog = CryopickDogPick(diameter=21.0)
    assert W.suggest_box_size(dog) == 32
    # extraction: the coordinates' box, rescaled to the tomograms it cuts from (10 → 20 Å/voxel halves it)
    ext = CryopickExtractSubtomograms()
    ext.inputCoordinates.set(coords3d)
    assert W.suggest_box_size(ext) == 30
    ext.inputTomograms.set(tomos)
    assert W.suggest_box_size(ext) == 16  # 30 × 10 / 20 = 15 → even
    # 3D picking: the box the model was trained with, else 1.5 × particle (= 2 × label) diameter
    pick = CryopickPick3D()
    pick.inputModel.set(_model('deepetpicker', [11], 10.0, box=28))
    assert W.suggest_box_size(pick) == 28
    pick.inputModel.set(_model('deepetpicker', [7, 11], 10.0))
    assert W.suggest_box_size(pick) == 34  # 1.5 × 22 = 33 → even
    # weak labels: half the particle diameter the coordinates' box was made for, odd, at the tomograms' rate
    labels = CryopickWeakLabels()
    labels.inputCoordinates.set(coords3d)
    assert W.suggest_diameter(labels) == 11  # particle 20 voxels at 10 Å
    labels.inputTomograms.set(tomos)
    assert W.suggest_diameter(labels) == 5   # particle 10 voxels at 20 Å
    # 2D: Å ↔ px through the micrographs' pixel size
    dcp = CryopickDeepCryoPicker(diameter=200.0)
    dcp.inputMicrographs.set(mics)
    assert W.suggest_box_size(dcp) == 150    # 100 px × 1.5
    seg = CryopickCryoSegNet()
    seg.inputMicrographs.set(mics)
    seg.inputModel.set(_model('cryosegnet', [90.0], 2.0))
    assert W.suggest_diameter(seg) == 180.0
    assert W.suggest_box_size(seg) == 136    # diameter empty: the model's 90 px × 1.5 = 135 → even
    train = CryopickTrainCryoSegNet()
    train.inputMicrographs.set(mics)
    train.inputCoordinates.set(coords2d)
    assert W.suggest_diameter(train) == 200.0  # box 150 px / 1.5 × 2 Å

    # the wizard objects: set the field they were opened from, or warn when the inputs do not tell
    form = _FakeForm(dog, 'boxSize')
    W.CryopickBoxSizeWizard().show(form)
    assert form.values == {'boxSize': 32} and not form.warnings
    empty = _FakeForm(CryopickWeakLabels(), 'diameter')
    W.CryopickDiameterWizard().show(empty)
    assert empty.values == {} and 'particle centres' in empty.warnings[0]
    coords3d.setBoxSize(None)
    nobox = CryopickWeakLabels()
    nobox.inputCoordinates.set(coords3d)
    form = _FakeForm(nobox, 'diameter')
    W.CryopickDiameterWizard().show(form)
    assert form.values == {} and 'no box size' in form.warnings[0]


# ---------------------------------------------------------------------------------------------- real window
def start_xvfb(size=SCREEN):
    """Start Xvfb on a free display (the server chooses it); return (process, ':N')."""
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(['Xvfb', '-displayfd', str(write_fd), '-screen', '0', f'{size[0]}x{size[1]}x24',
                             '-nolisten', 'tcp'], pass_fds=[write_fd], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    os.close(write_fd)
    number = b''
    deadline = time.time() + 30
    while not number.endswith(b'\n') and time.time() < deadline:
        chunk = os.read(read_fd, 16)
        if not chunk:
            break
        number += chunk
    os.close(read_fd)
    if not number.strip():
        proc.kill()
        raise RuntimeError('Xvfb did not start')
    return proc, ':' + number.decode().strip()


@pytest.fixture(scope='module')
def finished_project(tmp_path_factory):
    """A project with finished cryopick runs: tomogram import → STAR import → DoG candidates."""
    from pyworkflow.project import Manager
    from tomo.protocols import ProtImportTomograms
    from cryopick_plugin.engine.sim.tomograms import simulate_tomogram, write_simulated_tomogram
    from cryopick_plugin.protocols import CryopickImportCoordinates3D, CryopickDogPick

    data = tmp_path_factory.mktemp('gui_data')
    sim = simulate_tomogram(shape=(32, 64, 64), classes=('3j9i',), n_per_class=4, snr=1.0, seed=3,
                            name='tomo_gui')
    write_simulated_tomogram(sim, str(data))
    project = Manager().createProject(f'cryopick_gui_{os.getpid()}')
    cwd = os.getcwd()
    os.chdir(project.path)  # pyworkflow works with paths relative to the project folder
    tomos = project.newProtocol(ProtImportTomograms, filesPath=str(data), filesPattern='tomo_*.mrc',
                                samplingRate=10.0)
    project.launchProtocol(tomos, wait=True)
    imp = project.newProtocol(CryopickImportCoordinates3D, inputTomograms=tomos.Tomograms,
                              starFiles=str(data / 'tomo_gui_truth.star'), boxSize=24)
    project.launchProtocol(imp, wait=True)
    dog = project.newProtocol(CryopickDogPick, inputTomograms=tomos.Tomograms, diameter=12.0, maxPicks=10)
    project.launchProtocol(dog, wait=True)
    for run in (tomos, imp, dog):
        assert run.isFinished(), f'{run.getRunName()} did not finish: {run.getErrorMessage()}'
    yield project
    os.chdir(cwd)


def test_project_window(finished_project, tmp_path):
    if not shutil.which('Xvfb') or not shutil.which('import'):
        # as the other tests that need system packages: required under CI, skipped elsewhere (setup.sh says so)
        message = 'Xvfb and ImageMagick (import) are needed: apt-get install xvfb imagemagick'
        if os.environ.get('CI') == 'true':
            pytest.fail(message + ' (required under CI)')
        pytest.skip(message)
    shots = os.environ.get('CRYOPICK_SCREENSHOTS') or str(tmp_path / 'shots')
    os.makedirs(shots, exist_ok=True)
    report_path = tmp_path / 'report.json'
    xvfb, display = start_xvfb()
    try:
        env = dict(os.environ, DISPLAY=display)
        proc = subprocess.run([sys.executable, '-m', 'cryopick_plugin.tests.test_gui', finished_project.path,
                               str(report_path), shots], env=env, capture_output=True, text=True, timeout=240)
    finally:
        xvfb.terminate()
        xvfb.wait(10)
    assert report_path.exists(), f'GUI driver crashed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n' \
                                 f'{proc.stderr[-3000:]}'
    report = json.loads(report_path.read_text())
    assert report['errors'] == [], '\n'.join(report['errors'])
    assert set(report['menu'][VIEW_3D]) == PROTOCOLS_3D
    assert set(report['menu'][VIEW_2D]) == PROTOCOLS_2D
    # every protocol of the menu opened its form from a click on the tree, with its own title and fields
    assert set(report['forms']) == PROTOCOLS_3D | PROTOCOLS_2D
    for name, form in report['forms'].items():
        assert form['params'] >= 1 and name in form['title'], (name, form)
    assert report['forms']['CryopickDogPick']['wizards'] == ['boxSize']
    assert set(report['forms']['CryopickCryoSegNet']['wizards']) == {'boxSize', 'diameter'}
    # wizards in a real form: values reach the widgets and the protocol behind them
    assert report['wizard']['dog_box'] == ['18', 18]           # 1.5 × 12 voxels
    assert report['wizard']['labels_diameter'] == ['9', 9]     # box 24 → particle 16 → label 8 → odd 9
    # the cryopick viewers of the finished runs opened a window each
    opened = {(v['run'], v['viewer']) for v in report['viewers'] if v['windows'] >= 1}
    assert ('CryopickDogPick', 'CryopickCoordinates3DViewer') in opened, report['viewers']
    assert ('CryopickImportCoordinates3D', 'CryopickCoordinates3DViewer') in opened, report['viewers']
    for shot in report['screenshots']:
        assert os.path.getsize(shot) > 5000, shot  # not an empty (black) screen


# ---------------------------------------------------------------------------------------------- GUI driver
def _screenshot(path, window=None):
    """PNG of the whole virtual screen, or of one Tk window's area."""
    cmd = ['import', '-silent', '-window', 'root']
    if window is not None:
        window.update()
        x, y = max(0, window.winfo_rootx()), max(0, window.winfo_rooty())
        w = min(window.winfo_width(), SCREEN[0] - x)
        h = min(window.winfo_height(), SCREEN[1] - y)
        cmd += ['-crop', f'{w}x{h}+{x}+{y}', '+repage']
    subprocess.run(cmd + ['-depth', '8', path], check=True, timeout=60)
    return path


def _drive(project_path, report_path, shots):
    """Open the project window and walk the cryopick GUI; write a JSON report (errors, menu, forms...)."""
    import tkinter as tk
    import cryopick_plugin  # noqa: F401  (headless Scipion configuration, plugin registration)
    from pyworkflow.gui.project import ProjectWindow  # first: gui.form and gui.project import each other
    import pyworkflow.gui.dialog as dialog
    import pyworkflow.gui.form as pwform
    from pyworkflow import Config
    from pyworkflow.gui.gui import Window
    from pyworkflow.gui.widgets import ComboBox
    from pyworkflow.viewer import DESKTOP_TKINTER

    errors, report = [], {'menu': {}, 'forms': {}, 'viewers': [], 'wizard': {}, 'screenshots': []}

    # Anything that would show the user an error counts; dialogs would also block (they are modal).
    def record(kind):
        def dialog_stub(*args, **kwargs):
            texts = [a for a in args if isinstance(a, str)]
            if kind == 'error':
                errors.append('error dialog: ' + ' | '.join(texts))
        return dialog_stub
    for mod in (dialog, pwform):
        mod.showError, mod.showWarning, mod.showInfo = record('error'), record('warning'), record('info')
    Window.showError = lambda self, msg, header='Error', exception=None: errors.append(f'error dialog: {msg}')
    Window.showWarning = lambda self, msg, header='Warning': errors.append(f'warning dialog: {msg}')

    class ErrorLog(logging.Handler):
        def emit(self, rec):
            errors.append(f'logged {rec.levelname}: {rec.getMessage()}')
    logging.getLogger().addHandler(ErrorLog(level=logging.ERROR))

    # The project window's forms run their own main loop from show(); here they are only drawn.
    opened_forms = []

    def show_form(self, center=True, modal=False):
        self.root.deiconify()
        self.root.update()
        opened_forms.append(self)
    pwform.FormWindow.show = show_form

    win = ProjectWindow(project_path)
    root = win.root._root()
    root.report_callback_exception = lambda exc, val, tb: errors.append(f'Tk callback: {exc.__name__}: {val}')
    win.root.geometry(f'{SCREEN[0]}x{SCREEN[1]}+0+0')
    win.root.deiconify()
    win.root.update()
    view = win.viewWidget
    project = win.project
    domain = Config.getDomain()

    def pump(seconds=0.3):
        end = time.time() + seconds
        while time.time() < end:
            root.update()
            time.sleep(0.02)

    def descendants(widget):
        for child in widget.winfo_children():
            yield child
            yield from descendants(child)

    def toplevels():
        return {w for w in descendants(root) if isinstance(w, tk.Toplevel)}

    # drag the divider so the protocol names are readable in the screenshot
    for paned in (w for w in descendants(view) if w.winfo_class() == 'Panedwindow'):  # tk, not ttk
        paned.sash_place(0, 420, 0)
    combo = next(w for w in descendants(view) if isinstance(w, ComboBox) and VIEW_3D in w['values'])
    tree = view.protTree
    for view_name in (VIEW_2D, VIEW_3D):  # end on Tomography for the screenshot
        combo.set(view_name)              # what choosing the view in the combo box does
        pump()
        tree = view.protTree
        # the view itself is the tree's one root item; plugin sections hang from it
        top = [child for item in tree.get_children('') for child in tree.get_children(item)]
        sections = [item for item in top if tree.item(item, 'text') == 'cryopick']
        if len(sections) != 1:
            errors.append(f'{view_name}: {len(sections)} cryopick sections in the tree')
            continue
        for item in top:  # fold the other sections so cryopick's shows on screen
            tree.item(item, open=item == sections[0])
        found = []

        def walk(item):
            tree.item(item, open=True)
            for child in tree.get_children(item):
                node = view.protTreeItems.get(child)
                if node is not None and node.tag == 'protocol':
                    found.append((child, node.value))
                walk(child)
        walk(sections[0])
        report['menu'][view_name] = [name for _, name in found]
        pump()
        for item, name in found:
            if name in report['forms']:
                continue
            tree.selection_set(item)
            tree.focus(item)
            tree.see(item)
            root.update()
            before = len(opened_forms)

            class Click:  # the event the tree's double click delivers
                widget = tree
            view._protocolItemClick(Click())
            if len(opened_forms) != before + 1:
                errors.append(f'{name}: clicking the tree opened {len(opened_forms) - before} forms')
                continue
            form = opened_forms[-1]
            pump(0.2)
            report['forms'][name] = {'title': form.root.title(), 'params': len(form.widgetDict),
                                     'wizards': sorted(form.wizards)}
            if name == 'CryopickDogPick':
                report['screenshots'].append(_screenshot(os.path.join(shots, 'form_dog_pick.png'), form.root))
            if name == 'CryopickTrain3D':
                report['screenshots'].append(_screenshot(os.path.join(shots, 'form_train3d.png'), form.root))
            form.close()
            root.update()
        if view_name == VIEW_3D:
            tree.see(sections[0])
            pump()
            report['screenshots'].append(_screenshot(os.path.join(shots, 'project_window.png')))

    # Wizards inside real forms, on the finished runs' outputs.
    runs = {p.getClassName(): p for p in project.getRuns()}
    from cryopick_plugin.protocols import CryopickDogPick, CryopickWeakLabels
    missing = {'ProtImportTomograms', 'CryopickImportCoordinates3D'} - set(runs)
    if missing:
        errors.append(f'the project lacks the runs {sorted(missing)}')
    for key, cls, param, setup in () if missing else (
            ('dog_box', CryopickDogPick, 'boxSize',
             lambda p: (p.inputTomograms.set(runs['ProtImportTomograms'].Tomograms), p.diameter.set(12.0))),
            ('labels_diameter', CryopickWeakLabels, 'diameter',
             lambda p: (p.inputTomograms.set(runs['ProtImportTomograms'].Tomograms),
                        p.inputCoordinates.set(runs['CryopickImportCoordinates3D'].output3DCoordinates)))):
        prot = project.newProtocol(cls)
        setup(prot)
        view._openProtocolForm(prot)
        form = opened_forms[-1]
        form.wizParamName = param
        form.wizards[param]().show(form)
        pump(0.2)
        report['wizard'][key] = [form.widgetDict[param].get(), getattr(prot, param).get()]
        if key == 'labels_diameter':
            report['screenshots'].append(_screenshot(os.path.join(shots, 'form_weak_labels.png'), form.root))
        form.close()
        root.update()

    # The cryopick viewers of every finished cryopick run and its outputs.
    for prot in project.getRuns():
        if not prot.getClassName().startswith('Cryopick') or not prot.isFinished():
            continue
        targets = [prot] + [out for _, out in prot.iterOutputAttributes()]
        for obj in targets:
            for viewer_cls in domain.findViewers(obj, DESKTOP_TKINTER):
                if not viewer_cls.__module__.startswith('cryopick_plugin'):
                    continue
                before = toplevels()
                viewer = viewer_cls(project=project, protocol=prot, parent=win)
                viewer.visualize(obj, windows=win)
                pump(0.5)
                new = [w for w in toplevels() - before if w.winfo_exists()]
                report['viewers'].append({'run': prot.getClassName(), 'object': obj.getClassName(),
                                          'viewer': viewer_cls.__name__, 'windows': len(new)})
                if prot.getClassName() == 'CryopickDogPick' and new and obj is prot:
                    report['screenshots'].append(_screenshot(os.path.join(shots, 'viewer_dog_pick.png'), new[0]))
                for w in new:
                    w.destroy()
                root.update()

    report['errors'] = errors
    with open(report_path, 'w') as fh:
        json.dump(report, fh, indent=1)


if __name__ == '__main__':
    status = 0
    try:
        _drive(*sys.argv[1:4])
    except BaseException:
        import traceback
        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # The project window leaves a socket server thread behind: leave without waiting for it.
    os._exit(status)
