"""The demo pipeline: simulated tomograms → Scipion project → 3D picker trained and scored against the truth.

Run it as ``cryopick demo`` (or ``scipion3 python -m cryopick_plugin.workflows.demo``). It creates a new
Scipion project, simulates three small tomograms from real macromolecule density maps (or simple shapes
when no maps are available), imports them with scipion-em-tomo's ProtImportTomograms, imports their ground
truth as a SetOfCoordinates3D with cryopick's STAR import, then (unless ``--epochs 0``) makes DeepETPicker
weak labels from it, trains a CPU-sized 3D picker on the first tomogram (validating on the second), picks
every tomogram, runs template-free DoG picking as a baseline, compares both with the truth of the third
(test) tomogram, and reports what it made, where, and how well each picked.

The whole run fits a time budget (``--minutes``, default 10): the training gets what the other stages leave
of it (`train3d --time-budget`), so a slow CPU trains fewer steps instead of running for an hour, and the
console says what each stage is doing, with the compute precision, the training's own progress lines and
an ETA.
"""
import argparse
import os
import sys
import time

from cryopick_plugin.workflows.common import add_queue_args, describe, new_project, run, use_queue

DEMO_CLASSES = ('4v4r', '3j9i', '4v94', '1bxn')
# What the stages after training cost on a 2-core CPU, to leave room for them in the budget: picking three
# small tomograms, DoG picking, the comparison and Scipion's launch of each protocol (measured 40–70 s with
# fp32 on an idle box); a margin on top so the demo ends inside its budget on a loaded one.
RESERVE_AFTER_TRAINING_S = 120.0
MIN_TRAINING_MIN = 1.0


def machine_cpus():
    """The CPUs this process may use (its affinity; a container's or a job's, not the host's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class Console:
    """Stage lines with elapsed time and an ETA for the whole demo, on one stream."""

    def __init__(self, out, budget_s):
        self.out, self.budget_s, self.t0 = out, budget_s, time.time()
        self.stage_no, self.n_stages = 0, 0

    def elapsed(self):
        return time.time() - self.t0

    @staticmethod
    def clock(seconds):
        seconds = max(0, int(round(seconds)))
        return f'{seconds // 60:d}:{seconds % 60:02d}'

    def say(self, text):
        print(text, file=self.out, flush=True)

    def stage(self, text):
        self.stage_no += 1
        left = self.budget_s - self.elapsed() if self.budget_s else None
        eta = f', demo ETA {self.clock(left)}' if left is not None and left > 0 else ''
        self.say(f'[{self.clock(self.elapsed())}] stage {self.stage_no}/{self.n_stages}: {text}{eta}')

    def engine_line(self, line):
        """A log line of a running job, indented under its stage."""
        self.say(f'          {line}')


def quiet_scipion_launches():
    """Scipion logs every protocol launch (command line, PID) at INFO: the demo says what each stage does
    instead, so only Scipion's warnings and errors reach the console."""
    import logging
    import pyworkflow.protocol.launch  # noqa: F401  (its logger exists once it is imported)
    for name in list(logging.root.manager.loggerDict):
        if 'pyworkflow' in name:
            logging.getLogger(name).setLevel(logging.WARNING)


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


def run_demo(project_name='cryopick_demo', count=3, shape=(64, 128, 128), snr=0.05, seed=0,
             templates_dir=None, overwrite=False, epochs=None, minutes=10.0, out=sys.stdout):
    """Run the demo; `epochs` None trains for what `minutes` leaves, a number trains that many epochs
    (0: stop after the imports). Returns (project, {stage: protocol})."""
    from tomo.protocols import ProtImportTomograms
    from cryopick_plugin.engine.settings import resolve_precision
    from cryopick_plugin.protocols import CryopickImportCoordinates3D

    console = Console(out, 60.0 * minutes if minutes else None)
    quiet_scipion_launches()
    training = epochs is None or epochs > 0
    console.n_stages = 3 + (5 if training and count >= 2 else 0)
    precision = resolve_precision(None, 'cpu')
    console.say(f"cryopick demo: {count} simulated tomograms, a 3D picker trained and compared with DoG picking; "
                f"CPU arithmetic {precision} ({'native bf16' if precision == 'bf16' else 'no native bf16 or forced'}"
                f"; CRYOPICK_PRECISION={os.environ.get('CRYOPICK_PRECISION', 'auto')})"
                + (f'; time budget {minutes:g} min' if minutes and epochs is None else ''))
    console.stage('simulating tomograms')
    project = new_project(project_name, overwrite=overwrite)
    data_dir = os.path.join(project.getPath(), 'simulated')
    os.makedirs(data_dir, exist_ok=True)
    console.say(f"Project: {project.getShortName()} ({project.getPath()})")
    sims = simulate_inputs(data_dir, count, shape, snr, seed, templates_dir)
    meta = sims[0][0].meta
    console.say(f"Simulated {count} tomogram(s) of {tuple(shape)} voxels at {meta.get('voxel_size', 10.0)} Å, "
                f"projection SNR {snr}, templates from {meta.get('template_source', '?')}: "
                f"{', '.join(sims[0][0].class_names)}")
    voxel = float(meta.get('voxel_size', 10.0))

    console.stage('importing the tomograms (scipion-em-tomo)')
    prot_tomos = run(project, ProtImportTomograms, label='import simulated tomograms',
                     filesPath=data_dir, filesPattern='tomo_*.mrc', samplingRate=voxel)
    tomos = prot_tomos.Tomograms
    truth_pattern = os.path.join(data_dir, 'tomo_*_truth.star')
    diam = max(meta.get('diameters_vox', {}).values() or [20])
    console.stage('importing the ground truth as 3D coordinates')
    prot_truth = run(project, CryopickImportCoordinates3D, label='import ground truth',
                     inputTomograms=tomos, starFiles=truth_pattern, boxSize=int(2 * round(diam * 0.75)))
    for prot in (prot_tomos, prot_truth):
        console.say(f"{prot.getRunName()}  [{prot._cryopickSeconds:.1f} s]")
        for line in describe(prot):
            console.say(line)
    coords = prot_truth.output3DCoordinates
    counts = {}
    for coord in coords.iterItems():
        counts[coord.getGroupId()] = counts.get(coord.getGroupId(), 0) + 1
    names = sims[0][0].class_names
    console.say("Ground truth per class: " + ', '.join(f"{names[k - 1] if 0 < k <= len(names) else k}: {v}"
                                                       for k, v in sorted(counts.items())))
    prots = {'tomograms': prot_tomos, 'truth': prot_truth}
    if training and count >= 2:
        prots.update(train_and_pick(project, prot_tomos, prot_truth, meta, names, epochs, console))
    console.say(f"Open it in Scipion: python -m pyworkflow.apps.pw_project {project.getShortName()}")
    console.say(f"Done in {console.clock(console.elapsed())} (m:ss).")
    return project, prots


def train_and_pick(project, prot_tomos, prot_truth, meta, names, epochs, console):
    """Weak labels → training (validation on the second tomogram) → picking → DoG baseline → scores on the
    last tomogram (the test tomogram when there are three or more)."""
    from cryopick_plugin import convert
    from cryopick_plugin.protocols import (CryopickWeakLabels, CryopickTrain3D, CryopickPick3D, CryopickDogPick,
                                           CryopickCompareCoordinates)
    tomos = prot_tomos.Tomograms
    truth = prot_truth.output3DCoordinates
    diameters = meta['diameters_vox']
    ts_ids = sorted(convert.tomograms_by_name(tomos))
    val, test = ts_ids[1], ts_ids[-1]
    # DeepETPicker's labels mark the centre region: about half the particle's diameter, odd.
    label_d = {i + 1: max(3, int(round(diameters[n] / 2)) | 1) for i, n in enumerate(names)}
    per_class = ','.join(f'{c}:{d}' for c, d in label_d.items())
    console.stage('weak labels (truncated balls of about half each particle diameter)')
    labels = run(project, CryopickWeakLabels, label='weak labels', inputTomograms=tomos, inputCoordinates=truth,
                 diameter=min(label_d.values()), classDiameters=per_class)
    train_args = dict(inputLabels=labels.outputTomoMasks, inputCoordinates=truth, validationTsIds=val,
                      trainTsIds=ts_ids[0])
    if epochs is None:
        left_min = (console.budget_s - console.elapsed() - RESERVE_AFTER_TRAINING_S) / 60.0
        budget = round(max(MIN_TRAINING_MIN, left_min), 2)
        # Epochs only bound the run: the budget ends it, and the learning-rate schedule follows the budget.
        train_args.update(epochs=1000, valEvery=2, patience=1000, timeBudget=budget)
        console.stage(f'training the 3D picker on {ts_ids[0]} (validation on {val}) for {budget:g} min, '
                      f'what the budget leaves after the other stages')
    else:
        train_args.update(epochs=epochs, valEvery=2, patience=3)
        console.stage(f'training the 3D picker on {ts_ids[0]} (validation on {val}) for {epochs} epochs')
    # Every CPU of the machine: the training as threads of one job, picking and DoG as one job per
    # tomogram side by side (Scipion runs parallel steps on threads − 1 workers: one more thread).
    cpus = machine_cpus()
    step_threads = cpus + 1 if cpus > 1 else 1
    train = run(project, CryopickTrain3D, label='train 3D picker', follow=console.engine_line,
                numberOfThreads=cpus, **train_args)
    console.stage('picking every tomogram with the trained model')
    pick = run(project, CryopickPick3D, label='3D picking', inputTomograms=tomos, inputModel=train.outputModel,
               follow=console.engine_line, numberOfThreads=step_threads)
    console.stage('DoG picking (template-free baseline)')
    median_d = sorted(diameters.values())[len(diameters) // 2]
    dog = run(project, CryopickDogPick, label='DoG picking (baseline)', inputTomograms=tomos,
              diameter=float(median_d), maxPicks=2000, numberOfThreads=step_threads)
    console.stage('comparing the picks with the truth')
    compare = None
    if pick.output3DCoordinates.getSize():
        compare = run(project, CryopickCompareCoordinates, label='picks vs truth',
                      inputCoordinatesA=pick.output3DCoordinates, inputCoordinatesB=truth,
                      radius=min(diameters.values()) / 4)
    else:
        console.say('The picker found no particle: its training was too short for this machine. Give the demo '
                    'more time (--minutes) or train longer in the project.')
    for prot in (labels, train, pick, dog) + ((compare,) if compare else ()):
        console.say(f"{prot.getRunName()}  [{prot._cryopickSeconds:.1f} s]")
        for line in describe(prot):
            console.say(line)
    report_scores(console, convert, tomos, truth, pick, dog, names, diameters, val, test)
    return {'labels': labels, 'train': train, 'pick': pick, 'dog': dog, 'compare': compare}


def report_scores(console, convert, tomos, truth, pick, dog, names, diameters, val, test):
    """Per-class and overall scores of the picker on the test tomogram, and DoG's localisation there with
    its threshold chosen on the validation tomogram (the best a user could set it with annotations)."""
    from cryopick_plugin.engine.disca.dog import choose_threshold
    from cryopick_plugin.engine.evaluate import counts_to_metrics, evaluate_picks
    from cryopick_plugin.engine.io import star
    picks = convert.coordinates3d_to_frame(pick.output3DCoordinates, tomos)
    ref = convert.coordinates3d_to_frame(truth, tomos)
    dogs = convert.coordinates3d_to_frame(dog.output3DCoordinates, tomos)
    on = lambda df, ts: df[df[star.TOMO] == ts]
    console.say(f"Scores on {test} ({'test tomogram, not seen in training or validation' if test != val else 'the validation tomogram'}), "
                f"one-to-one matching within half the particle radius:")
    tp = n_pred = n_true = 0
    if not len(picks):
        picks = ref.iloc[:0]
    for c, name in enumerate(names, start=1):
        s = evaluate_picks(on(picks, test)[on(picks, test)[star.CLASS] == c],
                           on(ref, test)[on(ref, test)[star.CLASS] == c], diameters[name] / 4)['localisation']
        tp, n_pred, n_true = tp + s['tp'], n_pred + s['n_pred'], n_true + s['n_true']
        # precision is undefined (None) for a class the picker never predicted
        p, r, f = (('%.2f' % s[k]) if s[k] is not None else '–' for k in ('precision', 'recall', 'f1'))
        console.say(f"  {name:6s} precision {p}  recall {r}  F1 {f} ({s['n_true']} particles, {s['n_pred']} picks)")
    cls = counts_to_metrics(tp, n_pred, n_true)
    console.say(f"  classification (class must be right): precision {cls['precision'] or 0:.2f}, "
                f"recall {cls['recall'] or 0:.2f}, F1 {cls['f1'] or 0:.3f}")
    # Localisation (classes ignored) with one radius for both pickers: a quarter of the median diameter.
    radius = sorted(diameters.values())[len(diameters) // 2] / 4
    ours = evaluate_picks(on(picks, test), on(ref, test), radius)['localisation']
    threshold = choose_threshold([on(dogs, val)], [on(ref, val)], radius)
    dog_test = on(dogs, test)
    dog_test = dog_test[dog_test[star.SCORE] >= threshold]
    theirs = evaluate_picks(dog_test, on(ref, test), radius)['localisation']
    console.say(f"  localisation (classes ignored, within {radius:.1f} voxels): 3D picker F1 {ours['f1'] or 0:.3f} "
                f"({ours['n_pred']} picks), DoG F1 {theirs['f1'] or 0:.3f} ({theirs['n_pred']} picks, threshold "
                f"{threshold:.3g} chosen on {val})")
    verdict = 'beats' if (ours['f1'] or 0) > (theirs['f1'] or 0) else 'does NOT beat'
    console.say(f"  the trained picker {verdict} DoG by {(ours['f1'] or 0) - (theirs['f1'] or 0):+.3f} F1")


def add_args(parser):
    parser.add_argument('--project', default='cryopick_demo', help='Scipion project name (default %(default)s; '
                        'a timestamp is appended when it exists, unless --overwrite)')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing project of that name')
    parser.add_argument('--count', type=int, default=3,
                        help='number of tomograms to simulate: train, validation, test (default %(default)s)')
    parser.add_argument('--shape', type=int, nargs=3, default=(64, 128, 128), metavar=('Z', 'Y', 'X'))
    parser.add_argument('--snr', type=float, default=0.05, help='projection SNR of the tilt series')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--templates', default=None, help='folder of density maps (default: the shared data)')
    parser.add_argument('--minutes', type=float, default=10.0,
                        help='time budget of the whole demo; the training gets what the other stages leave '
                             '(default %(default)s)')
    parser.add_argument('--epochs', type=int, default=None,
                        help='train this many epochs instead of by the time budget (0: only simulate and import)')
    add_queue_args(parser)


def main(args):
    use_queue(getattr(args, 'queue', None), getattr(args, 'queue_params', None))
    run_demo(args.project, args.count, tuple(args.shape), args.snr, args.seed, args.templates, args.overwrite,
             args.epochs, args.minutes)
    return 0


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(p)
    sys.exit(main(p.parse_args()))
