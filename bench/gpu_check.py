"""GPU readiness in one call: every cryopick network trained and run on one CUDA device (≤ 8 minutes).

    bash bench/gpu_check.sh                    # a machine with a CUDA GPU: the full check
    bash bench/gpu_check.sh --cpu-smoke        # anywhere: the same stages at tiny sizes on the CPU

Stages (each on simulated data made on the spot, each timed with the device synchronised):

  bf16        autocast on the device: 3D and 2D convolutions and a linear layer give bf16 outputs that
              agree with fp32 (what every network below relies on when precision is bf16)
  pick3d      3D-ResUNet, paper preset: weak labels, a few hundred training steps (`train3d.train`,
              with a time budget as a guard), picking of a held-out tomogram; localisation and
              classification F1 against the truth, DoG's localisation F1 (threshold chosen on the
              validation tomogram) beside it
  disca       YOPO + Gaussian mixtures, paper preset, two EM iterations on simulated subtomograms of
              four classes; K found, V-measure, seconds per iteration
  cryosegnet  attention U-Net, paper preset, one training epoch, picking of held-out micrographs (U-Net
              path), then the Segment Anything path (the checkpoint in $CRYOPICK_SAM_CHECKPOINT, else a
              small randomly initialised SAM that exercises the same code on the device); F1
  deepcryopicker  the CNN classifier trained on one micrograph (unsupervised training set) and picking it

It prints, per stage: the device and precision the engine reported, the rates (training steps/s,
picking voxels or pixels per second, seconds per DISCA iteration), the scores reached, and ok / FAIL.
A JSON summary goes to --out/gpu_check.json.

Device checks. While a stage runs, a global forward pre-hook on every torch module checks that the
module's own parameters and buffers and every tensor it receives are on the expected device type; any
other device is a mismatch (a layer or a batch left on the CPU while the rest runs on the GPU, or a
whole network silently run on the CPU). A stage also fails when no module ran on the device at all, or
when the engine's own start line names another device. Under bf16 the share of convolution and linear
outputs that came out bf16 is printed (autocast really active). Any mismatch or error prints one line
starting 'FAIL <stage>:' and the exit status is 1 (0 when every stage is ok; 2 for bad options or no CUDA
device without --cpu-smoke). Scores under a sanity floor print a 'WARN' line (they depend on the data
made here; the exit status does not).

Status: written on a machine without a GPU. Only the --cpu-smoke path has been run (and is covered by
cryopick_plugin/tests/test_gpu_check.py); the CUDA path, its sizes and the 8-minute bound have not been
run on a GPU yet. Its first run on a GPU belongs in bench/README.md with the card and the figures.
"""
import argparse
import contextlib
import json
import logging
import os
import re
import sys
import tempfile
import time
import traceback

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BUDGET_S = 8 * 60

# Sizes of each stage: full (a GPU) and smoke (the CPU, seconds per stage).
SIZES = {
    'full': {
        'tomo_shape': (96, 192, 192), 'tomo_classes': ('4v4r', '3j9i', '4v94', '1bxn'), 'tomo_per_class': 12,
        'tomo_snr': 0.05, 'train3d': dict(preset='paper', epochs=6, max_steps_per_epoch=50, val_every=2,
                                           patience=10, time_budget=3.0),
        'disca_classes': ('4v4r', '3j9i', '4v94', '1bxn'), 'disca_per_class': 100, 'disca_box': 32,
        'disca': dict(preset='paper', k_range=(2, 6), max_iter=2, arch=None,
                      options={'refine_iter': 0, 'min_iter': 1}),
        'mic_shape': (1024, 1024), 'mic_count': 6, 'mic_particles': 80, 'mic_pixel': 5.0,
        'cryosegnet': dict(preset='paper', epochs=1, input_size=1024, crop_size=None),
        'sam_points': 16,
        'dcp_shape': (1024, 1024), 'dcp_particles': 250, 'dcp': dict(preset='cpu', per_class=300, epochs=5),
    },
    'smoke': {
        'tomo_shape': (32, 64, 64), 'tomo_classes': ('1bxn',), 'tomo_per_class': 6, 'tomo_snr': 0.5,
        'train3d': dict(preset='cpu', widths=(4, 8), patch=24, pad=4, batch_size=2, epochs=2,
                        max_steps_per_epoch=3, val_every=1, patience=10, time_budget=2.0),
        'disca_classes': ('1bxn', '3j9i'), 'disca_per_class': 15, 'disca_box': 24,
        'disca': dict(preset='cpu', k_range=(2, 2), max_iter=2,
                      arch={'widths': [4, 4, 6, 6, 8, 8, 10, 10, 12, 12], 'feature_dim': 16, 'box': None,
                            'dropout': 0.5, 'bn_momentum': 0.1, 'bn_eps': 1e-3},
                      options={'pca_dim': 4, 'batch_size': 8, 'min_per_cluster': 5, 'split_check': False,
                               'refine_iter': 0, 'min_iter': 1}),
        'mic_shape': (160, 160), 'mic_count': 3, 'mic_particles': 8, 'mic_pixel': 5.0,
        'cryosegnet': dict(preset={'base_width': 4, 'levels': 5}, epochs=1, input_size=128, crop_size=64),
        'sam_points': 4,
        'dcp_shape': (240, 240), 'dcp_particles': 18, 'dcp': dict(preset='cpu', per_class=40, epochs=1,
                                                                  self_training=0),
    },
}

# Sanity floors (WARN below): far under what the stage should reach, well over what a broken one does.
FLOORS = {'pick3d': 0.3, 'disca': 0.2, 'cryosegnet': 0.3, 'deepcryopicker': 0.2}


# ------------------------------------------------------------------------------------------ devices
class DeviceWatch:
    """Global torch module hooks checking devices (and counting bf16 outputs) while a stage runs.

    expected: the device type every module's parameters, buffers and tensor inputs must be on ('cuda' or
    'cpu'). After the `with` block: `mismatches` (list of str, at most 20 kept, `n_mismatches` counts
    all), `calls` (module calls seen by the device their parameters or inputs are on), `outputs` (dtype
    name -> count of convolution / linear outputs).
    """

    KEEP = 20

    def __init__(self, expected):
        self.expected = expected
        self.mismatches, self.n_mismatches = [], 0
        self.calls, self.outputs = {}, {}
        self._handles = []

    def _note(self, text):
        self.n_mismatches += 1
        if len(self.mismatches) < self.KEEP and text not in self.mismatches:
            self.mismatches.append(text)

    def _pre(self, module, args):
        import torch
        seen = set()
        for kind, items in (('parameter', module.named_parameters(recurse=False)),
                            ('buffer', module.named_buffers(recurse=False))):
            for name, tensor in items:
                if tensor is None:
                    continue
                seen.add(tensor.device.type)
                if tensor.device.type != self.expected:
                    self._note(f'{type(module).__name__} {kind} {name!r} on {tensor.device} '
                               f'(expected {self.expected})')
        for i, arg in enumerate(args):
            if isinstance(arg, torch.Tensor):
                seen.add(arg.device.type)
                if arg.device.type != self.expected:
                    self._note(f'{type(module).__name__} input {i} on {arg.device} (expected {self.expected})')
        for device in seen:
            self.calls[device] = self.calls.get(device, 0) + 1

    def _post(self, module, args, output):
        import torch
        weight = getattr(module, 'weight', None)
        if isinstance(output, torch.Tensor) and isinstance(weight, torch.Tensor) and weight.dim() >= 2:
            name = str(output.dtype).replace('torch.', '')
            self.outputs[name] = self.outputs.get(name, 0) + 1

    def __enter__(self):
        from torch.nn.modules import module as tm
        self._handles = [tm.register_module_forward_pre_hook(self._pre), tm.register_module_forward_hook(self._post)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False

    def problems(self):
        """Lines describing what went wrong (empty when the stage ran where expected)."""
        out = [f'device mismatch: {m}' for m in self.mismatches]
        if self.n_mismatches > len(self.mismatches):
            out.append(f'device mismatch: {self.n_mismatches - len(self.mismatches)} more')
        if not self.calls.get(self.expected):
            out.append(f'no network module ran on {self.expected}')
        return out

    def bf16_share(self):
        total = sum(self.outputs.values())
        return self.outputs.get('bfloat16', 0) / total if total else 0.0


class EngineLines(logging.Handler):
    """Collects the engine's log lines (its start line names the device and precision)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        try:
            self.lines.append(record.getMessage())
        except Exception:  # a malformed record must not break the check
            pass

    def add(self, item):
        if isinstance(item, str):
            self.lines.append(item)


DEVICE_LINE = re.compile(r'\bdevice (cuda(?::\d+)?|cpu|mps|xpu)\b')
PRECISION_LINE = re.compile(r'\bprecision (fp32|bf16)\b')


def reported_devices(lines):
    """Device types named by the engine's 'device X' phrases."""
    return sorted({m.group(1).split(':')[0] for line in lines for m in DEVICE_LINE.finditer(line)})


def sync(device):
    import torch
    if str(device).startswith('cuda'):
        torch.cuda.synchronize()


class Timer:
    def __init__(self, device):
        self.device = device

    def __enter__(self):
        sync(self.device)
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self.t
        return False


# ------------------------------------------------------------------------------------------- stages
def stage_bf16(ctx):
    """Autocast to bf16 on the device: convolution / linear outputs are bf16 and agree with fp32."""
    import torch
    from cryopick_plugin.engine.settings import autocast
    dev = ctx['device']
    torch.manual_seed(0)
    layers = [(torch.nn.Conv3d(8, 8, 3, padding=1), (2, 8, 24, 24, 24)),
              (torch.nn.Conv2d(8, 16, 3, padding=1), (2, 8, 64, 64)),
              (torch.nn.Linear(64, 32), (16, 64))]
    worst, dtypes = 0.0, []
    for layer, shape in layers:
        layer = layer.to(dev)
        x = torch.randn(*shape, device=dev)
        with torch.no_grad():
            ref = layer(x)
            with autocast(dev, 'bf16'):
                low = layer(x)
        dtypes.append(str(low.dtype).replace('torch.', ''))
        worst = max(worst, float((low.float() - ref).abs().max() / ref.abs().max()))
    result = {'output_dtypes': dtypes, 'max_rel_error': worst}
    if torch.cuda.is_available():
        result['cuda_bf16_supported'] = bool(torch.cuda.is_bf16_supported())
    if any(d != 'bfloat16' for d in dtypes):
        raise RuntimeError(f'autocast gave {dtypes} outputs, expected bfloat16')
    if not worst < 0.05:
        raise RuntimeError(f'bf16 outputs differ from fp32 by {worst:.3g} of the largest value')
    return result, {}


def _simulate_tomograms(ctx, folder):
    from cryopick_plugin.engine.sim.tomograms import simulate_tomogram, write_simulated_tomogram
    s = ctx['sizes']
    paths = []
    for i, seed in enumerate((201, 202, 203)):   # train, validation, test
        sim = simulate_tomogram(shape=s['tomo_shape'], classes=s['tomo_classes'], n_per_class=s['tomo_per_class'],
                                snr=s['tomo_snr'], seed=seed, name=f'tomo_{i}', templates_dir=ctx['templates'],
                                synthetic=ctx['templates'] is None)
        written = write_simulated_tomogram(sim, folder)
        paths.append((written['tomogram'], sim.truth, sim.meta))
    return paths


def stage_pick3d(ctx):
    from cryopick_plugin.engine import evaluate
    from cryopick_plugin.engine.disca import dog
    from cryopick_plugin.engine.io import mrc, star
    from cryopick_plugin.engine.pick3d import labels, picking as pick3d, training as train3d
    dev, s = ctx['device'], ctx['sizes']
    folder = os.path.join(ctx['out'], 'pick3d')
    os.makedirs(folder, exist_ok=True)
    t0 = time.perf_counter()
    tomos = _simulate_tomograms(ctx, folder)
    simulate_s = time.perf_counter() - t0
    diam = {int(c): int(d) for c, d in enumerate(
        (tomos[0][2]['diameters_vox'][n] for n in s['tomo_classes']), start=1)}
    label_d = {c: max(3, int(round(d / 2)) | 1) for c, d in diam.items()}   # about half the particle, odd
    items = []
    for path, truth, _ in tomos:
        lab = path.replace('.mrc', '_labels.mrc')
        labels.write_label_map(lab, mrc.open_volume(path)[0].shape, truth, label_d, 'tball', 10.0)
        items.append((path, lab, truth))
    model = os.path.join(folder, 'model.pt')
    kw = dict(s['train3d'])
    with Timer(dev) as t_train:
        meta = train3d.train([items[0]], [items[1]], model, device=dev, precision=ctx['precision'], seed=0,
                             log=ctx['engine'].add, resume=False, **kw)
    steps = int(meta.get('steps_run') or 0)
    test_path, test_truth, _ = tomos[2]
    shape = mrc.open_volume(test_path)[0].shape
    with Timer(dev) as t_pick:
        picks = pick3d.pick(test_path, model, device=dev, precision=ctx['precision'])
    radius = {c: max(2.0, d / 4.0) for c, d in diam.items()}
    scores = evaluate.evaluate_picks(picks, test_truth, radius)
    val_vol = np.asarray(mrc.open_volume(items[1][0])[0])
    median_d = float(np.median(list(diam.values())))
    threshold = dog.choose_threshold(dog.dog_pick(val_vol, median_d, 'dark'), items[1][2], float(min(radius.values())))
    test_vol = np.asarray(mrc.open_volume(test_path)[0])
    base = evaluate.evaluate_picks(dog.dog_pick(test_vol, median_d, 'dark', threshold=threshold), test_truth, radius,
                                   with_classes=False)
    result = {'precision': meta.get('precision'), 'preset': kw['preset'], 'steps': steps,
              'train_s': t_train.seconds, 'steps_per_s': steps / t_train.seconds if t_train.seconds else 0.0,
              'stop_reason': meta.get('stop_reason'), 'best_epoch': meta.get('best_epoch'),
              'pick_s': t_pick.seconds, 'pick_voxels_per_s': float(np.prod(shape)) / t_pick.seconds,
              'simulate_s': simulate_s, 'n_picks': int(len(picks)),
              'localisation_f1': scores['localisation']['f1'],
              'classification_f1': scores['classification']['f1'], 'dog_localisation_f1': base['localisation']['f1']}
    if steps < 1:
        raise RuntimeError('training ran no step')
    return result, {'score': result['localisation_f1']}


def stage_disca(ctx):
    import torch
    from cryopick_plugin.engine import evaluate
    from cryopick_plugin.engine.disca import em
    from cryopick_plugin.engine.sim.subtomograms import simulate_subtomograms
    dev, s = ctx['device'], ctx['sizes']
    t0 = time.perf_counter()
    sim = simulate_subtomograms(classes=s['disca_classes'], n_per_class=s['disca_per_class'], box=s['disca_box'],
                                snr=0.1, seed=0, templates_dir=ctx['templates'], synthetic=ctx['templates'] is None)
    simulate_s = time.perf_counter() - t0
    kw = dict(s['disca'])
    options = dict(kw.pop('options'), precision=ctx['precision'])
    torch.manual_seed(0)
    with Timer(dev) as t_run:
        result = em.disca_cluster(sim.stack, seed=0, device=dev, log=ctx['engine'].add,
                                  out_dir=os.path.join(ctx['out'], 'disca'), options=options, **kw)
    scores = evaluate.clustering_scores(sim.labels, result.labels)
    per_iter = [h.get('time_s') for h in result.history if h.get('time_s') is not None]
    out = {'n': int(len(sim.stack)), 'box': s['disca_box'], 'preset': kw['preset'], 'iterations': len(result.history),
           'k': int(result.k), 'true_k': len(s['disca_classes']), 'v_measure': scores['v_measure'],
           'accuracy': scores['accuracy'], 'run_s': t_run.seconds,
           's_per_iteration': float(np.mean(per_iter)) if per_iter else t_run.seconds / max(1, len(result.history)),
           'simulate_s': simulate_s}
    return out, {'score': out['v_measure']}


def _tiny_sam(dim=32, img_size=128):
    """A small Segment Anything, randomly initialised: the same modules and mask generator as a real one."""
    from functools import partial
    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
    torch.manual_seed(0)
    grid = img_size // 16
    return Sam(
        image_encoder=ImageEncoderViT(img_size=img_size, patch_size=16, in_chans=3, embed_dim=dim, depth=1,
                                      num_heads=2, mlp_ratio=2, out_chans=dim, qkv_bias=True,
                                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=False,
                                      window_size=0, global_attn_indexes=()),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(grid, grid),
                                     input_image_size=(img_size, img_size), mask_in_chans=4),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=dim,
                                 transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2),
                                 iou_head_depth=1, iou_head_hidden_dim=16)).eval()


def _micrographs(ctx, count, shape, seed0, n_particles):
    from cryopick_plugin.engine.sim.micrographs import simulate_micrograph
    s = ctx['sizes']
    out = []
    for i in range(count):
        out.append(simulate_micrograph(shape=shape, template='1bxn', n_particles=n_particles,
                                       pixel_size=s['mic_pixel'], snr=1.0, seed=seed0 + i, name=f'mic_{i:03d}',
                                       templates_dir=ctx['templates'], synthetic=ctx['templates'] is None,
                                       carbon_edge=False, contamination=False))
    return out


def _f1(picks, truth, radius):
    from cryopick_plugin.engine.evaluate import match_points
    from cryopick_plugin.engine.io import star
    xy = star.xyz_array(picks)[:, :2] if len(picks) else np.zeros((0, 2))
    t = star.xyz_array(truth)[:, :2]
    pairs, _ = match_points(xy, t, radius)
    return 2 * len(pairs) / max(len(xy) + len(t), 1)


def _diameter_px(sim):
    return float(sim.meta['particle_diameter_px'])


def stage_cryosegnet(ctx):
    from cryopick_plugin.engine.pick2d.cryosegnet import picker as cs
    dev, s = ctx['device'], ctx['sizes']
    t0 = time.perf_counter()
    mics = _micrographs(ctx, s['mic_count'], s['mic_shape'], 300, s['mic_particles'])
    simulate_s = time.perf_counter() - t0
    train, test = mics[:-2], mics[-2:]
    d = _diameter_px(mics[0])
    model = os.path.join(ctx['out'], 'cryosegnet.pt')
    kw = dict(s['cryosegnet'])
    with Timer(dev) as t_train:
        history = cs.train_cryosegnet([m.image for m in train], [m.truth[['rlnCoordinateX', 'rlnCoordinateY']].to_numpy()
                                                                for m in train], d, model, device=dev, seed=0,
                                      val_fraction=0.25, log=ctx['engine'].add, resume=False, **kw)
    loaded = cs.load_cryosegnet(model, dev)
    f1s = []
    with Timer(dev) as t_pick:
        for m in test:
            picks, diag = cs.cryosegnet_pick(m.image, loaded, device=dev)
            f1s.append(_f1(picks, m.truth, d / 2))
    sam_checkpoint = os.environ.get('CRYOPICK_SAM_CHECKPOINT')
    if sam_checkpoint and os.path.exists(sam_checkpoint):
        from cryopick_plugin.engine.pick2d.cryosegnet.sam import load_sam
        sam, sam_kind, filters = load_sam(sam_checkpoint, device=dev), 'checkpoint', {}
    else:
        # random weights give arbitrary IoU predictions: the filters are opened to run the whole wiring
        sam, sam_kind = _tiny_sam().to(dev), 'small random (no checkpoint)'
        filters = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, iou_filter=-np.inf)
    with Timer(dev) as t_sam:
        sam_picks, sam_diag = cs.cryosegnet_pick(test[0].image, loaded, sam_model=sam, device=dev,
                                                 points_per_side=s['sam_points'], **filters)
    out = {'preset': kw['preset'] if isinstance(kw['preset'], str) else 'tiny', 'input_size': kw['input_size'],
           'epochs': len(history) - 1, 'train_s': t_train.seconds,
           's_per_epoch': t_train.seconds / max(1, len(history) - 1),
           'best_val_dice': max((r.get('val_dice') or 0.0) for r in history),
           'pick_s_per_micrograph': t_pick.seconds / len(test), 'unet_f1': float(np.mean(f1s)),
           'sam': sam_kind, 'sam_s': t_sam.seconds, 'sam_masks': sam_diag.get('n_masks'),
           'sam_picks': int(len(sam_picks)), 'diameter_px': d, 'simulate_s': simulate_s}
    if sam_diag.get('path') != 'sam':
        raise RuntimeError('the Segment Anything path did not run')
    return out, {'score': out['unet_f1']}


def _disk_micrograph(shape, n, d, noise, seed):
    """Dark blurred disks of diameter d in Gaussian noise; returns (image, truth table). DeepCryoPicker's
    intensity clustering needs clearer particles than the simulator's single micrographs give."""
    import cv2
    from cryopick_plugin.engine.io import star
    rng = np.random.default_rng(seed)
    pts = []
    for _ in range(20000):
        if len(pts) == n:
            break
        p = rng.uniform(d, np.array(shape[::-1]) - d)
        if all(np.hypot(*(p - q)) > 1.4 * d for q in pts):
            pts.append(p)
    img = np.zeros(shape, np.float32)
    for x, y in pts:
        cv2.circle(img, (int(round(x)), int(round(y))), d // 2, 1.0, -1)
    img = cv2.GaussianBlur(img, (0, 0), 1.5)
    image = (-img + rng.normal(0, noise, shape)).astype(np.float32)
    return image, star.coordinates_frame(np.array(pts), 'disks', micrograph=True)


def stage_deepcryopicker(ctx):
    from cryopick_plugin.engine.pick2d.deepcryopicker import picker as dcp
    dev, s = ctx['device'], ctx['sizes']
    d = 24
    image, truth = _disk_micrograph(s['dcp_shape'], s['dcp_particles'], d, 0.5, 400)
    kw = dict(s['dcp'])
    with Timer(dev) as t_run:
        picks, model, diag = dcp.deepcryopicker_pick(image, d, device=dev, seed=0, log=ctx['engine'].add, **kw)
    times = diag.get('times') or {}
    out = {'preset': kw['preset'], 'run_s': t_run.seconds, 'times': {k: round(v, 2) for k, v in times.items()},
           'n_picks': int(len(picks)), 'f1': _f1(picks, truth, d / 2), 'diameter_px': d}
    net = getattr(model, 'net', None)
    if net is not None:
        where = sorted({p.device.type for p in net.parameters()})
        out['model_on'] = where
        if where != [ctx['device_type']]:
            raise RuntimeError(f'the trained classifier lives on {where}, expected {ctx["device_type"]}')
    return out, {'score': out['f1']}


STAGES = [('bf16', stage_bf16), ('pick3d', stage_pick3d), ('disca', stage_disca),
          ('cryosegnet', stage_cryosegnet), ('deepcryopicker', stage_deepcryopicker)]


# --------------------------------------------------------------------------------------------- main
def _fmt(value):
    if isinstance(value, float):
        return f'{value:.3g}'
    return str(value)


def run_stage(name, fn, ctx, say):
    """Run one stage under the device watch; returns its summary dict (status 'ok' or 'FAIL')."""
    ctx['engine'] = EngineLines()
    root = logging.getLogger('cryopick_plugin')
    root.addHandler(ctx['engine'])
    old_level = root.level
    root.setLevel(logging.INFO)
    say(f'--- {name}')
    summary = {'stage': name}
    try:
        with DeviceWatch(ctx['device_type']) as watch, Timer(ctx['device']) as clock:
            result, extra = fn(ctx)
        summary.update(result)
        problems = watch.problems()
        named = reported_devices(ctx['engine'].lines)
        summary['engine_reported'] = named
        if named and named != [ctx['device_type']]:
            problems.append(f"the engine reported device {', '.join(named)}, expected {ctx['device_type']}")
        summary['module_calls'] = watch.calls
        summary['conv_linear_outputs'] = watch.outputs
        precisions = sorted({m.group(1) for line in ctx['engine'].lines for m in PRECISION_LINE.finditer(line)})
        summary['engine_precision'] = precisions
        if 'bf16' in precisions:
            summary['bf16_output_share'] = watch.bf16_share()
        summary['seconds'] = clock.seconds
        summary['status'] = 'FAIL' if problems else 'ok'
        summary['problems'] = problems
        warnings = summary['warnings'] = []
        share = summary.get('bf16_output_share')
        if share is not None and watch.outputs and share < 0.5:
            warnings.append(f'precision bf16, but only {share:.0%} of the convolution / linear outputs '
                            f'were bf16 (autocast not active around this network)')
        floor = None if ctx['smoke'] else FLOORS.get(name)
        if floor is not None and extra.get('score') is not None and extra['score'] < floor:
            warnings.append(f'score {extra["score"]:.3f} under the sanity floor {floor}')
    except Exception as exc:   # every stage runs; the failure is reported and decides the exit status
        summary.update(status='FAIL', problems=[f'{type(exc).__name__}: {exc}'],
                       traceback=traceback.format_exc(limit=8))
        say(summary['traceback'].rstrip())
    finally:
        root.removeHandler(ctx['engine'])
        root.setLevel(old_level)
    shown = {k: v for k, v in summary.items() if k not in ('stage', 'status', 'problems', 'traceback', 'warnings')}
    say(f"{name}: " + ', '.join(f'{k} {_fmt(v)}' for k, v in shown.items()))
    for line in ctx['engine'].lines[:1]:
        say(f'{name}: engine: {line}')
    for problem in summary['problems']:
        say(f'FAIL {name}: {problem}')
    for warning in summary.get('warnings', []):
        say(f'WARN {name}: {warning}')
    say(f"{name}: {summary['status']}")
    return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--cpu-smoke', action='store_true',
                   help='run every stage at tiny sizes on the CPU (no GPU needed; what the test runs)')
    p.add_argument('--device', default=None, help="CUDA device for the full check (default 'cuda')")
    p.add_argument('--precision', default='auto', choices=('auto', 'fp32', 'bf16'),
                   help='network arithmetic (default auto: bf16 where the device has it natively)')
    p.add_argument('--stages', nargs='+', choices=[n for n, _ in STAGES], default=None,
                   help='run only these stages (default all)')
    p.add_argument('--out', default=None, help='work folder (default a new temporary folder, kept)')
    p.add_argument('--threads', type=int, default=None, help='CPU threads for torch (default torch\'s own)')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch
    from cryopick_plugin.engine.settings import default_templates_dir, resolve_precision
    say = lambda line: print(line, flush=True)  # noqa: E731
    if args.cpu_smoke:
        device = 'cpu'
    else:
        device = args.device or 'cuda'
        if not device.startswith('cuda'):
            say(f'gpu_check: --device {device} is not a CUDA device; use --cpu-smoke for the CPU')
            return 2
        if not torch.cuda.is_available():
            say('gpu_check: no CUDA device is available here (torch.cuda.is_available() is False); '
                'run with --cpu-smoke for the tiny CPU version')
            return 2
        torch.cuda.set_device(torch.device(device))
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = resolve_precision(args.precision, device)
    out = args.out or tempfile.mkdtemp(prefix='cryopick-gpu-check-')
    os.makedirs(out, exist_ok=True)
    templates = default_templates_dir()
    if templates and not os.path.isdir(templates):
        templates = None
    ctx = {'device': device, 'device_type': device.split(':')[0], 'precision': args.precision,
           'precision_resolved': precision, 'smoke': args.cpu_smoke, 'sizes': SIZES['smoke' if args.cpu_smoke else 'full'],
           'out': out, 'templates': templates}
    if device.startswith('cuda'):
        props = torch.cuda.get_device_properties(torch.device(device))
        where = (f'{device} ({props.name}, {props.total_memory / 2 ** 30:.0f} GiB, compute capability '
                 f'{props.major}.{props.minor}, bf16 {"yes" if torch.cuda.is_bf16_supported() else "no"})')
    else:
        n = torch.get_num_threads()
        where = f'cpu ({n} thread{"s" if n != 1 else ""}, torch CPU capability {torch.backends.cpu.get_cpu_capability()})'
    say(f"gpu_check: {'CPU smoke run (tiny sizes)' if args.cpu_smoke else 'full check'} on {where}")
    say(f'gpu_check: torch {torch.__version__}, CUDA build {torch.version.cuda}, precision {precision} '
        f'(asked {args.precision}); templates {templates or "synthetic (no density maps found)"}; work folder {out}')
    t0 = time.perf_counter()
    results = []
    for name, fn in STAGES:
        if args.stages and name not in args.stages:
            continue
        results.append(run_stage(name, fn, ctx, say))
    total = time.perf_counter() - t0
    failed = [r['stage'] for r in results if r['status'] != 'ok']
    summary = {'device': where, 'precision': precision, 'cpu_smoke': args.cpu_smoke, 'total_s': total,
               'stages': results, 'failed': failed, 'torch': torch.__version__}
    if device.startswith('cuda'):
        summary['peak_memory_gib'] = torch.cuda.max_memory_allocated() / 2 ** 30
    with open(os.path.join(out, 'gpu_check.json'), 'w') as fh:
        json.dump(summary, fh, indent=1, default=str)
    say('--- summary')
    for r in results:
        say(f"{r['stage']:<15} {r['status']:<4} {r.get('seconds', float('nan')):7.1f} s")
    if not args.cpu_smoke and total > BUDGET_S:
        say(f'WARN gpu_check: took {total:.0f} s, more than the {BUDGET_S} s it should take on one GPU')
    say(f"gpu_check: {'FAILED: ' + ', '.join(failed) if failed else 'all stages ok'} in {total:.1f} s "
        f"(device {device}, precision {precision}); summary {os.path.join(out, 'gpu_check.json')}")
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
