"""Synthetic datasets whose classes can only be told apart with context.

Every image holds a few identically textured blobs (black/white stripes at a random angle) on a
smooth, low-saturation background. A blob's class is decided by the colour of the thin ring drawn
*around* it (red, green or blue), so a pixel in the blob's interior cannot be classified from its
own neighbourhood: the model has to look several pixels away, past the blob's edge.

Two on-disk layouts are written:

* :func:`make_seg_dataset`: ADE20K layout (``images/{training,validation}/*.jpg``,
  ``annotations/{training,validation}/*.png``) with ADE20K's ``reduce_zero_label`` semantics:
  PNG value 0 is "unlabelled" and ignored, value ``v >= 1`` is class ``v - 1`` (1 = background,
  2.. = the blob classes). By default a ring belongs to its blob (``ring_label='object'``): the
  ring's own pixels are easy, the interior is what needs context. ``ring_label='ignore'`` marks
  rings unlabelled (harder to learn: nothing supervises the colour directly).
* :func:`make_det_dataset`: COCO json (``images/{train,val}/*.jpg``,
  ``annotations/instances_{train,val}.json``), one box per blob (ring included), category by ring.

Both are deterministic for a given seed. Only numpy and OpenCV are used.
"""
import json
import math
import os
import os.path as osp
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

#: Classes after ``reduce_zero_label`` (PNG value = index + 1).
SEG_CLASSES = ('background', 'red-ringed blob', 'green-ringed blob', 'blue-ringed blob')
SEG_PALETTE = [[120, 120, 120], [220, 40, 40], [40, 200, 40], [40, 80, 230]]
#: Detection categories (COCO ids 1..3).
DET_CLASSES = SEG_CLASSES[1:]
# Ring colours in RGB, one per blob class.
_RING_RGB = ((230, 30, 30), (30, 210, 30), (30, 60, 240))


def ring_width(size: int) -> float:
    """Ring thickness in pixels for an image side ``size``."""
    return max(1.5, size / 40)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth low-saturation colour field ``[size, size, 3]`` uint8 (RGB)."""
    gray = rng.uniform(70, 180)
    coarse = gray + rng.normal(0, 18, size=(4, 4, 1)) + rng.normal(0, 8, size=(4, 4, 3))
    field = cv2.resize(coarse.astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    field += rng.normal(0, 4, size=field.shape).astype(np.float32)
    return np.clip(field, 0, 255).astype(np.uint8)


def _place_blobs(rng: np.random.Generator, size: int, num: int, r_min: float,
                 r_max: float, ring: float) -> List[Tuple[float, float, float]]:
    """Non-overlapping discs ``(cx, cy, r)`` whose rings stay inside the image."""
    blobs: List[Tuple[float, float, float]] = []
    for _ in range(200):
        if len(blobs) == num:
            break
        r = rng.uniform(r_min, r_max)
        margin = r + ring + 1
        if 2 * margin >= size:
            raise ValueError(f'image size {size} is too small for blobs of radius {r_max}')
        cx, cy = rng.uniform(margin, size - margin, size=2)
        if all(math.hypot(cx - x, cy - y) > r + q + 2 * ring + 2 for x, y, q in blobs):
            blobs.append((cx, cy, r))
    return blobs


def render_sample(rng: np.random.Generator, size: int = 64, max_blobs: int = 3,
                  ring_label: str = 'object') -> Tuple[np.ndarray, np.ndarray, List[Dict]]:
    """Draw one image.

    Args:
        rng: random generator.
        size: image side in pixels (>= 32).
        max_blobs: at most this many blobs (at least 1).
        ring_label: ``'ignore'`` labels ring pixels 0 (unlabelled), ``'object'`` labels them as
            the blob they surround.

    Returns:
        tuple: ``image`` ``[size, size, 3]`` uint8 RGB, ``label`` ``[size, size]`` uint8 in ADE20K
        PNG convention (0 unlabelled, 1 background, 2.. blob classes) and a list of
        ``dict(bbox=[x, y, w, h], category=k)`` with ``k`` in 0..2.
    """
    if size < 32:
        raise ValueError(f'size must be >= 32, got {size}')
    if ring_label not in ('ignore', 'object'):
        raise ValueError(f"ring_label must be 'ignore' or 'object', got {ring_label!r}")
    if max_blobs < 1:
        raise ValueError(f'max_blobs must be >= 1, got {max_blobs}')
    image = _background(rng, size)
    label = np.ones((size, size), np.uint8)
    ring = ring_width(size)
    r_min, r_max = size * 0.11, size * 0.17
    blobs = _place_blobs(rng, size, int(rng.integers(1, max_blobs + 1)), r_min, r_max, ring)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    objects = []
    for cx, cy, r in blobs:
        cls = int(rng.integers(0, len(_RING_RGB)))
        dist = np.hypot(xx - cx, yy - cy)
        inside = dist <= r
        on_ring = (dist > r) & (dist <= r + ring)
        # The same texture law for every class: stripes at a random angle, period and phase.
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(3.0, 5.0)
        phase = rng.uniform(0, 2 * math.pi)
        wave = np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period + phase)
        tone = np.where(wave > 0, 235, 25).astype(np.uint8)
        image[inside] = tone[inside][:, None]
        image[on_ring] = np.array(_RING_RGB[cls], np.uint8)
        label[inside] = cls + 2
        label[on_ring] = 0 if ring_label == 'ignore' else cls + 2
        x0, y0 = max(0.0, cx - r - ring), max(0.0, cy - r - ring)
        x1, y1 = min(float(size), cx + r + ring), min(float(size), cy + r + ring)
        objects.append(dict(bbox=[round(x0, 2), round(y0, 2), round(x1 - x0, 2),
                                  round(y1 - y0, 2)], category=cls))
    return image, label, objects


def _write_jpg(path: str, image_rgb: np.ndarray) -> None:
    if not cv2.imwrite(path, cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR),
                       [cv2.IMWRITE_JPEG_QUALITY, 95]):
        raise OSError(f'could not write {path}')


def make_seg_dataset(root: str, num_train: int = 200, num_val: int = 40, size: int = 64,
                     seed: int = 0, ring_label: str = 'object') -> Dict[str, int]:
    """Write the ADE20K-layout segmentation dataset under ``root``.

    Args:
        root: dataset root (created).
        num_train: training images.
        num_val: validation images.
        size: image side.
        seed: random seed; the same seed writes the same files.
        ring_label: see :func:`render_sample`.

    Returns:
        dict: number of images written per split.
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(f'num_train and num_val must be >= 1, got {num_train}, {num_val}')
    rng = np.random.default_rng(seed)
    counts = {}
    for split, num in (('training', num_train), ('validation', num_val)):
        img_dir = osp.join(root, 'images', split)
        ann_dir = osp.join(root, 'annotations', split)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(ann_dir, exist_ok=True)
        for i in range(num):
            image, label, _ = render_sample(rng, size, ring_label=ring_label)
            name = f'synth_{split[0]}_{i:05d}'
            _write_jpg(osp.join(img_dir, name + '.jpg'), image)
            if not cv2.imwrite(osp.join(ann_dir, name + '.png'), label):
                raise OSError(f'could not write {name}.png under {ann_dir}')
        counts[split] = num
    return counts


def make_det_dataset(root: str, num_train: int = 100, num_val: int = 20, size: int = 64,
                     seed: int = 0) -> Dict[str, int]:
    """Write the COCO-json detection variant under ``root``.

    Args:
        root: dataset root (created).
        num_train: training images.
        num_val: validation images.
        size: image side.
        seed: random seed.

    Returns:
        dict: number of annotations written per split.
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(f'num_train and num_val must be >= 1, got {num_train}, {num_val}')
    rng = np.random.default_rng(seed)
    os.makedirs(osp.join(root, 'annotations'), exist_ok=True)
    categories = [dict(id=k + 1, name=name) for k, name in enumerate(DET_CLASSES)]
    counts = {}
    for split, num in (('train', num_train), ('val', num_val)):
        img_dir = osp.join(root, 'images', split)
        os.makedirs(img_dir, exist_ok=True)
        images, annotations = [], []
        for i in range(num):
            image, _, objects = render_sample(rng, size)
            file_name = f'synth_{split}_{i:05d}.jpg'
            _write_jpg(osp.join(img_dir, file_name), image)
            images.append(dict(id=i + 1, file_name=file_name, height=size, width=size))
            for obj in objects:
                x, y, w, h = obj['bbox']
                annotations.append(dict(id=len(annotations) + 1, image_id=i + 1,
                                        category_id=obj['category'] + 1, bbox=[x, y, w, h],
                                        area=round(w * h, 2), iscrowd=0))
        with open(osp.join(root, 'annotations', f'instances_{split}.json'), 'w') as f:
            json.dump(dict(images=images, annotations=annotations, categories=categories), f)
        counts[split] = len(annotations)
    return counts


def context_mask(label: np.ndarray, patch: int = 5) -> np.ndarray:
    """Blob pixels whose ``patch x patch`` neighbourhood holds no ring pixel.

    For a label map written with ``ring_label='object'``: the ring is the outer
    ``ring_width(size)`` pixels of every blob, so a pixel whose distance to the blob's outside
    exceeds ``ring_width + patch // 2`` cannot see any ring colour in its patch.

    Returns:
        np.ndarray: bool mask ``[H, W]``.
    """
    blobs = (np.asarray(label) >= 2).astype(np.uint8)
    # distanceTransform measures the distance to the nearest zero (non-blob) pixel.
    dist = cv2.distanceTransform(np.pad(blobs, 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
    # +1.5: the discrete disc edge and JPEG chroma subsampling spread the ring colour.
    return dist > ring_width(label.shape[0]) + patch // 2 + 1.5


def chance_levels(labels: Sequence[np.ndarray], num_classes: int = len(SEG_CLASSES),
                  context_masks: Optional[Sequence[np.ndarray]] = None) -> Dict[str, float]:
    """Reference mIoU levels on ``labels`` (ADE20K PNG convention, 0 ignored).

    * ``uniform``: expected mIoU of a per-pixel uniformly random prediction.
    * ``majority``: every pixel predicted as the most frequent class.
    * ``context_free``: the best a classifier blind to context can do: every pixel right except
      the ``context_masks`` pixels (blob pixels that cannot see their ring, see
      :func:`context_mask`), which all get the most frequent class among them. Without
      ``context_masks`` every blob pixel counts as needing context.

    Returns:
        dict: the three levels, in [0, 1].
    """
    flat = np.concatenate([np.asarray(x).reshape(-1) for x in labels]).astype(np.int64)
    if context_masks is None:
        hidden = flat >= 2
    else:
        hidden = np.concatenate([np.asarray(m).reshape(-1) for m in context_masks]).astype(bool)
        if hidden.shape != flat.shape:
            raise ValueError('context_masks must match the labels in shape')
    keep = flat > 0
    flat, hidden = flat[keep] - 1, hidden[keep]
    if flat.size == 0:
        raise ValueError('labels hold no labelled pixel')
    k = num_classes
    freq = np.bincount(flat, minlength=k)[:k] / flat.size
    # Random uniform prediction: E[I] = p/k, E[U] = p + 1/k - p/k (in fractions of pixels).
    uniform = np.mean((freq / k) / (freq + 1 / k - freq / k))
    majority = _miou(flat, np.full_like(flat, int(np.argmax(freq))), k)
    pred = flat.copy()
    if hidden.any():
        pred[hidden] = int(np.argmax(np.bincount(flat[hidden], minlength=k)))
    return dict(uniform=float(uniform), majority=float(majority),
                context_free=float(_miou(flat, pred, k)))


def _miou(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    """mIoU over the classes present in ``gt`` or ``pred`` (as mmseg's IoUMetric)."""
    ious = []
    for c in range(num_classes):
        union = np.sum((gt == c) | (pred == c))
        if union:
            ious.append(np.sum((gt == c) & (pred == c)) / union)
    return float(np.mean(ious))
