"""Time of CryoSegNet's Segment Anything stage per micrograph on this machine, without SAM weights.

No Segment Anything checkpoint can be downloaded here, so this builds the published architectures
(`segment_anything.sam_model_registry`: vit_b, vit_l, vit_h) with random weights. Their arithmetic is the
same as the trained models': the image encoder on the 1024² input and the mask decoder on every prompt
of the points-per-side grid cost what they cost with real weights. What depends on the weights is the
number of masks that pass the generator's IoU and stability filters, hence the mask post-processing
(RLE, box NMS) and CryoSegNet's filtering, which are timed too but are a lower bound here.

Stages, per micrograph (the U-Net probability map of a 4096² β-gal micrograph stand-in: the expert mask
of one β-gal micrograph, blurred, when ../shared/data is present; else random discs):
  encoder    SamPredictor.set_image on the 1024² three-channel map (the ViT)
  generator  SamAutomaticMaskGenerator.generate (encoder again + decoder on points_per_side² prompts,
             mask filtering and NMS); decoder ≈ generator − encoder
  filter     CryoSegNet's IoU / modal-size filter on the records (`sam_picking.filter_sam_records`)

Usage:
  .venv/bin/python bench/bench_sam_time.py [--types vit_b vit_h] [--points-per-side 32] [--threads 2]
      [--json bench/results/sam_time.json]
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cryopick_plugin.engine.pick2d.cryosegnet import sam as sam_picking  # noqa: E402


def probability_map(size=4096, seed=0):
    """A U-Net-like probability map: an expert β-gal mask (blurred) or, without the data, random discs."""
    import cv2
    try:
        from cryopick_plugin.engine.pick2d import betagal
        record = betagal.load_betagal()[0]
        mask = cv2.imread(record.mask, cv2.IMREAD_GRAYSCALE)
        prob = (mask >= 128).astype(np.float32)
        source = f'expert mask {os.path.basename(record.mask)}'
    except Exception:  # no shared data: random discs of the β-gal size
        rng = np.random.default_rng(seed)
        prob = np.zeros((size, size), np.float32)
        for x, y in rng.uniform(60, size - 60, (600, 2)):
            cv2.circle(prob, (int(x), int(y)), 54, 1.0, -1)
        source = 'random discs'
    return cv2.GaussianBlur(prob, (0, 0), 6), source


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--types', nargs='+', default=['vit_b', 'vit_h'], choices=sam_picking.SAM_TYPES)
    ap.add_argument('--points-per-side', type=int, default=32)
    ap.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s own)')
    ap.add_argument('--json')
    args = ap.parse_args()
    import torch
    from segment_anything import SamPredictor, sam_model_registry
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    prob, source = probability_map()
    out = {'map': source, 'map_shape': list(prob.shape), 'points_per_side': args.points_per_side,
           'torch_threads': torch.get_num_threads(), 'weights': 'random (architecture only)', 'types': {}}
    for kind in args.types:
        t = time.perf_counter()
        sam = sam_model_registry[kind]().eval()
        build = time.perf_counter() - t
        img, _ = sam_picking.sam_input(prob, int(sam.image_encoder.img_size))
        with torch.no_grad():
            t = time.perf_counter()
            SamPredictor(sam).set_image(img)
            encoder = time.perf_counter() - t
            t = time.perf_counter()
            records, scale = sam_picking.sam_masks(prob, sam, points_per_side=args.points_per_side)
            generator = time.perf_counter() - t
        t = time.perf_counter()
        picks = sam_picking.filter_sam_records(records, scale, 108.0)
        filt = time.perf_counter() - t
        row = {'parameters_M': round(sum(p.numel() for p in sam.parameters()) / 1e6, 1),
               'build_s': round(build, 2), 'encoder_s': round(encoder, 2), 'generator_s': round(generator, 2),
               'decoder_and_masks_s': round(generator - encoder, 2), 'filter_s': round(filt, 3),
               'masks': len(records), 'picks': len(picks)}
        out['types'][kind] = row
        print(kind, json.dumps(row), flush=True)
        del sam
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, 'w') as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
