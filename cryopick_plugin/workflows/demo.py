"""The demo pipeline: simulated tomograms → Scipion project → 3D picker trained and scored against the truth.

Run it as ``cryopick demo`` (or ``scipion3 python -m cryopick_plugin.workflows.demo``). It creates a new
Scipion project, simulates a small set of tomograms from real macromolecule density maps (or simple shapes
when no maps are available), imports them with scipion-em-tomo's ProtImportTomograms, imports their ground
truth as a SetOfCoordinates3D with cryopick's STAR import, then (unless ``--epochs 0``) makes DeepETPicker
weak labels from it, trains a CPU-sized 3D picker on the first tomogram (validating on the last), picks every
tomogram, compares the picks with the truth, and reports what it made, where, and how well it picked.
"""
import argparse
import os
import sys
import time

from cryopick_plugin.workflows.common import new_project, run, describe

DEMO_CLASSES = ('4v4r', '3j9i', '4v94', '1bxn')


def simulate_inputs(folder, count, shape, snr, seed, templates_dir=None, per_class=None):
    """Write `count` simulated tomograms + truth STARs into `folder`; return their metadata."""
    from cryopick_plugin.engine.sim.tomograms import simulate_tomogram, write_simulated_tomogram
    written = []
    for i in range(count):
        sim = simulate_tomogram(shape=shape, classes=DEMO_CLASSES, n_per_class=per_class, snr=snr,
                                seed=seed + i, templates_dir=templates_dir, name=f'tomo_{i:03d}',
                                n_beads=3, n_vesicles=1)
        paths = write_simulated_tomogram(sim, folder)
        written.append((sim, paths))
    return written


def run_demo(project_name='cryopick_demo', count=2, shape=(64, 128, 128), snr=0.05, seed=0,
             templates_dir=None, overwrite=False, epochs=20, out=sys.stdout):
    from tomo.protocols import ProtImportTomograms
    from cryopick_plugin.protocols import CryopickImportCoordinates3D

    t0 = time.time()
    project = new_project(project_name, overwrite=overwrite)
    data_dir = os.path.join(project.getPath(), 'simulated')
    os.makedirs(data_dir, exist_ok=True)
    print(f"Project: {project.getShortName()} ({project.getPath()})", file=out)
    sims = simulate_inputs(data_dir, count, shape, snr, seed, templates_dir)
    meta = sims[0][0].meta
    print(f"Simulated {count} tomogram(s) of {tuple(shape)} voxels at {meta.get('voxel_size', 10.0)} Å, "
          f"projection SNR {snr}, templates from {meta.get('template_source', '?')}: "
          f"{', '.join(sims[0][0].class_names)}", file=out)
    voxel = float(meta.get('voxel_size', 10.0))

    prot_tomos = run(project, ProtImportTomograms, label='import simulated tomograms',
                     filesPath=data_dir, filesPattern='tomo_*.mrc', samplingRate=voxel)
    tomos = prot_tomos.Tomograms
    truth_pattern = os.path.join(data_dir, 'tomo_*_truth.star')
    diam = max(meta.get('diameters_vox', {}).values() or [20])
    prot_truth = run(project, CryopickImportCoordinates3D, label='import ground truth',
                     inputTomograms=tomos, starFiles=truth_pattern, boxSize=int(2 * round(diam * 0.75)))
    for prot in (prot_tomos, prot_truth):
        print(f"{prot.getRunName()}  [{prot._cryopickSeconds:.1f} s]", file=out)
        for line in describe(prot):
            print(line, file=out)
    coords = prot_truth.output3DCoordinates
    counts = {}
    for coord in coords.iterItems():
        counts[coord.getGroupId()] = counts.get(coord.getGroupId(), 0) + 1
    names = sims[0][0].class_names
    print("Ground truth per class: " + ', '.join(f"{names[k - 1] if 0 < k <= len(names) else k}: {v}"
                                                 for k, v in sorted(counts.items())), file=out)
    prots = {'tomograms': prot_tomos, 'truth': prot_truth}
    if epochs > 0 and count >= 2:
        prots.update(train_and_pick(project, prot_tomos, prot_truth, meta, names, epochs, out))
    print(f"Open it in Scipion: python -m pyworkflow.apps.pw_project {project.getShortName()}", file=out)
    print(f"Done in {time.time() - t0:.1f} s.", file=out)
    return project, prots


def train_and_pick(project, prot_tomos, prot_truth, meta, names, epochs, out):
    """Weak labels → training (validation on the last tomogram) → picking → comparison with the truth."""
    from cryopick_plugin import convert
    from cryopick_plugin.engine.io import star
    from cryopick_plugin.engine.evaluate import evaluate_picks
    from cryopick_plugin.protocols import (CryopickWeakLabels, CryopickTrain3D, CryopickPick3D,
                                           CryopickCompareCoordinates)
    tomos = prot_tomos.Tomograms
    truth = prot_truth.output3DCoordinates
    diameters = meta['diameters_vox']
    # DeepETPicker's labels mark the centre region: about half the particle's diameter, odd.
    label_d = {i + 1: max(3, int(round(diameters[n] / 2)) | 1) for i, n in enumerate(names)}
    per_class = ','.join(f'{c}:{d}' for c, d in label_d.items())
    labels = run(project, CryopickWeakLabels, label='weak labels', inputTomograms=tomos, inputCoordinates=truth,
                 diameter=min(label_d.values()), classDiameters=per_class)
    val = sorted(convert.tomograms_by_name(tomos))[-1]
    train = run(project, CryopickTrain3D, label='train 3D picker', inputLabels=labels.outputTomoMasks,
                inputCoordinates=truth, validationTsIds=val, epochs=epochs, valEvery=2, patience=3)
    pick = run(project, CryopickPick3D, label='3D picking', inputTomograms=tomos, inputModel=train.outputModel)
    compare = run(project, CryopickCompareCoordinates, label='picks vs truth',
                  inputCoordinatesA=pick.output3DCoordinates, inputCoordinatesB=truth,
                  radius=min(diameters.values()) / 4)
    for prot in (labels, train, pick, compare):
        print(f"{prot.getRunName()}  [{prot._cryopickSeconds:.1f} s]", file=out)
        for line in describe(prot):
            print(line, file=out)
    # Per-class scores on the validation tomogram, each class matched within half its particle radius.
    picks = convert.coordinates3d_to_frame(pick.output3DCoordinates, tomos)
    ref = convert.coordinates3d_to_frame(truth, tomos)
    picks, ref = picks[picks[star.TOMO] == val], ref[ref[star.TOMO] == val]
    print(f"Scores on {val} (used only for validation), one-to-one matching within half the particle radius:",
          file=out)
    for c, name in enumerate(names, start=1):
        radius = diameters[name] / 4
        s = evaluate_picks(picks[picks[star.CLASS] == c], ref[ref[star.CLASS] == c], radius)['localisation']
        # precision is undefined (None) for a class the picker never predicted
        p, r, f = (('%.2f' % s[k]) if s[k] is not None else '–' for k in ('precision', 'recall', 'f1'))
        print(f"  {name:6s} precision {p}  recall {r}  F1 {f} ({s['n_true']} particles, {s['n_pred']} picks)",
              file=out)
    print('  ' + compare.summary()[-1], file=out)
    return {'labels': labels, 'train': train, 'pick': pick, 'compare': compare}


def add_args(parser):
    parser.add_argument('--project', default='cryopick_demo', help='Scipion project name (default %(default)s; '
                        'a timestamp is appended when it exists, unless --overwrite)')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing project of that name')
    parser.add_argument('--count', type=int, default=2, help='number of tomograms to simulate')
    parser.add_argument('--shape', type=int, nargs=3, default=(64, 128, 128), metavar=('Z', 'Y', 'X'))
    parser.add_argument('--snr', type=float, default=0.05, help='projection SNR of the tilt series')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--templates', default=None, help='folder of density maps (default: the shared data)')
    parser.add_argument('--epochs', type=int, default=20,
                        help='training epochs of the 3D picker (0: only simulate and import; default %(default)s)')


def main(args):
    run_demo(args.project, args.count, tuple(args.shape), args.snr, args.seed, args.templates, args.overwrite,
             args.epochs)
    return 0


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(p)
    sys.exit(main(p.parse_args()))
