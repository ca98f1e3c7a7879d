"""Overlap-tile padding at the tomogram's faces: 'zero' (the reference's) against 'inside' (windows moved
inside the volume, as training patches are placed), on models trained by `bench_pick3d_f1.py`.

For each run folder (bench/results/<condition>/ with deepet_cpu.pt and the four simulated tomograms): the
thresholds are tuned on validation tomogram sim103 for each padding (`train3d.retune(..., padding=P)`), the
test tomogram sim104 is picked with that padding (`pick3d.pick(..., padding=P)`), and the picks are scored
as in `bench_pick3d_f1.score_picks` (strict D/4 and full D/2). Results go to --out as JSON.

  .venv/bin/python bench/bench_pick3d_padding.py snr0.02_96x256x256_bf16b4hard120 snr0.02_96x256x256_w12p40 snr0.02_96x256x256_bf16b4lab07
"""
import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_pick3d_f1 as f1  # noqa: E402
from cryopick_plugin.engine.io import mrc, star  # noqa: E402
from cryopick_plugin.engine.pick3d import picking as pick3d, training as train3d


def compare(run_dir, paddings=('zero', 'inside'), work=None):
    model = os.path.join(run_dir, 'deepet_cpu.pt')
    val = [(os.path.join(run_dir, 'sim103.mrc'), os.path.join(run_dir, 'sim103_labels.mrc'),
            star.read_coordinates(os.path.join(run_dir, 'sim103_truth.star')))]
    truth = star.read_coordinates(os.path.join(run_dir, 'sim104_truth.star'))
    info = json.load(open(os.path.join(run_dir, 'simulation.json')))
    diam = {int(c): float(v) for c, v in info['sim101']['diameters_vox'].items()}
    out = {}
    for padding in paddings:
        tuned = os.path.join(work, f'{os.path.basename(run_dir)}_{padding}.pt')
        meta = train3d.retune(model, val, tuned, padding=padding)
        picks = pick3d.pick(os.path.join(run_dir, 'sim104.mrc'), tuned, device='cpu', tomo_name='sim104',
                            work_dir=work, padding=padding)
        record = {'val_f1': meta['tuned_val']['f1'],
                  'thresholds': {k: meta['thresholds'][k] for k in ('t_seg', 't_lm')}, 'n_picks': int(len(picks))}
        for name, factor in (('strict_D/4', 0.25), ('full_D/2', 0.5)):
            sc = f1.score_picks(picks, truth, diam, factor)
            record[name] = {**{f1.NAMES[f1.CLASSES[c - 1]]: v['f1'] for c, v in sc['per_class'].items()},
                            'classification': sc['classification']['f1'], 'localisation': sc['localisation']['f1']}
        out[padding] = record
        print(os.path.basename(run_dir), padding, json.dumps(record), flush=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('runs', nargs='+', help='run folders under --results (bench_pick3d_f1.py conditions)')
    parser.add_argument('--results', default=os.path.join(f1.ROOT, 'bench', 'results'))
    parser.add_argument('--out', default=None, help='JSON path (default <results>/pick3d_padding.json)')
    parser.add_argument('--threads', type=int, default=1)
    args = parser.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    result = {}
    with tempfile.TemporaryDirectory() as work:
        for run in args.runs:
            result[run] = compare(os.path.join(args.results, run), work=work)
    path = args.out or os.path.join(args.results, 'pick3d_padding.json')
    with mrc.atomic_path(path) as tmp:
        json.dump(result, open(tmp, 'w'), indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
