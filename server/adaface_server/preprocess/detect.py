"""MTCNN face detection (P-Net, R-Net, O-Net) reproducing AdaFace's face_alignment.mtcnn."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .align import AlignMethod
from .mtcnn_nets import load_nets

# AdaFace's face_alignment/mtcnn.py constants.
MIN_FACE_SIZE = 20.0
FACTOR = 0.85
THRESHOLDS = (0.6, 0.7, 0.9)
NMS_THRESHOLDS = (0.7, 0.7, 0.7)
_PNET_SCALE_NMS = 0.5  # run_first_stage's per-scale NMS
_CELL, _STRIDE = 12, 2


class Selection(Enum):
    BEST = "best"  # highest O-Net score, as upstream's align_multi(limit=1)
    LARGEST = "largest"  # largest box area
    ALL = "all"  # every face, best score first


@dataclass(frozen=True)
class DetectParams:
    """Per-request detection options (validated by the API layer)."""

    selection: Selection = Selection.BEST
    min_face_size: float = MIN_FACE_SIZE  # pixels of the original image
    min_score: float = THRESHOLDS[2]  # O-Net threshold
    return_aligned: bool = False
    upstream_softmax: bool = False
    align_method: AlignMethod = AlignMethod.ADAFACE  # fit used to crop each face


@dataclass(frozen=True)
class Face:
    """One detected face in the original image's pixel coordinates."""

    box: np.ndarray  # (4,) float64 x1, y1, x2, y2 (inclusive corners, upstream's convention)
    score: float
    landmarks: np.ndarray  # (5, 2) float64 (x, y): left eye, right eye, nose, mouth l/r

    @property
    def area(self) -> float:
        return float((self.box[2] - self.box[0] + 1.0) * (self.box[3] - self.box[1] + 1.0))


def _normalise(batch: np.ndarray) -> torch.Tensor:
    """uint8/float NHWC RGB -> contiguous float32 NCHW in MTCNN's (x - 127.5) / 128 scale."""
    x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
    return ((x - 127.5) * 0.0078125).permute(0, 3, 1, 2).contiguous()


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """Greedy NMS, highest score first; returns kept indices in decreasing score order."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    area = (x2 - x1 + 1.0) * (y2 - y1 + 1.0)
    # A stable ascending sort read from the end matches upstream's tie order.
    order = np.argsort(scores, kind="stable")[::-1]
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1.0)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1.0)
        inter = w * h
        if mode == "min":
            overlap = inter / np.minimum(area[i], area[rest])
        else:
            overlap = inter / (area[i] + area[rest] - inter)
        order = rest[overlap <= threshold]
    return np.asarray(keep, dtype=np.int64)


def _calibrate(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    w = boxes[:, 2] - boxes[:, 0] + 1.0
    h = boxes[:, 3] - boxes[:, 1] + 1.0
    return boxes + offsets * np.stack([w, h, w, h], axis=1)


def _square(boxes: np.ndarray) -> np.ndarray:
    w = boxes[:, 2] - boxes[:, 0] + 1.0
    h = boxes[:, 3] - boxes[:, 1] + 1.0
    side = np.maximum(w, h)
    x1 = boxes[:, 0] + w * 0.5 - side * 0.5
    y1 = boxes[:, 1] + h * 0.5 - side * 0.5
    return np.stack([x1, y1, x1 + side - 1.0, y1 + side - 1.0], axis=1)


def _crops(image: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Cuts integer boxes out of the image (zero padding outside) resized to size x size."""
    height, width = image.shape[:2]
    out = np.zeros((len(boxes), size, size, 3), dtype=np.uint8)
    for n, (x1, y1, x2, y2) in enumerate(boxes.astype(np.int64)):
        patch = np.zeros((y2 - y1 + 1, x2 - x1 + 1, 3), dtype=np.uint8)
        sx1, sy1 = max(x1, 0), max(y1, 0)
        sx2, sy2 = min(x2, width - 1), min(y2, height - 1)
        if sx1 <= sx2 and sy1 <= sy2:
            patch[sy1 - y1 : sy2 - y1 + 1, sx1 - x1 : sx2 - x1 + 1] = image[
                sy1 : sy2 + 1, sx1 : sx2 + 1
            ]
        # PIL bilinear, as upstream's get_image_boxes.
        out[n] = np.asarray(Image.fromarray(patch).resize((size, size), Image.BILINEAR))
    return out


class MTCNN:
    """Thread-safe detector; `detect` works on an RGB uint8 HxWx3 array."""

    def __init__(self, weights_dir: Path, max_side: int = 1024, threads: int = 0) -> None:
        self.pnet, self.rnet, self.onet = load_nets(weights_dir)
        self.max_side = max_side
        self.threads = threads
        # torch modules are safe to share, but one detection at a time keeps the
        # intra-op thread pool from being oversubscribed by preprocessing workers.
        self._lock = threading.Lock()

    def detect(self, image: np.ndarray, params: DetectParams = DetectParams()) -> list[Face]:
        """Every face scoring above params.min_score, best score first."""
        height, width = image.shape[:2]
        scale = 1.0
        small = image
        if max(height, width) > self.max_side:
            # Detect on a bounded copy; landmarks map back to the full-resolution image.
            scale = self.max_side / max(height, width)
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            small = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
            scale_x, scale_y = size[0] / width, size[1] / height
        else:
            scale_x = scale_y = 1.0
        min_face = max(params.min_face_size * scale, float(_CELL))
        with self._lock, torch.inference_mode():
            boxes, scores, points = self._run(small, min_face, params)
        faces = []
        for box, score, pts in zip(boxes, scores, points, strict=True):
            box = box / np.array([scale_x, scale_y, scale_x, scale_y])
            pts = pts / np.array([scale_x, scale_y])
            side = min(box[2] - box[0] + 1.0, box[3] - box[1] + 1.0)
            if side < params.min_face_size:
                continue
            faces.append(Face(box=box, score=float(score), landmarks=pts))
        return faces

    def _run(
        self, image: np.ndarray, min_face: float, params: DetectParams
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        empty = (np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2)))
        boxes = self._stage1(image, min_face, params.upstream_softmax)
        if not len(boxes):
            return empty
        # Stage 2: R-Net on 24x24 crops, one batch.
        logits, offsets = self.rnet(_normalise(_crops(image, boxes, 24)))
        probs = torch.softmax(logits, dim=1)[:, 1].numpy().astype(np.float64)
        offsets = offsets.numpy().astype(np.float64)
        keep = probs > THRESHOLDS[1]
        boxes, scores, offsets = boxes[keep], probs[keep], offsets[keep]
        keep = nms(boxes, scores, NMS_THRESHOLDS[1])
        boxes = _valid(np.round(_square(_calibrate(boxes[keep], offsets[keep]))))
        if not len(boxes):
            return empty
        # Stage 3: O-Net on 48x48 crops: scores, offsets, landmarks.
        logits, offsets, marks = self.onet(_normalise(_crops(image, boxes, 48)))
        probs = torch.softmax(logits, dim=1)[:, 1].numpy().astype(np.float64)
        offsets = offsets.numpy().astype(np.float64)
        marks = marks.numpy().astype(np.float64)
        keep = probs > params.min_score
        boxes, scores, offsets, marks = boxes[keep], probs[keep], offsets[keep], marks[keep]
        w = boxes[:, 2:3] - boxes[:, 0:1] + 1.0
        h = boxes[:, 3:4] - boxes[:, 1:2] + 1.0
        xs = boxes[:, 0:1] + w * marks[:, 0:5]
        ys = boxes[:, 1:2] + h * marks[:, 5:10]
        boxes = _calibrate(boxes, offsets)
        keep = nms(boxes, scores, NMS_THRESHOLDS[2], mode="min")
        points = np.stack([xs, ys], axis=2)
        return boxes[keep], scores[keep], points[keep]

    def _stage1(self, image: np.ndarray, min_face: float, upstream_softmax: bool) -> np.ndarray:
        """P-Net over the image pyramid: candidate square boxes, rounded to integers."""
        height, width = image.shape[:2]
        m = _CELL / min_face
        scales = []
        length = min(height, width) * m
        while length > _CELL:
            scales.append(m * FACTOR ** len(scales))
            length *= FACTOR
        pil = Image.fromarray(image)
        found_boxes, found_scores, found_offsets = [], [], []
        for s in scales:
            size = (math.ceil(width * s), math.ceil(height * s))
            pixels = np.asarray(pil.resize(size, Image.BILINEAR))
            logits, offsets = self.pnet(_normalise(pixels[None]))
            # Upstream normalises over the last (width) axis, not the class axis: a bug
            # kept behind `upstream_softmax` for parity with AdaFace's own pipeline.
            probs = torch.softmax(logits, dim=-1 if upstream_softmax else 1)[0, 1].numpy()
            rows, cols = np.nonzero(probs > THRESHOLDS[0])
            if not rows.size:
                continue
            score = probs[rows, cols].astype(np.float64)
            off = offsets[0][:, rows, cols].numpy().T.astype(np.float64)
            boxes = np.stack(
                [
                    np.round((_STRIDE * cols + 1.0) / s),
                    np.round((_STRIDE * rows + 1.0) / s),
                    np.round((_STRIDE * cols + 1.0 + _CELL) / s),
                    np.round((_STRIDE * rows + 1.0 + _CELL) / s),
                ],
                axis=1,
            )
            keep = nms(boxes, score, _PNET_SCALE_NMS)
            found_boxes.append(boxes[keep])
            found_scores.append(score[keep])
            found_offsets.append(off[keep])
        if not found_boxes:
            return np.zeros((0, 4))
        boxes = np.concatenate(found_boxes)
        scores = np.concatenate(found_scores)
        offsets = np.concatenate(found_offsets)
        keep = nms(boxes, scores, NMS_THRESHOLDS[0])
        return _valid(np.round(_square(_calibrate(boxes[keep], offsets[keep]))))


def _valid(boxes: np.ndarray) -> np.ndarray:
    # Wild regressions can yield empty boxes, which upstream would crash on.
    return boxes[(boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1])]
