"""What the simulated subtomograms themselves allow: classification by the true maps (an oracle).

`bench_disca_ceiling.py` asks how well DISCA's network can tell the molecules apart when trained on the
truth. This bench asks the data: every subtomogram of a `bench_disca.simulate` set is compared with the
five true maps, each turned to every orientation of a grid and passed through the simulator's own forward
model (rotation, paste at the box centre, |CTF|, missing wedge, dark contrast). Subtomograms and
references are both normalised per box (zero mean, unit variance, as DISCA normalises), so the molecules'
sizes — which in this simulator set each subtomogram's noise level — cannot be used.

Under the simulator's noise (white inside the wedge, none outside), a normalised subtomogram is
a·ŝ + m with a = √(snr / (1 + snr)), ŝ the normalised reference at the true orientation and m noise of
variance 1 / (1 + snr) per voxel spread over the fraction f of Fourier components inside the wedge. So

    log p(x | class c, orientation R) = f·(1 + snr)·(a·⟨x, ŝ_c(R)⟩ − a²·‖ŝ_c(R)‖² / 2) + const,

and three classifiers are scored (accuracy, V-measure):

  known orientation   argmax_c log p(x | c, R_true): given the orientation as well, the Bayes classifier;
                      no method that sees only the subtomogram does better
  marginal            argmax_c log Σ_R p(x | c, R) over the grid: the Bayes classifier without the
                      orientation, as far as the grid samples SO(3)
  best match          argmax_c max_R: template matching with the true maps

The last two need the true maps, which an unsupervised method does not have; what they reach is what the
data hold at that noise and wedge, the first is the strict upper bound.

  .venv/bin/python bench/bench_disca_oracle.py --out bench/results/disca_oracle --conditions snr0.01_w40 --seed 0 --rotations 4000
"""
import argparse
import json
import os
import sys
import time

import numpy as np
from scipy import fft
from sklearn.metrics import accuracy_score, confusion_matrix, v_measure_score

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_disca  # noqa: E402
from cryopick_plugin.engine import geometry  # noqa: E402
from cryopick_plugin.engine.disca import yopo  # noqa: E402
from cryopick_plugin.engine.sim.ctf import ctf_1d  # noqa: E402
from cryopick_plugin.engine.sim.templates import load_templates  # noqa: E402
from cryopick_plugin.engine.sim.tomograms import AMPLITUDE_CONTRAST, CS_MM, VOLTAGE_KV, _paste  # noqa: E402


def forward_model(sim, bin_box=None):
    """The simulator's signal path for one orientation: f(class name, (rot, tilt, psi)) → normalised box
    (Fourier-cropped to `bin_box`³ when given, as the subtomograms are)."""
    box, vox = sim.stack.shape[-1], sim.meta['voxel_size']
    temps = load_templates(bench_disca.TEMPLATES, voxel_size=vox)
    half = box // 2 + 1
    freq = np.sqrt(np.square(np.fft.fftfreq(box, d=vox)).reshape(-1, 1, 1)
                   + np.square(np.fft.fftfreq(box, d=vox)).reshape(1, -1, 1)
                   + np.square(np.fft.rfftfreq(box, d=vox)).reshape(1, 1, -1))
    defoci = np.unique(sim.meta['defocus_um'])
    if len(defoci) != 1:
        raise SystemExit("the oracle assumes one defocus for the whole set")
    ctf = np.abs(ctf_1d(freq, float(defoci[0]), VOLTAGE_KV, CS_MM, AMPLITUDE_CONTRAST)).astype(np.float32)
    wedge = geometry.wedge_mask((box,) * 3, sim.meta['tilt_range'])[:, :, :half].astype(np.float32)
    filt = ctf * wedge

    def render(names, eulers):
        raw = np.zeros((len(names), box, box, box), np.float32)
        for j, (name, e) in enumerate(zip(names, eulers)):
            _paste(raw[j], geometry.particle_from_reference(temps[name], *e), (box // 2,) * 3)
        sig = -fft.irfftn(fft.rfftn(raw, axes=(1, 2, 3)) * filt, s=(box,) * 3, axes=(1, 2, 3))
        if bin_box:
            sig = yopo.bin_stack(sig, bin_box)
        flat = sig.reshape(len(names), -1)
        flat = (flat - flat.mean(axis=1, keepdims=True)) / flat.std(axis=1, keepdims=True)
        return flat.astype(np.float32)

    # The share of Fourier components the noise lives in (full spectrum, the wedge is symmetric).
    wedge_fraction = float(geometry.wedge_mask((box,) * 3, sim.meta['tilt_range']).mean())
    return render, wedge_fraction


def _scores(truth, predicted, k):
    return {'accuracy': round(float(accuracy_score(truth, predicted)), 4),
            'v_measure': round(float(v_measure_score(truth, predicted)), 4),
            'confusion': confusion_matrix(truth, predicted, labels=np.arange(k)).tolist()}


def oracle(sim, n_rotations, seed, chunk=250, bin_box=None, say=print):
    names = list(sim.class_names)
    k, n = len(names), len(sim.stack)
    snr = float(sim.meta['snr'])
    render, f = forward_model(sim, bin_box)
    x = (yopo.bin_stack(sim.stack, bin_box) if bin_box else sim.stack).reshape(n, -1).astype(np.float32)
    x = (x - x.mean(axis=1, keepdims=True)) / x.std(axis=1, keepdims=True)
    a = np.sqrt(snr / (1.0 + snr))
    scale = f * (1.0 + snr)

    def loglik(refs_flat):
        # (n, m): f(1+snr)(a⟨x, ŝ⟩ − a²‖ŝ‖²/2) for every subtomogram against every reference
        return scale * (a * (x @ refs_flat.T) - 0.5 * a * a * np.square(refs_flat).sum(axis=1)[None, :])

    t0 = time.time()
    # Known orientation: each subtomogram against every class at its own true orientation.
    known = np.empty((n, k), np.float32)
    for c, name in enumerate(names):
        for s in range(0, n, chunk):
            refs = render([name] * len(sim.eulers[s:s + chunk]), sim.eulers[s:s + chunk])
            known[s:s + chunk, c] = scale * (a * np.einsum('ij,ij->i', x[s:s + chunk], refs)
                                             - 0.5 * a * a * np.square(refs).sum(axis=1))
    say(f"  known orientation: {time.time() - t0:.0f} s")

    grid = geometry.random_eulers(n_rotations, np.random.default_rng(seed + 1000))
    lse = np.full((n, k), -np.inf)
    best = np.full((n, k), -np.inf)
    for c, name in enumerate(names):
        for s in range(0, n_rotations, chunk):
            ll = loglik(render([name] * len(grid[s:s + chunk]), grid[s:s + chunk])).astype(np.float64)
            best[:, c] = np.maximum(best[:, c], ll.max(axis=1))
            lse[:, c] = np.logaddexp(lse[:, c], np.logaddexp.reduce(ll, axis=1))
        say(f"  {name}: {n_rotations} orientations, {time.time() - t0:.0f} s")
    truth = sim.labels
    out = {'n': int(n), 'rotations': int(n_rotations), 'wedge_fraction': round(f, 4),
           'known_orientation': _scores(truth, known.argmax(axis=1), k),
           'marginal': _scores(truth, lse.argmax(axis=1), k),
           'best_match': _scores(truth, best.argmax(axis=1), k),
           'seconds': round(time.time() - t0, 1)}
    # How far the grid is from the truth: the log-likelihood at the true orientation minus the grid's best
    # for the true class (positive: the grid misses the peak).
    out['true_class_gap_median'] = round(float(np.median(known[np.arange(n), truth] - best[np.arange(n), truth])), 3)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', required=True)
    p.add_argument('--conditions', default='snr0.01_w40')
    p.add_argument('--n-per-class', type=int, default=200)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--box', type=int, default=32)
    p.add_argument('--rotations', default='4000', help="comma-separated grid sizes (random uniform over SO(3))")
    p.add_argument('--bin', type=int, default=0, help="Fourier-crop subtomograms and references to this box")
    p.add_argument('--threads', type=int, default=0, help="BLAS threads (0: leave as is)")
    args = p.parse_args(argv)
    if args.threads:
        os.environ['OMP_NUM_THREADS'] = str(args.threads)
    os.makedirs(args.out, exist_ok=True)
    for cond in args.conditions.split(','):
        snr, tilt = bench_disca.CONDITIONS[cond][:2]
        sim = bench_disca.simulate(args.n_per_class, snr, tilt, args.box, args.seed)
        for m in (int(v) for v in args.rotations.split(',')):
            print(f"{cond} seed {args.seed}, {m} orientations", flush=True)
            res = oracle(sim, m, args.seed, bin_box=args.bin or None)
            res.update({'condition': cond, 'seed': args.seed, 'bin': args.bin or None,
                        'class_names': list(sim.class_names)})
            print(json.dumps({kk: (v if kk in ('n', 'rotations', 'seconds', 'true_class_gap_median') else
                                   {q: w for q, w in v.items() if q != 'confusion'} if isinstance(v, dict) else v)
                              for kk, v in res.items() if kk != 'class_names'}), flush=True)
            path = os.path.join(args.out, f"{cond}_seed{args.seed}_r{m}{'_b%d' % args.bin if args.bin else ''}.json")
            with open(path, 'w') as fh:
                json.dump(res, fh, indent=1)


if __name__ == '__main__':
    main()
