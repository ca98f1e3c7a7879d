"""CryoSegNet's Segment Anything post-processing of the U-Net probability map.

1. The map is scaled (area averaging, aspect ratio kept) so its longer side is SAM's input size (1024 for
   the published models; CryoSegNet also ran SAM on the 1024² map), min–max scaled to uint8 and stacked
   into three channels.
2. `SamAutomaticMaskGenerator` with segment-anything's defaults (32×32 point grid, pred_iou_thresh 0.88,
   stability_score_thresh 0.95, box NMS 0.7, no crops) proposes masks.
3. `filter_sam_records`: keep masks whose predicted IoU exceeds `iou_filter` (0.94); take the modal box
   width and height (w_m, h_m); with r = ½·√(w_m² + h_m²) and t = size_factor·r keep boxes with
   w_m − t/3 < w < w_m + t and the same for h. All in the SAM frame: CryoSegNet computed t in original
   pixels and compared it with widths in the 1024 frame (a four times wider window on 4k micrographs).
4. Each pick's score (rlnAutopickFigureOfMerit) is the predicted IoU that step 3 compared with
   `iou_filter`, so every written pick has a score above it and filtering a STAR file at `iou_filter`
   keeps all of them.
5. Box centres are mapped back to the micrograph's pixels. Unlike CryoSegNet, no second, randomly
   jittered pick is added for masks with IoU > 0.9999, and the written diameter is the modal box side
   (CryoSegNet wrote its diagonal, √2 too large).

Boxes follow segment-anything's convention: (x0, y0, w, h) with w = x1 − x0 where x1 is the last column
of the mask (inclusive), so the box centre column is x0 + w/2.
"""
import os

import numpy as np

from ..picks import check_diameter, picks_frame
from ...errors import InputError

SAM_TYPES = ('vit_b', 'vit_l', 'vit_h')
_EMBED_KEY = 'image_encoder.patch_embed.proj.weight'
_TYPE_BY_EMBED_DIM = {768: 'vit_b', 1024: 'vit_l', 1280: 'vit_h'}
_EXPECTED = "expected a Segment Anything checkpoint of type vit_b, vit_l or vit_h (e.g. sam_vit_h_4b8939.pth)"


def load_sam(checkpoint_path, model_type=None, device='cpu'):
    """A Sam model from a checkpoint; the type (vit_b/vit_l/vit_h) is read from the weights' shapes when
    `model_type` is None. InputError naming the file for a missing, unreadable or foreign checkpoint."""
    import torch
    from segment_anything import sam_model_registry
    path = os.fspath(checkpoint_path)
    if model_type is not None and model_type not in SAM_TYPES:
        raise InputError('sam type', f"unknown SAM model type {model_type!r}; choose from {', '.join(SAM_TYPES)}")
    if not os.path.isfile(path):
        raise InputError(path, f"SAM checkpoint not found; {_EXPECTED}")
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:
        raise InputError(path, f"not a readable SAM checkpoint ({type(exc).__name__}); {_EXPECTED}") from None
    if isinstance(state, dict) and _EMBED_KEY not in state:
        for key in ('model', 'state_dict'):
            if isinstance(state.get(key), dict) and _EMBED_KEY in state[key]:
                state = state[key]
                break
    if not isinstance(state, dict) or _EMBED_KEY not in state or not hasattr(state[_EMBED_KEY], 'shape'):
        raise InputError(path, f"holds no Segment Anything image encoder weights; {_EXPECTED}")
    inferred = _TYPE_BY_EMBED_DIM.get(int(state[_EMBED_KEY].shape[0]))
    if inferred is None:
        raise InputError(path, f"image encoder width {int(state[_EMBED_KEY].shape[0])} matches no published "
                               f"SAM model; {_EXPECTED}")
    if model_type is not None and model_type != inferred:
        raise InputError(path, f"is a {inferred} checkpoint, not {model_type}")
    sam = sam_model_registry[inferred]()
    try:
        sam.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else 'mismatch'
        raise InputError(path, f"weights do not fit a {inferred} model ({first}); {_EXPECTED}") from None
    return sam.to(device).eval()


def sam_input(prob, side):
    """The uint8 three-channel image SAM sees and the (sy, sx) scales from the map to it."""
    import cv2
    prob = np.asarray(prob, dtype=np.float32)
    H, W = prob.shape
    s = side / max(H, W)
    h, w = max(1, int(round(H * s))), max(1, int(round(W * s)))
    small = cv2.resize(prob, (w, h), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    lo, hi = float(small.min()), float(small.max())
    scaled = np.zeros_like(small) if hi <= lo else (small - lo) / (hi - lo)
    img = np.round(scaled * 255).astype(np.uint8)
    return np.repeat(img[:, :, None], 3, axis=2), (h / H, w / W)


def sam_masks(prob, sam_model, points_per_side=32, pred_iou_thresh=0.88, stability_score_thresh=0.95,
              points_per_batch=64):
    """Mask records (bbox, predicted_iou, ...) of SamAutomaticMaskGenerator on the map, and the scales.

    Masks are kept run-length encoded: only their boxes and scores are used.
    """
    from segment_anything import SamAutomaticMaskGenerator
    img, scale = sam_input(prob, int(sam_model.image_encoder.img_size))
    generator = SamAutomaticMaskGenerator(sam_model, points_per_side=int(points_per_side),
                                          points_per_batch=int(points_per_batch),
                                          pred_iou_thresh=float(pred_iou_thresh),
                                          stability_score_thresh=float(stability_score_thresh),
                                          output_mode='uncompressed_rle')
    return generator.generate(img), scale


def _modal(values, expected=None):
    """Most frequent integer value; ties go to the value nearest `expected`, else to the smallest."""
    vals, counts = np.unique(np.round(values).astype(int), return_counts=True)
    tied = vals[counts == counts.max()]
    if expected is not None and len(tied) > 1:
        return int(tied[np.argmin(np.abs(tied - expected))])
    return int(tied[0])


def filter_sam_records(records, scale=(1.0, 1.0), diameter_px=None, iou_filter=0.94, size_factor=0.2):
    """CryoSegNet's selection of SAM masks, with consistent units (see the module docstring).

    records   dicts with 'bbox' (x0, y0, w, h in the SAM frame, segment-anything's convention) and
              'predicted_iou'.
    scale     (sy, sx): SAM-frame pixels per micrograph pixel.
    diameter_px  expected diameter in micrograph pixels; only breaks ties between equally frequent sizes.
    Returns a picks DataFrame (rlnCoordinateX/Y in micrograph pixels, rlnAutopickFigureOfMerit =
    predicted IoU, rlnDiameter = modal box side in micrograph pixels), highest score first.
    """
    sy, sx = float(scale[0]), float(scale[1])
    kept = [r for r in records if float(r['predicted_iou']) > iou_filter]
    if not kept:
        return picks_frame(np.zeros((0, 2)), [], np.nan)
    boxes = np.array([r['bbox'] for r in kept], dtype=float).reshape(-1, 4)
    ious = np.array([float(r['predicted_iou']) for r in kept])
    w, h = boxes[:, 2], boxes[:, 3]
    expected_w = expected_h = None
    if diameter_px is not None:
        # a box of a d-pixel disk spans d pixels, i.e. w = d - 1 in SAM's convention
        expected_w, expected_h = diameter_px * sx - 1, diameter_px * sy - 1
    w_m, h_m = _modal(w, expected_w), _modal(h, expected_h)
    t = size_factor * 0.5 * np.hypot(w_m, h_m)
    ok = (w > w_m - t / 3) & (w < w_m + t) & (h > h_m - t / 3) & (h < h_m + t)
    boxes, ious = boxes[ok], ious[ok]
    xy = np.stack([(boxes[:, 0] + boxes[:, 2] / 2 + 0.5) / sx - 0.5,
                   (boxes[:, 1] + boxes[:, 3] / 2 + 0.5) / sy - 0.5], axis=1)
    diameter = 0.5 * ((w_m + 1) / sx + (h_m + 1) / sy)
    order = np.argsort(-ious, kind='stable')
    return picks_frame(xy[order], ious[order], diameter)


def picks_with_sam(prob, sam_model, diameter_px, points_per_side=32, pred_iou_thresh=0.88,
                   stability_score_thresh=0.95, iou_filter=0.94, size_factor=0.2, return_count=False):
    """CryoSegNet's picking: SAM masks on the U-Net map, filtered by IoU and modal size.

    prob is the probability map at the micrograph's size; coordinates come back in its pixels.
    Returns the picks DataFrame (and the number of SAM masks before filtering when return_count).
    """
    prob = np.asarray(prob, dtype=np.float32)
    d = check_diameter(diameter_px, prob.shape)
    records, scale = sam_masks(prob, sam_model, points_per_side, pred_iou_thresh, stability_score_thresh)
    picks = filter_sam_records(records, scale, d, iou_filter=iou_filter, size_factor=size_factor)
    return (picks, len(records)) if return_count else picks
