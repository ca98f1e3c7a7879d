"""Label-free 3D picking: raw tomograms → DoG → DISCA → one class → weak labels → DeepETPicker → picks.

No template and no manual pick anywhere, every step a Scipion protocol in a new project:

  import tomograms → DoG candidates → subtomogram extraction → DISCA clustering → the chosen class
  (scipion's "filter set" keeps its coordinates, as class 1) → 3D weak labels → 3D picking training
  → 3D picking of every tomogram

The class is chosen automatically unless --class N is given: each DISCA class average (unaligned, so a
blurred ball for a real particle) is scored by its centre contrast, the contrast between a central ball and
the shell around it with the particle polarity; classes with less than half the best contrast are taken as
junk (noise, edges, off-centre candidates) and the largest of the others wins. The table of classes and the
reason for the choice are printed.

  scipion3 python label_free_3d.py --tomograms /data/tomos --pattern 'TS_*.mrc' --sampling-rate 13.6 \\
      --diameter 18 --candidates 300
  python -m cryopick_plugin.workflows.label_free_3d --simulate --epochs 4

With --simulate (or --truth STAR files) the DoG candidates, every DISCA class and the final picks are scored
against the true positions (matching radius: the particle radius).
"""
import argparse
import os
import sys
import time

if __package__ in (None, ''):
    # Run as a file (`scipion3 python path/to/label_free_3d.py`): the plugin may be a plain checkout.
    try:
        import cryopick_plugin  # noqa: F401
    except ImportError:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from cryopick_plugin.workflows.common import PipelineError, run  # noqa: E402
from cryopick_plugin.workflows import common  # noqa: E402
from cryopick_plugin.workflows.supervised_3d import (TOMOGRAM_PATH_ARGS, add_tomogram_args, box_for,  # noqa: E402
                                                     check_tomogram_args, format_scores, import_tomograms,
                                                     label_diameter_for, open_project, prepare_tomograms,
                                                     read_truth, report, run_cli, score_coordinates)

JUNK_CONTRAST_FRACTION = 0.5


# ------------------------------------------------------------------------------------------ choosing a class
def centre_contrast(volume, polarity='dark'):
    """(shell mean − centre mean) / std of a class average; positive when a dark blob sits in the centre.

    Centre: a ball of a quarter of the box; shell: between 3/8 and 1/2 of the box from the centre.
    """
    import numpy as np
    box = volume.shape[0]
    grid = np.indices(volume.shape).astype(np.float32) - (box - 1) / 2.0
    r = np.sqrt((grid ** 2).sum(axis=0))
    centre = volume[r <= box / 4.0]
    shell = volume[(r >= 3 * box / 8.0) & (r <= box / 2.0)]
    std = float(volume.std()) or 1.0
    contrast = (float(shell.mean()) - float(centre.mean())) / std
    return contrast if polarity == 'dark' else -contrast


def describe_classes(disca, polarity):
    """One dict per DISCA class: id, size, mean membership probability and centre contrast of its average."""
    import numpy as np
    from cryopick_plugin.engine.io import mrc
    probs = {}
    for coord in disca.output3DCoordinates.iterItems():
        probs.setdefault(int(coord.getGroupId()), []).append(float(coord.getScore() or 0.0))
    classes = []
    for cls in disca.outputClasses.iterItems():
        ref = int(cls.getObjId())
        rep = cls.getRepresentative()
        contrast = float('nan')
        if rep is not None and rep.getFileName() and os.path.exists(rep.getFileName()):
            data, _ = mrc.open_volume(rep.getFileName())
            contrast = centre_contrast(np.asarray(data, dtype=np.float32), polarity)
        classes.append({'class': ref, 'size': int(cls.getSize()), 'contrast': contrast,
                        'probability': float(np.mean(probs.get(ref, [0.0])))})
    return classes


def choose_class(classes, requested=None):
    """(class id, reason) following the rule in the module docstring, or the requested class."""
    ids = [c['class'] for c in classes]
    if requested is not None:
        if requested not in ids:
            raise PipelineError(f"--class {requested}: DISCA made classes {ids}")
        return requested, 'chosen with --class'
    scored = [c for c in classes if c['contrast'] == c['contrast']]  # NaN: no average to judge
    if not scored:
        best = max(classes, key=lambda c: c['size'])
        return best['class'], 'the largest class (no class average to judge junk by)'
    top = max(c['contrast'] for c in scored)
    kept = [c for c in scored if c['contrast'] >= JUNK_CONTRAST_FRACTION * top] if top > 0 else scored
    best = max(kept, key=lambda c: (c['size'], c['contrast']))
    junk = sorted(set(ids) - {c['class'] for c in kept})
    return best['class'], (f"the largest class whose average has a centred particle (contrast ≥ "
                           f"{JUNK_CONTRAST_FRACTION:g} × the best)" +
                           (f"; junk: {', '.join(map(str, junk))}" if junk else ''))


def class_truth_lines(disca, tomograms, truth, radius, class_names):
    """Per DISCA class: how many members are real particles, and of which true class."""
    from cryopick_plugin import convert
    from cryopick_plugin.engine.io import star
    from cryopick_plugin.engine.evaluate import evaluate_picks
    df = convert.coordinates3d_to_frame(disca.output3DCoordinates, tomograms)
    lines = {}
    for k, rows in df.groupby(star.CLASS):
        scores = evaluate_picks(rows, truth, radius=radius)
        found = {}
        for true_class, predicted in scores['confusion'].items():
            found[true_class] = sum(predicted.values())
        parts = ', '.join(f"{class_names.get(int(t), t)}: {n}" for t, n in sorted(found.items()) if n)
        lines[int(k)] = f"{scores['localisation']['tp']} real particles ({parts or 'none'})"
    return lines


def simulated_class_names(folder):
    """{class number: template name} from a simulation's metadata, when there is one."""
    import glob
    import json
    for path in sorted(glob.glob(os.path.join(folder or '', 'tomo_*.json'))):
        with open(path) as fh:
            names = json.load(fh).get('class_names', [])
        return {i + 1: n for i, n in enumerate(names)}
    return {}


def run_on_output(project, protocol_class, label, pointers, **params):
    """`common.run` for protocols that must point at a named output of another protocol.

    pointers: {parameter: (protocol, output name)}. Generic Scipion protocols such as "filter set" name
    their own output after the pointer's output name, which a pointer to the object itself lacks.
    """
    prot = project.newProtocol(protocol_class, **params)
    prot.setObjLabel(label)
    for param, (source, output_name) in pointers.items():
        getattr(prot, param).set(source)
        getattr(prot, param).setExtended(output_name)
    common.queue_protocol(prot)
    started = time.time()
    project.launchProtocol(prot, wait=True)
    common.wait_queued(project, prot)
    prot = project.getProtocol(prot.getObjId())
    if not prot.isFinished():
        raise common.PipelineError(f"{prot.getRunName()} failed: {prot.getErrorMessage() or prot.getStatus()}")
    prot._cryopickSeconds = time.time() - started
    return prot


# ------------------------------------------------------------------------------------------ the pipeline
def run_label_free(args, out=sys.stdout):
    """Build and run the pipeline; return (project, {step name: finished protocol}, chosen class)."""
    from pwem.protocols import ProtSetFilter
    from cryopick_plugin.protocols import (CryopickDisca, CryopickDogPick, CryopickExtractSubtomograms,
                                           CryopickPick3D, CryopickTrain3D, CryopickWeakLabels)
    from cryopick_plugin.engine.io import star
    from cryopick_plugin.engine.evaluate import evaluate_picks
    t0 = time.time()
    project = open_project(args, TOMOGRAM_PATH_ARGS, out)
    folder, pattern, sampling_rate, diameter, truth_pattern = prepare_tomograms(project, args, out)
    truth = read_truth(truth_pattern) if truth_pattern else None
    radius = diameter / 2
    box = args.box or box_for(diameter)
    prots = {'tomograms': import_tomograms(project, folder, pattern, sampling_rate, out)}
    tomograms = prots['tomograms'].Tomograms

    polarity = ['dark', 'bright'].index(args.polarity)
    prots['dog'] = run(project, CryopickDogPick, label='DoG candidates', inputTomograms=tomograms,
                       diameter=float(diameter), polarity=polarity, maxPicks=args.candidates, boxSize=box)
    report(prots['dog'], out)
    if truth is not None:
        score_coordinates('DoG candidates vs truth', prots['dog'].output3DCoordinates, tomograms, truth, radius,
                          out)
    prots['extract'] = run(project, CryopickExtractSubtomograms, label='extract candidates',
                           inputCoordinates=prots['dog'].output3DCoordinates, boxSize=box, binning=args.bin)
    report(prots['extract'], out)
    prots['disca'] = run(project, CryopickDisca, label='DISCA clustering',
                         inputSubtomograms=prots['extract'].outputSubtomograms, kMin=args.k_min, kMax=args.k_max,
                         seed=args.seed, **({'maxIter': args.max_iter} if args.max_iter else {}))
    report(prots['disca'], out)

    classes = describe_classes(prots['disca'], args.polarity)
    truth_lines = (class_truth_lines(prots['disca'], tomograms, truth, radius, simulated_class_names(folder))
                   if truth is not None else {})
    print("DISCA classes (size, mean membership probability, centre contrast of the average"
          + (", members at true particles" if truth_lines else '') + "):", file=out)
    for c in classes:
        print(f"  class {c['class']}: {c['size']} members, p {c['probability']:.2f}, contrast "
              f"{c['contrast']:.2f}" + (f", {truth_lines.get(c['class'])}" if truth_lines else ''), file=out)
    chosen, reason = choose_class(classes, args.cls)
    print(f"Chosen class: {chosen} ({reason})", file=out)

    # The chosen class's coordinates as their own set, relabelled class 1 (the picker's only class). The
    # formula runs per item: it keeps the item when the expression is true, after renumbering it.
    formula = f"item.getGroupId() == {int(chosen)} and (item.setGroupId(1) or True)"
    prots['class'] = run_on_output(project, ProtSetFilter, f'DISCA class {chosen}',
                                   {'inputSet': (prots['disca'], 'output3DCoordinates')},
                                   operation=ProtSetFilter.CHOICE_FORMULA, formula=formula)
    report(prots['class'], out)
    chosen_coords = next((output for _, output in prots['class'].iterOutputAttributes()), None)
    if chosen_coords is None or chosen_coords.getSize() == 0:
        raise PipelineError(f"class {chosen} has no coordinates")

    label_diameter = args.label_diameter or label_diameter_for(diameter)
    prots['labels'] = run(project, CryopickWeakLabels, label='weak labels from the DISCA class',
                          inputTomograms=tomograms, inputCoordinates=chosen_coords, diameter=label_diameter)
    report(prots['labels'], out)
    ts_ids = sorted(m.getTsId() for m in prots['labels'].outputTomoMasks.iterItems())
    validation = ts_ids[-1] if len(ts_ids) > 1 else ''
    print(f"Training on {', '.join(t for t in ts_ids if t != validation)}; validation: "
          f"{validation or 'a held-out slab of the first tomogram'}", file=out)
    prots['train'] = run(project, CryopickTrain3D, label='train DeepETPicker on the DISCA class',
                         inputLabels=prots['labels'].outputTomoMasks, inputCoordinates=chosen_coords,
                         validationTsIds=validation, epochs=args.epochs, valEvery=1, patience=args.patience,
                         tune=not args.no_tune, seed=args.seed)
    report(prots['train'], out)
    pick_params = {'tLm': args.t_lm} if args.t_lm is not None else {}
    prots['pick'] = run(project, CryopickPick3D, label='pick (DeepETPicker, label-free)', inputTomograms=tomograms,
                        inputModel=prots['train'].outputModel, boxSize=box, **pick_params)
    report(prots['pick'], out)

    if truth is not None:
        picks = prots['pick'].output3DCoordinates
        scores = score_coordinates('label-free picks vs truth (all classes)', picks, tomograms, truth, radius, out)
        # the picker learnt one DISCA class: score it against the true class that class mostly holds too
        confusion = scores['confusion']
        if confusion:
            main_class = max(confusion, key=lambda t: sum(confusion[t].values()))
            names = simulated_class_names(folder)
            sub = evaluate_picks(_frame(picks, tomograms), truth[truth[star.CLASS] == int(main_class)],
                                 radius=radius)
            print(f"SCORE label-free picks vs truth ({names.get(int(main_class), main_class)} only): "
                  f"{format_scores(sub['localisation'])}", file=out)
    print(f"Open the project: python -m pyworkflow.apps.pw_project {project.getName()}", file=out)
    print(f"Done in {time.time() - t0:.1f} s.", file=out)
    return project, prots, chosen


def _frame(coords, tomograms):
    from cryopick_plugin import convert
    return convert.coordinates3d_to_frame(coords, tomograms)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog='\n'.join(__doc__.splitlines()[2:]))
    add_tomogram_args(parser, {'count': 2, 'shape': (56, 112, 112), 'per_class': 12, 'snr': 0.5, 'beads': 2,
                               'project': 'cryopick_label_free_3d'})
    parser.add_argument('--polarity', choices=['dark', 'bright'], default='dark',
                        help='particle contrast in the tomograms (default %(default)s)')
    parser.add_argument('--candidates', type=int, default=300, help='DoG candidates per tomogram at most')
    parser.add_argument('--box', type=int, help='box size in voxels (default 1.5 × diameter, even)')
    parser.add_argument('--bin', type=int, default=1, help='binning of the extracted subtomograms')
    parser.add_argument('--k-min', type=int, default=2, help='fewest DISCA clusters (default %(default)s)')
    parser.add_argument('--k-max', type=int, default=8, help='most DISCA clusters (default %(default)s)')
    parser.add_argument('--max-iter', type=int, help='DISCA iterations (default: the preset\'s)')
    parser.add_argument('--class', dest='cls', type=int, help='DISCA class to train on (default: automatic)')
    parser.add_argument('--label-diameter', type=int, help='weak-label ball diameter in voxels '
                                                          '(default 40 %% of the particle, odd)')
    parser.add_argument('--epochs', type=int, default=30, help='maximum training epochs (default %(default)s)')
    parser.add_argument('--patience', type=int, default=5, help='validations without improvement before stopping')
    parser.add_argument('--no-tune', action='store_true', help='keep the fixed picking thresholds')
    parser.add_argument('--t-lm', type=float, help='local-maximum threshold for picking (default: the model\'s)')
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_tomogram_args(parser, args)
    return run_cli(run_label_free, args)


if __name__ == '__main__':
    sys.exit(main())
