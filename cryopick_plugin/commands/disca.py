"""Cluster subtomograms without templates or labels (DISCA: YOPO features + Gaussian-mixture EM).

Reads a STAR file of subtomograms (rlnImageName: one MRC per subtomogram, relative to the STAR file's
folder; rlnTomoName, rlnCoordinateX/Y/Z travel along), estimates the number of clusters K by BIC and
writes to --out:

  disca_model.pt (+ .json)   network + PCA + Gaussian mixture, for `cryopick disca-predict`
  labels.star                input rows + rlnClassNumber (cluster, 1-based) + rlnAutopickFigureOfMerit
                             (posterior probability of that cluster)
  history.json               per iteration: K, BIC, DDBI, fraction of labels changed, loss, time; the kept
                             iteration; the class averages and their sizes
  embeddings.npz             per iteration: 2D PCA embedding (iterations, N, 2) and labels (iterations, N)
  class_001_average.mrc ...  plain (unaligned) average of each cluster's subtomograms

Then (unless --no-align-refine) the clusters are refined by multi-reference alignment with the missing
wedge (`engine.disca.align`): a reference per cluster grown from its members, each cluster tested on
held-out members for two molecules and split when it holds them, every subtomogram classified against all
references. labels.star then holds those classes, the class averages are aligned and wedge-compensated,
and history.json's 'alignment' records each step and test; disca_model.pt holds the refinement's
references and predicts its classes (the network's own clusters: 'network_k').

Needs at least 10 subtomograms per cluster of the smallest K; the largest K is lowered to N // 10.

The missing wedge (tilt axis Y): --wedge-tilt when given (0: ignore the wedge); else the STAR file's
cpTiltAngleMin / cpTiltAngleMax columns (any table; the Scipion protocol writes them from the acquisition);
else the wedge the subtomograms' mean power spectrum shows. The log says which. With it, clusters that are
one molecule seen in different orientations to the wedge are merged, and the network that judges each
split of the split check is retrained with the wedge on its rotated copies (a split it puts back together
is rejected).

Example:
  cryopick disca subtomograms.star --out disca_run --preset cpu --k-min 2 --k-max 20 --max-iter 10
"""
import argparse
import json
import logging
import os

import numpy as np

from cryopick_plugin.engine.errors import InputError
from cryopick_plugin.commands import add_threads_arg

logger = logging.getLogger('cryopick.disca')

IMAGE = 'rlnImageName'


def read_subtomogram_star(star_path):
    """(stack (N, b, b, b) float32, table, voxel size Å) from a subtomogram STAR file."""
    from cryopick_plugin.engine.disca.extract import read_subtomograms
    return read_subtomograms(star_path)


def labelled_table(table, labels, probabilities):
    """The input table with rlnClassNumber = cluster + 1 and rlnAutopickFigureOfMerit = its probability."""
    from cryopick_plugin.engine.io.star import CLASS, SCORE
    out = table.copy()
    out[CLASS] = np.asarray(labels, dtype=int) + 1
    out[SCORE] = probabilities[np.arange(len(labels)), labels]
    return out


def add_args(parser):
    parser.add_argument('subtomograms', help='STAR file of subtomograms (rlnImageName)')
    parser.add_argument('--out', required=True, help='output folder')
    parser.add_argument('--preset', choices=['cpu', 'paper'], default='cpu',
                        help="network width and input box: 'cpu' (quarter width, binned to 24³; starts from "
                             "rotation-invariant features of the subtomograms and clusters them beside the "
                             "network's features in every iteration) or 'paper' (the published width, input at "
                             "its own box, the reference's start and network features only); default cpu")
    parser.add_argument('--k-min', type=int, default=2, help='smallest number of clusters tried (2)')
    parser.add_argument('--k-max', type=int, default=20, help='largest number of clusters tried (20)')
    parser.add_argument('--max-iter', type=int, default=None,
                        help='EM iterations at most; a run stops earlier when the labels are stable (default 20)')
    parser.add_argument('--wedge-tilt', type=float, default=None, metavar='DEG',
                        help='largest tilt angle of the acquisition (e.g. 60 for a ±60° series, tilt axis Y): '
                             'clusters that turn into each other when their members are rotated with this wedge '
                             'put back (one molecule split by its orientation to the wedge) are merged, unless '
                             'their union is two groups on spectral features; a cluster that keeps few of its '
                             'rotated members joins the cluster nearest on spectral features (if their spectral '
                             'groups fold when rotated); and the refinement that judges '
                             'each split puts it back on its rotated training copies; 0: ignore the wedge '
                             '(default: from the '
                             'STAR file\'s cpTiltAngleMin/Max, else read from the subtomograms)')
    parser.add_argument('--no-split-check', dest='split_check', action='store_false',
                        help='do not test the final clusters for two molecules merged into one (by default each '
                             'cluster whose members fall into two clearly separated groups of rotation-invariant '
                             'spectral features is split, and pieces of one molecule left in two clusters are joined '
                             'again; a split that the refinement\'s network never keeps apart is rejected, unless, with the tilt '
                             'range known, its sides stay apart with every member turned and the wedge put back; '
                             'at the end, small separate groups of a cluster\'s members move to the cluster they fit)')
    parser.add_argument('--refine-iter', type=int, default=None, metavar='N',
                        help='when the split check changed the clusters: train the network on the corrected '
                             'clusters and run at most N more EM iterations from them (a split that none of their '
                             'clusterings keeps apart, and whose sides do not stay apart when turned, is rejected), then check again '
                             '(default 5; 0: keep the split clusters as they are)')
    parser.add_argument('--align-refine', action=argparse.BooleanOptionalAction, default=True,
                        help='after clustering, refine the clusters by multi-reference alignment with the missing '
                             'wedge: each cluster gets a reference grown from its members (orientations found by '
                             'alignment), is tested for two molecules on held-out members and split when they '
                             'are, then every subtomogram is classified against all references. Recovers '
                             'molecules the network features mix at very low SNR; writes aligned, '
                             'wedge-compensated class averages. On by default; about 6 min per 1 000 '
                             'subtomograms on one CPU core (--no-align-refine: the network\'s clusters as they are)')
    parser.add_argument('--align-orientations', type=int, default=2000, metavar='N',
                        help='orientations of the global search grid of --align-refine (2000, ≈ 20° apart; '
                             'each best one is then refined locally)')
    parser.add_argument('--seed', type=int, default=0, help='random seed (0)')
    parser.add_argument('--device', default=None, help="'auto', 'cpu' or 'cuda' (default $CRYOPICK_DEVICE or auto)")
    add_threads_arg(parser)
    parser.add_argument('--precision', choices=('auto', 'fp32', 'bf16'), default='fp32',
                        help='arithmetic of the network in the EM loop: fp32 (default, the precision the '
                             'clustering was validated in), bf16 (autocast: faster where the CPU/GPU has it '
                             'natively, emulated and much slower elsewhere) or auto (bf16 where native)')


def main(args):
    from cryopick_plugin.engine.disca import em, model
    from cryopick_plugin.engine.disca.features import tilt_range_from_star
    from cryopick_plugin.engine.io.mrc import atomic_path, write_mrc
    from cryopick_plugin.engine.io.star import write_star
    if args.wedge_tilt is not None and not 0 <= args.wedge_tilt < 90:
        raise InputError('--wedge-tilt', f"must be between 0 and 90 degrees, got {args.wedge_tilt:g}")
    if args.refine_iter is not None and args.refine_iter < 0:
        raise InputError('--refine-iter', f"must be 0 or more, got {args.refine_iter}")
    if args.align_orientations < 50:
        raise InputError('--align-orientations', f"must be at least 50, got {args.align_orientations}")
    if args.k_min < 1 or args.k_max < args.k_min:
        raise InputError('--k-min/--k-max', f"bad range {args.k_min}..{args.k_max}")
    tilt = args.wedge_tilt
    if tilt is None:
        tilt, note = tilt_range_from_star(args.subtomograms)
    else:
        note = f'tilt range from --wedge-tilt: ±{tilt:g}°'
    logger.info('%s', note)
    stack, table, voxel = read_subtomogram_star(args.subtomograms)
    os.makedirs(args.out, exist_ok=True)
    result = em.disca_cluster(stack, preset=args.preset, k_range=(args.k_min, args.k_max),
                                 max_iter=args.max_iter, seed=args.seed, device=args.device,
                                 log=logger.info, out_dir=args.out,
                                 options=dict({'split_check': args.split_check, 'wedge_tilt': tilt,
                                               'precision': args.precision},
                                              **({'refine_iter': args.refine_iter}
                                                 if args.refine_iter is not None else {})))
    labels, probabilities, k, alignment = result.labels, result.probabilities, result.k, None
    if args.align_refine:
        from cryopick_plugin.engine.disca import align
        alignment = align.run(stack, result.labels, result.features, tilt_range=result.options.get('wedge_tilt'),
                              n_rotations=args.align_orientations, seed=args.seed, say=logger.info)
        labels, k = alignment['labels'], alignment['record']['k']
        # One column of probabilities per class, as the network's posterior has: the assigned class's
        # posterior under the alignment model, where labelled_table reads it.
        probabilities = np.zeros((len(labels), k))
        probabilities[np.arange(len(labels)), labels] = alignment['probability']
    model_path = os.path.join(args.out, 'disca_model.pt')
    model.save_disca_model(model_path, result, {'voxel_size': voxel, 'source': os.path.abspath(args.subtomograms)},
                           alignment=alignment['model'] if alignment is not None else None)
    write_star(os.path.join(args.out, 'labels.star'),
               {'particles': labelled_table(table, labels, probabilities)})
    averages = []
    for c in range(k):
        members = np.flatnonzero(labels == c)
        name = f'class_{c + 1:03d}_average.mrc'
        if alignment is not None:
            write_mrc(os.path.join(args.out, name), alignment['averages'][c], voxel)
            averages.append({'class': c + 1, 'file': name, 'size': int(len(members)), 'aligned': True,
                             'note': 'members turned back by their alignment orientations, missing wedge '
                                     'compensated'})
            continue
        write_mrc(os.path.join(args.out, name), stack[members].mean(axis=0), voxel)
        averages.append({'class': c + 1, 'file': name, 'size': int(len(members)), 'aligned': False,
                         'note': 'plain average of the unaligned subtomograms of the class'})
    summary = {'iterations': result.history, 'kept_iteration': result.best_iteration, 'k': k,
               'class_averages': averages, 'model': 'disca_model.pt', 'labels': 'labels.star',
               'embeddings': 'embeddings.npz', 'meta': result.meta, 'wedge_note': note}
    if alignment is not None:
        summary['network_k'] = result.k
        summary['alignment'] = alignment['record']
        summary['alignment']['note'] = ('labels.star holds the classes of the alignment refinement, and '
                                        'disca_model.pt predicts them (against the refinement\'s references); '
                                        'network_k: the network\'s clusters before it')
    with atomic_path(os.path.join(args.out, 'history.json')) as tmp:
        with open(tmp, 'w') as fh:
            json.dump(summary, fh, indent=1)
    logger.info('K=%d clusters, sizes %s; results in %s', k, np.bincount(labels, minlength=k).tolist(), args.out)
    return 0
