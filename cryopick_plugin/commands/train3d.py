"""Train a DeepETPicker 3D-ResUNet from tomograms, weak label maps and particle centres → model file.

Each --train / --val is TOMO.mrc:LABELS.mrc:COORDS.star (label map from `cryopick labels`; when the STAR
file has rlnTomoName only the rows naming this tomogram are used). Without --val the last 20% of the
first training tomogram along y is held out for validation. Every --val-every epochs the real picking
(overlap tiles + MP-NMS) runs on the validation data; the model with the best P·R^α/(P+R^α) score (α=3)
is kept, training stops after --patience validations without improvement, and t_seg / t_lm are then
tuned on the validation data and stored in the model. A learning curve is written beside the model
(MODEL.history.csv / .history.json) and a description as MODEL.json.

Progress: every few seconds a line with the steps done in the epoch, the rate and the ETA. --time-budget
stops the training in time for the final tuning. After every epoch the training state is saved in
MODEL.checkpoint.pt: an interrupted run started again with the same options continues from there (the file is
removed when training ends, kept after a time-budget stop).

Presets: cpu (widths 8/16/24/36, patch 48, batch 1, ≈11.5 GFLOP per step) and paper (24/48/72/108,
patch 72, batch 8, as DeepETPicker).

Label diameter: the --diameter the label maps were made with, about half the particle diameter, odd (a
22-voxel particle → 11); --particle-diameter D computes it. By default it is measured on the label maps.

Expected cost (cpu preset, one 48³ patch per step, ≈11.5 GFLOP): about 0.4 s per step in fp32 and 0.2 s
in bf16 on one thread of an AMD EPYC with AVX-512 BF16 (CPU time, 2026-12-06); about 1.3 s per fp32 step on
one thread of an AVX2-only CPU, which has no native bf16. An epoch is about (training particles × (1 +
--bg-fraction)) / batch size steps: 300 particles make ≈330 steps, 2–7 minutes; --steps-per-epoch caps
that, --time-budget bounds the whole run. Each validation adds a pass over the validation tomogram. A
paper-preset step (8 patches of 72³) costs about 230 times as much: use a GPU.

Example:
  cryopick train3d --train TS_01.mrc:TS_01_labels.mrc:picks.star --train TS_02.mrc:TS_02_labels.mrc:picks.star \\
      --val TS_03.mrc:TS_03_labels.mrc:picks.star --out deepet.pt --preset cpu --epochs 40
"""
import logging

from ..engine.pick3d import labels
from ..engine import settings
from ..engine.io import star
from ..engine.errors import InputError
from . import DefaultsHelpFormatter, add_threads_arg, add_resume_args
from .labels import add_diameter_args, diameter_spec

log = logging.getLogger(__name__)


def add_args(parser):
    parser.formatter_class = DefaultsHelpFormatter
    parser.add_argument('--train', action='append', required=True, metavar='TOMO:LABELS:COORDS',
                        help='training tomogram, its label map and its coordinates (repeatable)')
    parser.add_argument('--val', action='append', default=[], metavar='TOMO:LABELS:COORDS',
                        help='validation tomogram (repeatable; default: hold out part of the first --train)')
    parser.add_argument('--out', required=True, help='output model file (.pt)')
    parser.add_argument('--preset', choices=('cpu', 'paper'), default='cpu', help='network size (default cpu)')
    parser.add_argument('--epochs', type=int, default=30, help='most epochs to run')
    parser.add_argument('--batch-size', type=int, default=None, help='patches per step (default from the preset: '
                                                                     'cpu 1, paper 8)')
    parser.add_argument('--lr', type=float, default=None, help='peak learning rate (default from the preset: '
                                                               'cpu 2e-3, paper 1e-3)')
    parser.add_argument('--patch', type=int, default=None, help='patch side in voxels (default from the preset: '
                                                                'cpu 48, paper 72)')
    parser.add_argument('--pad', type=int, default=None, help='tile margin for validation and picking (default '
                                                              'from the preset: cpu 8, paper 12)')
    add_diameter_args(parser, default_text='measured on the label maps')
    parser.add_argument('--label-kind', choices=labels.KINDS, default='tball', help='recorded in the model')
    parser.add_argument('--steps-per-epoch', type=int, default=None,
                        help='cap on batches per epoch (a random subset of the particles each epoch; '
                             'default: no cap)')
    parser.add_argument('--val-every', type=int, default=2, help='epochs between validations')
    parser.add_argument('--patience', type=int, default=5, help='validations without improvement before stopping')
    parser.add_argument('--alpha', type=float, default=3.0, help='recall weight of the selection score')
    parser.add_argument('--ce-weight', type=float, default=0.5, help='cross-entropy weight added to soft Dice')
    parser.add_argument('--no-class-balance', action='store_true',
                        help='draw each particle once per epoch (the reference) instead of every class equally often')
    parser.add_argument('--bg-fraction', type=float, default=0.1,
                        help='background patches per particle patch')
    parser.add_argument('--hard-fraction', type=float, default=0.0,
                        help='share of the background patches centred on unlabelled blobs found by DoG '
                             '(hard negatives; 0 = all at random places, the reference)')
    parser.add_argument('--no-tune', action='store_true', help='keep t_seg 0.5 / t_lm 0.1 instead of tuning them')
    parser.add_argument('--time-budget', type=float, default=None, metavar='MIN',
                        help='stop after this many minutes of wall clock with the best model so far, leaving time '
                             'for the final validation and threshold tuning (default: no limit); the training '
                             'state stays in OUT.checkpoint.pt, so the same command continues the training')
    add_resume_args(parser)
    parser.add_argument('--device', default=None, help='auto, cpu, cuda or cuda:N (default $CRYOPICK_DEVICE)')
    parser.add_argument('--precision', choices=settings.PRECISIONS, default=None,
                        help='network arithmetic: auto (bf16 where the CPU/GPU has it natively), fp32 or bf16 (default $CRYOPICK_PRECISION or auto)')
    add_threads_arg(parser)
    parser.add_argument('--seed', type=int, default=0, help='random seed')


def parse_item(spec, option):
    parts = spec.split(':')
    if len(parts) != 3 or not all(parts):
        raise InputError(option, f"expected TOMO.mrc:LABELS.mrc:COORDS.star, got {spec!r}")
    tomo, label_map, coords = parts
    table = star.rows_for_volume(star.read_coordinates(coords, dims=3), tomo, coords)
    return tomo, label_map, table


def main(args):
    for option, value in (('--bg-fraction', args.bg_fraction), ('--hard-fraction', args.hard_fraction)):
        if not 0 <= value <= (10 if option == '--bg-fraction' else 1):
            raise InputError(option, f"out of range: {value:g}")
    train_items = [parse_item(s, '--train') for s in args.train]
    val_items = [parse_item(s, '--val') for s in args.val]
    diameters = diameter_spec(args) or None
    if diameters is not None:
        classes = set()
        for _, _, table in train_items:
            classes.update(table[star.CLASS].astype(int).tolist())
        diameters = labels.diameters_by_class(classes, diameters)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    from ..engine.pick3d import training as train3d
    meta = train3d.train(train_items, val_items, args.out, preset=args.preset, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, device=args.device, seed=args.seed,
                         alpha=args.alpha, val_every=args.val_every, patience=args.patience,
                         diameters=diameters, label_kind=args.label_kind, patch=args.patch, pad=args.pad,
                         ce_weight=args.ce_weight, tune=not args.no_tune,
                         max_steps_per_epoch=args.steps_per_epoch, class_balance=not args.no_class_balance,
                         bg_fraction=args.bg_fraction, hard_fraction=args.hard_fraction,
                         precision=args.precision, time_budget=args.time_budget, resume=args.resume)
    log.info('%s: best epoch %s of %s (stopped by %s), validation %s, thresholds %s', args.out, meta['best_epoch'],
             meta['epochs_run'], meta['stop_reason'], meta['best_val'], meta['thresholds'])
    return 0
