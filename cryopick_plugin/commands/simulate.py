"""Simulate tomograms, subtomograms or micrographs with ground truth from real density maps.

  cryopick simulate tomograms --out DIR [--count N] [--shape Z Y X] [--classes 4v4r 3j9i ...]
                              [--distractors 1qvr ...] [--per-class N] [--beads N] [--vesicles N]
                              [--snr F] [--tilt-range DEG] [--tilt-step DEG] [--voxel-size A] [--seed S]
  cryopick simulate subtomograms --out DIR [--classes ...] [--per-class N] [--box N] [--snr F]
  cryopick simulate micrographs --out DIR [--count N] [--shape Y X] [--template 1bxn] [--particles N]

Tomograms: templates in random orientations placed without overlap, projected along Z over a tilt
series (tilt axis Y), CTF and noise per projection (SNR = signal / noise variance per projection),
phase-flipped and reconstructed by weighted back-projection. Particles are dark. Tomogram i of a run
uses seed + i and is named tomo_{i:03d}: tomo_000.mrc, tomo_000_truth.star (rlnTomoName,
rlnCoordinateX/Y/Z in voxels, rlnClassNumber, rlnAngleRot/Tilt/Psi) and tomo_000.json (metadata).
Subtomograms: one particle per box with CTF, missing wedge and noise; subtomograms.star lists them.
Micrographs: mic_{i:03d}.mrc / _truth.star / .json, with CTF, ice gradient, carbon edge, contamination.

Templates come from --templates DIR (default: $CRYOPICK_TEMPLATES or shared/data/templates_10A); without
maps (or with --synthetic) simple synthetic shapes stand in, and the output says so.
"""
import os

from ..engine.errors import InputError


def _common(p, count=True):
    p.add_argument('--out', required=True, help='output folder (created)')
    if count:
        p.add_argument('--count', type=int, default=1, help='how many to simulate (default 1)')
    p.add_argument('--snr', type=float, default=None, help='signal-to-noise ratio (variance ratio)')
    p.add_argument('--seed', type=int, default=0, help='random seed (item i uses seed + i)')
    p.add_argument('--templates', default=None, metavar='DIR', help='folder of template maps <name>.mrc')
    p.add_argument('--synthetic', action='store_true', help='use synthetic shapes instead of maps')


def add_args(parser):
    sub = parser.add_subparsers(dest='kind', metavar='KIND')
    sub.required = True

    t = sub.add_parser('tomograms', help='tilt-series-based tomograms with truth coordinates')
    _common(t)
    t.add_argument('--shape', type=int, nargs=3, default=[64, 128, 128], metavar=('Z', 'Y', 'X'))
    t.add_argument('--classes', nargs='+', default=['4v4r', '3j9i', '4v94', '1bxn'])
    t.add_argument('--distractors', nargs='*', default=[], help='molecules placed but not in the truth')
    t.add_argument('--per-class', type=int, default=None,
                   help='copies per class (default: an equal share of ~25%% of the volume per class)')
    t.add_argument('--beads', type=int, default=0, help='gold beads')
    t.add_argument('--vesicles', type=int, default=0, help='vesicle membranes')
    t.add_argument('--tilt-range', type=float, default=60.0, help='maximum tilt in degrees (default 60)')
    t.add_argument('--tilt-step', type=float, default=3.0, help='tilt increment in degrees (default 3)')
    t.add_argument('--defocus', type=float, nargs=2, default=[3.0, 5.0], metavar=('LO', 'HI'),
                   help='underfocus range in µm (default 3 5)')
    t.add_argument('--voxel-size', type=float, default=10.0, help='Å per voxel (default 10)')

    s = sub.add_parser('subtomograms', help='single-particle subtomograms with classes and angles')
    _common(s, count=False)
    s.add_argument('--classes', nargs='+', default=['4v4r', '3j9i', '4v94', '4cr2', '1qvr'])
    s.add_argument('--per-class', type=int, default=200)
    s.add_argument('--box', type=int, default=32, help='box size in voxels (default 32)')
    s.add_argument('--tilt-range', type=float, default=60.0)
    s.add_argument('--defocus', type=float, nargs='+', default=[4.0], help='µm: one value or LO HI')
    s.add_argument('--voxel-size', type=float, default=10.0,
                   help='Å per voxel of the templates before any binning to fit the box')

    m = sub.add_parser('micrographs', help='micrographs with CTF, ice, carbon and contamination')
    _common(m)
    m.add_argument('--shape', type=int, nargs=2, default=[1024, 1024], metavar=('Y', 'X'))
    m.add_argument('--template', nargs='+', default=['1bxn'], help='template name(s); one class each')
    m.add_argument('--particles', type=int, default=60, help='particles per micrograph')
    m.add_argument('--pixel-size', type=float, default=10.0, help='Å per pixel (default 10)')
    m.add_argument('--defocus', type=float, default=2.0, help='underfocus in µm (default 2)')
    m.add_argument('--no-ice-gradient', action='store_true')
    m.add_argument('--no-carbon', action='store_true')
    m.add_argument('--no-contamination', action='store_true')


def _templates(args):
    if args.synthetic:
        return False
    if args.templates is not None and not os.path.isdir(args.templates):
        raise InputError(args.templates, "template folder not found")
    return args.templates


def main(args):
    count = getattr(args, 'count', 1)
    if count < 1:
        raise InputError('--count', f"must be at least 1, got {count}")
    templates = _templates(args)
    if args.kind == 'tomograms':
        from ..engine.sim.tomograms import simulate_tomogram, write_simulated_tomogram
        for i in range(count):
            sim = simulate_tomogram(
                shape=args.shape, classes=args.classes, n_per_class=args.per_class,
                distractors=args.distractors, n_beads=args.beads, n_vesicles=args.vesicles,
                snr=0.05 if args.snr is None else args.snr, tilt_range=args.tilt_range,
                tilt_step=args.tilt_step, defocus_um=tuple(args.defocus), voxel_size=args.voxel_size,
                seed=args.seed + i, templates_dir=templates, name=f'tomo_{i:03d}')
            paths = write_simulated_tomogram(sim, args.out)
            placed = ', '.join(f"{n}: {sim.meta['placed'][n]}" for n in sim.class_names)
            _report(sim.name, paths, sim.meta, f"{len(sim.truth)} particles ({placed})")
    elif args.kind == 'subtomograms':
        from ..engine.sim.subtomograms import simulate_subtomograms, write_subtomograms
        sim = simulate_subtomograms(
            classes=args.classes, n_per_class=args.per_class, box=args.box,
            snr=0.1 if args.snr is None else args.snr, tilt_range=args.tilt_range,
            voxel_size=args.voxel_size, defocus_um=args.defocus if len(args.defocus) > 1 else args.defocus[0],
            seed=args.seed, templates_dir=templates)
        paths = write_subtomograms(sim, args.out)
        _report('subtomograms', paths, sim.meta, f"{len(sim.labels)} subtomograms of {args.box}³ voxels, "
                f"{sim.meta['voxel_size']:.2f} Å/voxel (binning {sim.meta['binning']:.2f})")
    else:
        from ..engine.sim.micrographs import simulate_micrograph, write_simulated_micrograph
        for i in range(count):
            sim = simulate_micrograph(
                shape=args.shape, template=args.template if len(args.template) > 1 else args.template[0],
                n_particles=args.particles, snr=0.1 if args.snr is None else args.snr,
                pixel_size=args.pixel_size, defocus_um=args.defocus, ice_gradient=not args.no_ice_gradient,
                carbon_edge=not args.no_carbon, contamination=not args.no_contamination, seed=args.seed + i,
                templates_dir=templates, name=f'mic_{i:03d}')
            paths = write_simulated_micrograph(sim, args.out)
            _report(sim.name, paths, sim.meta, f"{len(sim.truth)} particles, diameter "
                    f"{sim.meta['particle_diameter_px']:.0f} px")
    return 0


def _report(name, paths, meta, what):
    source = meta['template_source']
    if meta.get('template_substitutes'):
        source += ' (' + ', '.join(f'{k} -> {v}' for k, v in meta['template_substitutes'].items()) + ')'
    print(f"{name}: {what}; templates: {source}")
    for key, path in paths.items():
        print(f"  {key}: {path}")
