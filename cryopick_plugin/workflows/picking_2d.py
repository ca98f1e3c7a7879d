"""2D picking: micrographs → DeepCryoPicker and CryoSegNet → comparison of the two pickers.

A whole pipeline in a new Scipion project:

  import micrographs → DeepCryoPicker (fully automatic: its training set comes from clustering)
  → CryoSegNet training → CryoSegNet picking → compare the two pickers' coordinates

CryoSegNet needs training picks; by default they are DeepCryoPicker's, so the whole run needs no manual
pick. --coordinates (STAR files, e.g. manual picks) trains it on those instead, and --cryosegnet-model
skips training with a model trained earlier. The comparison matches the two sets one to one within
--match-radius pixels (default: the particle radius) and reports precision / recall / F1 of CryoSegNet
against DeepCryoPicker, the Jaccard index and the intersection / only-A / only-B sets.
--skip-deepcryopicker leaves DeepCryoPicker out; CryoSegNet is then compared with its training picks.

  scipion3 python picking_2d.py --micrographs /data/mics --pattern '*.mrc' --sampling-rate 1.06 \\
      --diameter 190
  python -m cryopick_plugin.workflows.picking_2d --simulate

With --simulate (or --truth STAR files) every picker is also scored against the true positions.
"""
import argparse
import glob
import os
import sys
import time

if __package__ in (None, ''):
    # Run as a file (`scipion3 python path/to/picking_2d.py`): the plugin may be a plain checkout.
    try:
        import cryopick_plugin  # noqa: F401
    except ImportError:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from cryopick_plugin.workflows.common import PipelineError, add_queue_args, run  # noqa: E402
from cryopick_plugin.workflows.supervised_3d import format_scores, open_project, report, run_cli  # noqa: E402

PATH_ARGS = ('micrographs', 'truth', 'templates', 'coordinates', 'cryosegnet_model', 'sam_checkpoint')


def simulate_micrographs(folder, args, out):
    """Write simulated micrographs and truth STARs into `folder`; return the metadata of the last one."""
    from cryopick_plugin.engine.sim.micrographs import simulate_micrograph, write_simulated_micrograph
    for i in range(args.count):
        sim = simulate_micrograph(shape=tuple(args.shape), template=args.template, n_particles=args.particles,
                                  snr=args.snr, pixel_size=args.pixel, seed=args.seed + i,
                                  templates_dir=args.templates, name=f'mic_{i:03d}')
        write_simulated_micrograph(sim, folder)
    print(f"Simulated {args.count} micrograph(s) of {tuple(args.shape)} px at {args.pixel:g} Å/px, SNR "
          f"{args.snr:g}, {args.particles} {sim.class_names[0]} particles each (diameter "
          f"{sim.meta['particle_diameter_px']:.1f} px), templates from {sim.meta.get('template_source', '?')}",
          file=out)
    return sim.meta


def _stem(name):
    return os.path.splitext(os.path.basename(str(name)))[0]


def read_truth_2d(pattern):
    import pandas as pd
    from cryopick_plugin.engine.io import star
    paths = sorted(glob.glob(pattern))
    if not paths:
        return None
    df = pd.concat([star.read_coordinates(p, dims=2) for p in paths], ignore_index=True)
    df[star.MIC] = df[star.MIC].map(_stem)
    return df


def picks_frame(coords, micrographs):
    from cryopick_plugin import convert
    from cryopick_plugin.engine.io import star
    df = convert.coordinates2d_to_frame(coords, micrographs)
    df[star.MIC] = df[star.MIC].map(_stem)
    return df


def score_2d(what, coords, micrographs, truth, radius, out):
    from cryopick_plugin.engine.evaluate import evaluate_picks
    scores = evaluate_picks(picks_frame(coords, micrographs), truth, radius=radius)
    print(f"SCORE {what}: {format_scores(scores['localisation'])}, matching radius {radius:.1f} px", file=out)
    return scores


def compare(project, a_prot, b_prot, a_name, b_name, micrographs, radius, out):
    """Compare A's picks with B's: the compare protocol when the plugin has it, else the engine directly.

    Returns (protocol or None, metrics dict with precision / recall / f1 / jaccard / n_a / n_b / n_both).
    """
    a, b = a_prot.outputCoordinates, b_prot.outputCoordinates
    try:
        from cryopick_plugin.protocols import CryopickCompareCoordinates
    except ImportError:
        CryopickCompareCoordinates = None
    if CryopickCompareCoordinates is not None:
        prot = run(project, CryopickCompareCoordinates, label=f'compare {a_name} with {b_name}',
                   inputCoordinatesA=a, inputCoordinatesB=b, radius=float(radius))
        report(prot, out)
        loc = prot.metrics()['localisation']
        n_a, n_b, n_both = loc['n_pred'], loc['n_true'], loc['tp']
        union = n_a + n_b - n_both
        metrics = {**loc, 'n_a': n_a, 'n_b': n_b, 'n_both': n_both, 'jaccard': n_both / union if union else 0.0}
    else:
        from cryopick_plugin.engine.evaluate import compare_sets
        prot = None
        _, _, _, metrics = compare_sets(picks_frame(a, micrographs), picks_frame(b, micrographs), radius)
    print(f"COMPARE {a_name} ({metrics['n_a']} picks) with {b_name} ({metrics['n_b']} picks) within "
          f"{radius:.1f} px: both {metrics['n_both']}, only {a_name} {metrics['n_a'] - metrics['n_both']}, only "
          f"{b_name} {metrics['n_b'] - metrics['n_both']}; precision {metrics['precision']:.3f}, recall "
          f"{metrics['recall']:.3f}, F1 {metrics['f1']:.3f}, Jaccard {metrics['jaccard']:.3f}", file=out)
    return prot, metrics


def run_picking_2d(args, out=sys.stdout):
    """Build and run the pipeline; return (project, {step name: finished protocol}, comparison metrics)."""
    from pwem.protocols import ProtImportMicrographs
    from cryopick_plugin.protocols import (CryopickCryoSegNet, CryopickDeepCryoPicker, CryopickImportCoordinates2D,
                                           CryopickImportModel, CryopickTrainCryoSegNet)
    from cryopick_plugin.protocols.protocol_model_import import METHODS
    t0 = time.time()
    project = open_project(args, PATH_ARGS, out)
    truth_pattern = args.truth
    if args.simulate:
        folder = os.path.abspath(os.path.join(project.getPath(), 'simulated'))
        os.makedirs(folder, exist_ok=True)
        meta = simulate_micrographs(folder, args, out)
        pattern, pixel = 'mic_*[0-9].mrc', args.pixel
        diameter_a = args.diameter or meta['particle_diameter_px'] * pixel
        truth_pattern = os.path.join(folder, 'mic_*_truth.star')
    else:
        folder, pattern, pixel, diameter_a = args.micrographs, args.pattern, args.sampling_rate, args.diameter
    diameter_px = diameter_a / pixel
    radius = args.match_radius or diameter_px / 2
    truth = read_truth_2d(truth_pattern) if truth_pattern else None
    prots = {'micrographs': run(project, ProtImportMicrographs, label='import micrographs', filesPath=folder,
                                filesPattern=pattern, samplingRate=pixel)}
    report(prots['micrographs'], out)
    mics = prots['micrographs'].outputMicrographs

    if not args.skip_deepcryopicker:
        prots['deepcryopicker'] = run(project, CryopickDeepCryoPicker, label='DeepCryoPicker', inputMicrographs=mics,
                                      diameter=float(diameter_a), seed=args.seed)
        report(prots['deepcryopicker'], out)
        if truth is not None:
            score_2d('DeepCryoPicker vs truth', prots['deepcryopicker'].outputCoordinates, mics, truth, radius, out)

    if args.cryosegnet_model:
        prots['model'] = run(project, CryopickImportModel, label='import CryoSegNet model',
                             modelFile=args.cryosegnet_model, method=METHODS.index('cryosegnet'))
        model = prots['model'].outputModel
        reference, reference_name = prots.get('deepcryopicker'), 'DeepCryoPicker'
    else:
        coordinates = args.coordinates
        if not coordinates and (args.skip_deepcryopicker or args.train_on_truth):
            coordinates = truth_pattern
        if coordinates:
            prots['training'] = run(project, CryopickImportCoordinates2D, label='import training picks',
                                    inputMicrographs=mics, starFiles=coordinates,
                                    boxSize=int(2 * round(0.75 * diameter_px)))
            report(prots['training'], out)
            source, source_name = prots['training'], 'training picks'
        elif 'deepcryopicker' in prots:
            source, source_name = prots['deepcryopicker'], 'DeepCryoPicker'
        else:
            raise PipelineError('CryoSegNet needs training picks: give --coordinates, --cryosegnet-model, or let '
                                'DeepCryoPicker run')
        if source.outputCoordinates.getSize() == 0:
            raise PipelineError(f"no {source_name} to train CryoSegNet on")
        print(f"CryoSegNet trains on the {source_name} ({source.outputCoordinates.getSize()} picks)", file=out)
        prots['train'] = run(project, CryopickTrainCryoSegNet, label='train CryoSegNet', inputMicrographs=mics,
                             inputCoordinates=source.outputCoordinates, diameter=float(diameter_a),
                             epochs=args.epochs, preprocess=not args.no_preprocess,
                             valFraction=args.val_fraction, learningRate=args.lr, seed=args.seed)
        report(prots['train'], out)
        model = prots['train'].outputModel
        reference, reference_name = (prots['deepcryopicker'], 'DeepCryoPicker') if 'deepcryopicker' in prots \
            else (source, source_name)

    pick_params = {'threshold': args.threshold} if args.threshold is not None else {}
    if args.sam_checkpoint:
        pick_params['samCheckpoint'] = args.sam_checkpoint
    prots['cryosegnet'] = run(project, CryopickCryoSegNet, label='CryoSegNet', inputMicrographs=mics,
                              inputModel=model, **pick_params)
    report(prots['cryosegnet'], out)
    for line in prots['cryosegnet'].summary():
        print(f"  {line}", file=out)
    if truth is not None:
        score_2d('CryoSegNet vs truth', prots['cryosegnet'].outputCoordinates, mics, truth, radius, out)

    metrics = None
    if reference is None:
        print("Nothing to compare CryoSegNet with (DeepCryoPicker skipped, model imported).", file=out)
    elif prots['cryosegnet'].outputCoordinates.getSize() == 0 or reference.outputCoordinates.getSize() == 0:
        print(f"Comparison skipped: CryoSegNet or the {reference_name} found no particle.", file=out)
    else:
        prot, metrics = compare(project, prots['cryosegnet'], reference, 'CryoSegNet', reference_name, mics,
                                radius, out)
        if prot is not None:
            prots['compare'] = prot
    print(f"Open the project: python -m pyworkflow.apps.pw_project {project.getName()}", file=out)
    print(f"Done in {time.time() - t0:.1f} s.", file=out)
    return project, prots, metrics


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog='\n'.join(__doc__.splitlines()[2:]))
    group = parser.add_argument_group('input micrographs')
    group.add_argument('--micrographs', help='folder holding the micrographs (MRC)')
    group.add_argument('--pattern', default='*.mrc', help='file pattern inside that folder (default %(default)s)')
    group.add_argument('--sampling-rate', type=float, help='pixel size in Å')
    group.add_argument('--diameter', type=float, help='particle diameter in Å (default with --simulate: the '
                                                      'simulated particle\'s)')
    group.add_argument('--truth', help='STAR file(s) (pattern) of true positions to score the picks against')
    sim = parser.add_argument_group('simulation (instead of --micrographs)')
    sim.add_argument('--simulate', action='store_true', help='simulate micrographs with ground truth first')
    sim.add_argument('--count', type=int, default=3, help='micrographs to simulate (default %(default)s)')
    sim.add_argument('--shape', type=int, nargs=2, default=(512, 512), metavar=('Y', 'X'))
    sim.add_argument('--template', default='1bxn', help='density map to project (default %(default)s)')
    sim.add_argument('--particles', type=int, default=60, help='particles per micrograph')
    sim.add_argument('--pixel', type=float, default=8.0, help='pixel size in Å (default %(default)s)')
    sim.add_argument('--snr', type=float, default=0.5)
    sim.add_argument('--seed', type=int, default=0)
    sim.add_argument('--templates', help='folder of density maps (default: the shared data)')
    pick = parser.add_argument_group('pickers')
    pick.add_argument('--skip-deepcryopicker', action='store_true', help='run CryoSegNet only')
    pick.add_argument('--coordinates', help='STAR file(s) (pattern) of picks to train CryoSegNet on')
    pick.add_argument('--train-on-truth', action='store_true', help='with --simulate: train CryoSegNet on the truth')
    pick.add_argument('--cryosegnet-model', help='a trained CryoSegNet model (.pt) instead of training one')
    pick.add_argument('--epochs', type=int, default=50, help='CryoSegNet training epochs (default %(default)s)')
    pick.add_argument('--lr', type=float, default=None,
                      help='CryoSegNet learning rate (default: the protocol\'s, 1e-3 for a new cpu-size network)')
    pick.add_argument('--val-fraction', type=float, default=0.2, help='micrographs held out in CryoSegNet training')
    pick.add_argument('--no-preprocess', action='store_true', help='skip CryoSegNet\'s denoising chain')
    pick.add_argument('--threshold', type=float, help='CryoSegNet U-Net threshold (default: the model\'s)')
    pick.add_argument('--sam-checkpoint', help='Segment Anything checkpoint (default: the plugin variable; '
                                               'without one the U-Net-only path picks)')
    pick.add_argument('--match-radius', type=float, help='matching radius in px (default: the particle radius)')
    proj = parser.add_argument_group('project')
    proj.add_argument('--project', default='cryopick_picking_2d', help='Scipion project name (default %(default)s; '
                      'a timestamp is appended when it exists, unless --overwrite)')
    proj.add_argument('--overwrite', action='store_true', help='replace an existing project of that name')
    add_queue_args(parser)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.simulate:
        if not args.micrographs or not os.path.isdir(args.micrographs):
            parser.error('give --micrographs FOLDER (with --pattern, --sampling-rate, --diameter) or --simulate')
        if not glob.glob(os.path.join(args.micrographs, args.pattern)):
            parser.error(f'no file matches {os.path.join(args.micrographs, args.pattern)}')
        if not args.sampling_rate or args.sampling_rate <= 0:
            parser.error('--sampling-rate (Å/px) is needed with --micrographs')
        if not args.diameter or args.diameter <= 0:
            parser.error('--diameter (Å) is needed with --micrographs')
    return run_cli(run_picking_2d, args)


if __name__ == '__main__':
    sys.exit(main())
