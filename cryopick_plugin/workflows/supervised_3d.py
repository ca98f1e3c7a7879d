"""Supervised 3D picking: tomograms + particle centres → weak labels → DeepETPicker → picks → RELION.

A whole pipeline in a new Scipion project, every step a cryopick (or scipion-em-tomo) protocol:

  import tomograms → import particle centres (RELION STAR) → 3D weak labels → 3D picking training
  → 3D picking of every tomogram → subtomogram extraction of the picks → export to RELION 3.1
  (a subtomogram particles STAR for relion_reconstruct / relion_refine, and the picks as a coordinate STAR)

Run it with Scipion's Python or the plugin's own:

  scipion3 python supervised_3d.py --tomograms /data/tomos --pattern 'TS_*.mrc' --sampling-rate 13.6 \\
      --coordinates '/data/picks/*.star' --diameter 18
  python -m cryopick_plugin.workflows.supervised_3d --simulate --epochs 4

With --simulate, small tomograms are simulated first (real density maps when available) and their ground
truth is both the training set and the reference the picks are scored against. With real data, --truth
(STAR files) scores the picks the same way. The last tomogram (sorted by tsId) is held out for validation
when there are two or more; its score is the honest one.
"""
import argparse
import glob
import os
import sys
import time

if __package__ in (None, ''):
    # Run as a file (`scipion3 python path/to/supervised_3d.py`): the plugin may be a plain checkout.
    try:
        import cryopick_plugin  # noqa: F401
    except ImportError:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from cryopick_plugin.workflows.common import (PipelineError, add_queue_args, describe, new_project, run,  # noqa: E402
                                              use_queue)

SIM_CLASSES = ('3j9i', '1bxn')
TOMOGRAM_PATH_ARGS = ('tomograms', 'truth', 'templates')


# ------------------------------------------------------------------------------------------ shared 3D parts
def add_tomogram_args(parser, simulate_defaults):
    """Input arguments shared by the 3D pipelines: real tomograms or a simulation, project, scoring."""
    group = parser.add_argument_group('input tomograms')
    group.add_argument('--tomograms', help='folder holding the tomograms (MRC)')
    group.add_argument('--pattern', default='*.mrc', help='file pattern inside that folder (default %(default)s)')
    group.add_argument('--sampling-rate', type=float, help='voxel size in Å of the tomograms')
    group.add_argument('--diameter', type=float, help='particle diameter in voxels (default with --simulate: the '
                                                      'largest simulated particle)')
    group.add_argument('--truth', help='STAR file(s) (pattern) of true positions to score the picks against')
    sim = parser.add_argument_group('simulation (instead of --tomograms)')
    sim.add_argument('--simulate', action='store_true', help='simulate small tomograms with ground truth first')
    sim.add_argument('--count', type=int, default=simulate_defaults['count'], help='tomograms to simulate')
    sim.add_argument('--shape', type=int, nargs=3, default=simulate_defaults['shape'], metavar=('Z', 'Y', 'X'))
    sim.add_argument('--classes', nargs='+', default=list(SIM_CLASSES), help='template names to place')
    sim.add_argument('--per-class', type=int, default=simulate_defaults['per_class'],
                     help='particles of each class per tomogram')
    sim.add_argument('--beads', type=int, default=simulate_defaults.get('beads', 0), help='gold beads per tomogram')
    sim.add_argument('--snr', type=float, default=simulate_defaults['snr'], help='projection SNR of the tilt series')
    sim.add_argument('--seed', type=int, default=0)
    sim.add_argument('--templates', help='folder of density maps (default: the shared data)')
    proj = parser.add_argument_group('project')
    proj.add_argument('--project', default=simulate_defaults['project'],
                      help='Scipion project name (default %(default)s; a timestamp is appended when it exists, '
                           'unless --overwrite)')
    proj.add_argument('--overwrite', action='store_true', help='replace an existing project of that name')
    add_queue_args(parser)


def check_tomogram_args(parser, args):
    """Refuse incomplete input before a project is made."""
    if args.simulate:
        return
    if not args.tomograms:
        parser.error('give --tomograms FOLDER (with --pattern and --sampling-rate) or --simulate')
    if not os.path.isdir(args.tomograms):
        parser.error(f'--tomograms {args.tomograms}: folder not found')
    if not glob.glob(os.path.join(args.tomograms, args.pattern)):
        parser.error(f'no file matches {os.path.join(args.tomograms, args.pattern)}')
    if not args.sampling_rate or args.sampling_rate <= 0:
        parser.error('--sampling-rate (Å/voxel) is needed with --tomograms')
    if not args.diameter or args.diameter <= 0:
        parser.error('--diameter (particle diameter in voxels) is needed with --tomograms')


def simulate_tomograms(folder, args, out):
    """Write `args.count` simulated tomograms and their truth STARs into `folder`; return the metadata."""
    from cryopick_plugin.engine.sim.tomograms import simulate_tomogram, write_simulated_tomogram
    sims = []
    for i in range(args.count):
        sim = simulate_tomogram(shape=tuple(args.shape), classes=tuple(args.classes), n_per_class=args.per_class,
                                snr=args.snr, seed=args.seed + i, templates_dir=args.templates,
                                name=f'tomo_{i:03d}', n_beads=args.beads)
        write_simulated_tomogram(sim, folder)
        sims.append(sim)
    meta = sims[0].meta
    print(f"Simulated {args.count} tomogram(s) of {tuple(args.shape)} voxels at {meta.get('voxel_size', 10.0):g} "
          f"Å/voxel, SNR {args.snr:g}, templates from {meta.get('template_source', '?')}: "
          f"{', '.join(f'{n} (class {k + 1})' for k, n in enumerate(sims[0].class_names))}; "
          f"{sum(len(s.truth) for s in sims)} particles in all", file=out)
    return sims


def prepare_tomograms(project, args, out):
    """Simulate when asked; return (folder, pattern, sampling rate, diameter in voxels, truth pattern)."""
    if not args.simulate:
        return args.tomograms, args.pattern, args.sampling_rate, args.diameter, args.truth
    folder = os.path.abspath(os.path.join(project.getPath(), 'simulated'))
    os.makedirs(folder, exist_ok=True)
    sims = simulate_tomograms(folder, args, out)
    meta = sims[0].meta
    diameter = args.diameter or float(max(meta['diameters_vox'].values()))
    return folder, 'tomo_*[0-9].mrc', float(meta.get('voxel_size', 10.0)), diameter, \
        os.path.join(folder, 'tomo_*_truth.star')


def open_project(args, path_args, out):
    """A new Scipion project, made the working folder (where pyworkflow expects to run its protocols).

    Paths given on the command line are made absolute first, so they still point where the user meant.
    """
    for name in path_args:
        value = getattr(args, name, None)
        if value:
            setattr(args, name, os.path.abspath(os.path.expanduser(value)))
    project = new_project(args.project, overwrite=args.overwrite)
    # Manager.createProject returns to the caller's folder, but launching a protocol opens the project
    # database by its relative name.
    os.chdir(project.getPath())
    print(f"Project: {project.getName()} ({project.getPath()})", file=out)
    return project


def report(prot, out):
    """What a finished protocol made, as the demo prints it."""
    print(f"{prot.getRunName()}  [{prot._cryopickSeconds:.1f} s]", file=out)
    for line in describe(prot):
        print(line, file=out)


def import_tomograms(project, folder, pattern, sampling_rate, out):
    from tomo.protocols import ProtImportTomograms
    prot = run(project, ProtImportTomograms, label='import tomograms', filesPath=folder, filesPattern=pattern,
               samplingRate=sampling_rate)
    report(prot, out)
    return prot


def box_for(diameter):
    """Even box of 1.5 × the particle diameter."""
    return int(2 * round(0.75 * diameter))


def label_diameter_for(diameter):
    """DeepETPicker labels a small ball at each centre: about 40 % of the particle, odd, at least 5 voxels."""
    d = max(5, int(round(0.4 * diameter)))
    return d if d % 2 else d + 1


def read_truth(pattern):
    """All rows of the truth STAR files matching `pattern`, one table."""
    import pandas as pd
    from cryopick_plugin.engine.io import star
    paths = sorted(glob.glob(pattern))
    if not paths:
        return None
    return pd.concat([star.read_coordinates(p, dims=3) for p in paths], ignore_index=True)


def format_scores(metrics):
    return (f"precision {metrics['precision']:.3f}, recall {metrics['recall']:.3f}, F1 {metrics['f1']:.3f} "
            f"({metrics['tp']} of {metrics['n_pred']} picks match {metrics['n_true']} true particles)")


def score_coordinates(what, coords, tomograms, truth, radius, out, per_tomogram=None):
    """Print (and return) the localisation scores of a SetOfCoordinates3D against a truth table.

    per_tomogram: {tsId: tag} to print a line per tomogram too (e.g. 'validation').
    """
    from cryopick_plugin import convert
    from cryopick_plugin.engine.io import star
    from cryopick_plugin.engine.evaluate import evaluate_picks
    df = convert.coordinates3d_to_frame(coords, tomograms) if coords.getSize() else None
    if df is None:
        import pandas as pd
        df = pd.DataFrame(columns=[star.TOMO, star.X, star.Y, star.Z, star.CLASS, star.SCORE])
    scores = evaluate_picks(df, truth, radius=radius)
    print(f"SCORE {what}: {format_scores(scores['localisation'])}, matching radius {radius:g} voxels", file=out)
    for tsId, tag in (per_tomogram or {}).items():
        sub = evaluate_picks(df[df[star.TOMO] == tsId], truth[truth[star.TOMO] == tsId], radius=radius)
        print(f"SCORE {what} [{tsId}, {tag}]: {format_scores(sub['localisation'])}", file=out)
    return scores


def run_cli(pipeline, args):
    """Run a pipeline for a command line: 0 when it finished, 2 for bad input, 1 when a protocol failed."""
    from cryopick_plugin.engine.errors import InputError
    try:
        # before any long work: a queue that hosts.conf lacks stops the pipeline here
        use_queue(getattr(args, 'queue', None), getattr(args, 'queue_params', None))
        pipeline(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PipelineError as e:
        print(f"Pipeline stopped: {e}", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------ RELION export
def export_relion(subtomos, coords, tomograms, folder):
    """Write the subtomograms as a RELION 3.1 particles STAR and the picks as a coordinate STAR.

    Returns (particles_star, coordinates_star). Positions are bottom-left-corner voxels of the tomograms,
    origin at the first voxel, as RELION's rlnCoordinateX/Y/Z.
    """
    import pandas as pd
    from tomo import constants as tconst
    from cryopick_plugin import convert
    from cryopick_plugin.engine.io import relion, star
    os.makedirs(folder, exist_ok=True)
    tomos = convert.tomograms_by_name(tomograms)
    rows, images = [], []
    for subtomo in subtomos.iterItems(orderBy='id'):
        coord = subtomo.getCoordinate3D()
        coord.setVolume(tomos[coord.getTomoId()])
        x, y, z = coord.getPosition(tconst.BOTTOM_LEFT_CORNER)
        rows.append({star.TOMO: coord.getTomoId(), star.X: x, star.Y: y, star.Z: z,
                     star.CLASS: int(coord.getGroupId() or 1), star.SCORE: float(coord.getScore() or 0.0)})
        images.append(os.path.abspath(subtomo.getFileName()))
    particles = relion.write_relion31_subtomo_star(os.path.join(folder, 'particles_subtomo.star'), images,
                                                   pd.DataFrame(rows), voxel_size=subtomos.getSamplingRate())
    coordinates = star.write_coordinates(os.path.join(folder, 'coordinates.star'),
                                         convert.coordinates3d_to_frame(coords, tomograms))
    return particles, coordinates


# ------------------------------------------------------------------------------------------ the pipeline
def run_supervised(args, out=sys.stdout):
    """Build and run the pipeline; return (project, {step name: finished protocol})."""
    from cryopick_plugin.protocols import (CryopickExtractSubtomograms, CryopickImportCoordinates3D,
                                           CryopickPick3D, CryopickTrain3D, CryopickWeakLabels)
    t0 = time.time()
    project = open_project(args, TOMOGRAM_PATH_ARGS + ('coordinates', 'relion_dir'), out)
    folder, pattern, sampling_rate, diameter, truth_pattern = prepare_tomograms(project, args, out)
    centres = args.coordinates or truth_pattern
    box = args.box or box_for(diameter)
    label_diameter = args.label_diameter or label_diameter_for(diameter)
    prots = {'tomograms': import_tomograms(project, folder, pattern, sampling_rate, out)}
    tomograms = prots['tomograms'].Tomograms

    prots['centres'] = run(project, CryopickImportCoordinates3D, label='import particle centres',
                           inputTomograms=tomograms, starFiles=centres, boxSize=box)
    report(prots['centres'], out)
    prots['labels'] = run(project, CryopickWeakLabels, label='weak labels', inputTomograms=tomograms,
                          inputCoordinates=prots['centres'].output3DCoordinates, diameter=label_diameter)
    report(prots['labels'], out)

    ts_ids = sorted(m.getTsId() for m in prots['labels'].outputTomoMasks.iterItems())
    validation = ts_ids[-1] if len(ts_ids) > 1 else ''
    print(f"Training on {', '.join(t for t in ts_ids if t != validation)}; validation: "
          f"{validation or 'a held-out slab of the first tomogram'}", file=out)
    prots['train'] = run(project, CryopickTrain3D, label='train DeepETPicker',
                         inputLabels=prots['labels'].outputTomoMasks,
                         inputCoordinates=prots['centres'].output3DCoordinates, validationTsIds=validation,
                         epochs=args.epochs, valEvery=1, patience=args.patience, tune=not args.no_tune,
                         seed=args.seed)
    report(prots['train'], out)
    for line in prots['train'].summary():
        print(f"  {line}", file=out)

    pick_params = {'tLm': args.t_lm} if args.t_lm is not None else {}
    prots['pick'] = run(project, CryopickPick3D, label='pick (DeepETPicker)', inputTomograms=tomograms,
                        inputModel=prots['train'].outputModel, boxSize=box, **pick_params)
    report(prots['pick'], out)
    picks = prots['pick'].output3DCoordinates

    if truth_pattern:
        truth = read_truth(truth_pattern)
        if truth is not None:
            tags = {t: ('validation' if t == validation else 'training') for t in ts_ids}
            score_coordinates('DeepETPicker picks vs truth', picks, tomograms, truth, diameter / 2, out, tags)

    if picks.getSize() == 0:
        raise PipelineError('the picker found no particle: nothing to extract. Train longer (--epochs) or lower '
                            'the local-maximum threshold (--t-lm).')
    prots['extract'] = run(project, CryopickExtractSubtomograms, label='extract picked subtomograms',
                           inputCoordinates=picks, boxSize=box, binning=args.bin)
    report(prots['extract'], out)

    relion_dir = args.relion_dir or os.path.abspath(os.path.join(project.getPath(), 'relion'))
    particles, coordinates = export_relion(prots['extract'].outputSubtomograms, picks, tomograms, relion_dir)
    print(f"RELION 3.1 subtomograms: {particles}", file=out)
    print(f"RELION coordinates: {coordinates}", file=out)
    print(f"  average them: cd {relion_dir} && relion_reconstruct --i particles_subtomo.star --o average.mrc "
          f"--3d_rot", file=out)
    print(f"Open the project: python -m pyworkflow.apps.pw_project {project.getName()}", file=out)
    print(f"Done in {time.time() - t0:.1f} s.", file=out)
    return project, prots


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog='\n'.join(__doc__.splitlines()[2:]))
    add_tomogram_args(parser, {'count': 2, 'shape': (56, 112, 112), 'per_class': 10, 'snr': 0.5,
                               'project': 'cryopick_supervised_3d'})
    parser.add_argument('--coordinates', help='STAR file(s) (pattern) of particle centres to train on, rows '
                                              'linked to tomograms by rlnTomoName (default with --simulate: '
                                              'the truth)')
    parser.add_argument('--box', type=int, help='box size in voxels (default 1.5 × diameter, even)')
    parser.add_argument('--label-diameter', type=int, help='weak-label ball diameter in voxels '
                                                          '(default 40 %% of the particle, odd)')
    parser.add_argument('--epochs', type=int, default=30, help='maximum training epochs (default %(default)s)')
    parser.add_argument('--patience', type=int, default=5, help='validations without improvement before stopping')
    parser.add_argument('--no-tune', action='store_true', help='keep the fixed picking thresholds')
    parser.add_argument('--t-lm', type=float, help='local-maximum threshold for picking (default: the model\'s)')
    parser.add_argument('--bin', type=int, default=1, help='binning of the extracted subtomograms')
    parser.add_argument('--relion-dir', help='folder for the RELION files (default: <project>/relion)')
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_tomogram_args(parser, args)
    if not args.simulate and not args.coordinates:
        parser.error('--coordinates (STAR files of particle centres) is needed with --tomograms')
    return run_cli(run_supervised, args)


if __name__ == '__main__':
    sys.exit(main())
