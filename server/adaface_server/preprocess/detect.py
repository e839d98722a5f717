"""MTCNN face detection (P-Net, R-Net, O-Net) reproducing AdaFace's face_alignment.mtcnn."""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
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
_BILINEAR = Image.Resampling.BILINEAR
# Crops per R-Net / O-Net call on CPU: 256 ran at 61 us per R-Net crop, against 80 at the
# ~170 crops of one noisy 640x480 photo and 108 at 32 (2-core Xeon, bench/bench_detect.py).
CPU_SLICE = 256
# CUDA's antialiased bilinear kernel holds the filter in shared memory, which it refuses past
# a downscale factor of ~94 (a 1250x1250 photo's smallest levels at --detect-max-side 1250):
# levels shrunk more than this are resized on the CPU (uint8) and copied over.
_DEVICE_AA_MAX_FACTOR = 64
# Boxes whose pairwise overlaps nms() settles at once: 64 ran 4x faster than one numpy pass
# per kept box at 80-600 candidates, 128 and 256 no faster, 512 slower past 600.
NMS_BLOCK = 64
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels (uint8, or whole-valued floats) NCHW -> float32 in MTCNN's scale, same layout.

    The nets are kept channels-last: on CPU their max-pools and convolutions ran 2-4x
    faster that way than NCHW. (OpenVINO's nets do this in their graphs.)"""
    return (pixels.float() - 127.5) * 0.0078125


def _nchw_view(batch: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> the NCHW view of the same memory (channels-last); read-only arrays
    (PIL's) are copied, as torch wants writable memory."""
    if not batch.flags.writeable:
        batch = batch.copy()
    return torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """Greedy NMS, highest score first; returns kept indices in decreasing score order.

    Upstream's loop (keep the best box, drop every other box overlapping it by more than
    threshold, repeat) with its overlaps computed a block of NMS_BLOCK boxes at a time: a
    block is first cleared against the boxes already kept, then its pairwise overlaps
    settle it in score order. Same pairs, same float64 arithmetic, so the same boxes are
    kept, 3-5x faster than one numpy pass per kept box at the 30-600 candidates of a
    P-Net level (2 ms of a noisy 640x480 photo's 43, down from 4)."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    # A stable ascending sort read from the end matches upstream's tie order.
    order = np.argsort(scores, kind="stable")[::-1]
    ordered = boxes[order]
    area = (ordered[:, 2] - ordered[:, 0] + 1.0) * (ordered[:, 3] - ordered[:, 1] + 1.0)
    kept: list[int] = []
    for start in range(0, len(order), NMS_BLOCK):
        block = np.arange(start, min(start + NMS_BLOCK, len(order)))
        alive = np.ones(len(block), dtype=bool)
        if kept:
            earlier = np.asarray(kept)
            alive &= ~(_overlap(ordered, area, earlier, block, mode) > threshold).any(axis=0)
        spares = _overlap(ordered, area, block, block, mode) <= threshold
        for k in np.flatnonzero(alive).tolist():
            if alive[k]:
                kept.append(start + k)
                alive &= spares[k]
    return order[np.asarray(kept, dtype=np.int64)]


def _overlap(
    boxes: np.ndarray, area: np.ndarray, rows: np.ndarray, cols: np.ndarray, mode: str
) -> np.ndarray:
    """Overlap of each row box (the kept one, upstream's i) with each column box."""
    a, b = boxes[rows], boxes[cols]
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.maximum(0.0, w + 1.0) * np.maximum(0.0, h + 1.0)
    if mode == "min":
        return inter / np.minimum(area[rows][:, None], area[cols][None, :])
    return inter / (area[rows][:, None] + area[cols][None, :] - inter)


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


def _crops(image: Image.Image, boxes: np.ndarray, size: int) -> np.ndarray:
    """Cuts integer boxes out of the image (zero padding outside) resized to size x size.

    Upstream's get_image_boxes: a zero-padded patch, then PIL bilinear. PIL's own crop pads
    with zeros outside the image, which is the same patch without the numpy round trip."""
    out = np.empty((len(boxes), size, size, 3), dtype=np.uint8)
    for n, (x1, y1, x2, y2) in enumerate(boxes.astype(np.int64).tolist()):
        out[n] = np.asarray(image.crop((x1, y1, x2 + 1, y2 + 1)).resize((size, size), _BILINEAR))
    return out


class MTCNN:
    """Thread-safe detector; `detect` works on an RGB uint8 HxWx3 array.

    The nets run on `device` at `precision` ("fp32", "bf16" or "fp16"); their outputs come
    back as float32. `detect_many` runs the R-Net and O-Net stages once for all the images
    of a call. Requests with `upstream_softmax` (the parity option) always run the upstream
    way: fp32, and the image pyramid resized by PIL as upstream does; otherwise the pyramid
    is resized by torch on the device (uint8 antialiased bilinear on CPU, within one level
    of PIL's pixels, ~3.5x faster). With `runtime="openvino"` (CPU only, fp32 or bf16) the
    nets run compiled by OpenVINO (mtcnn_openvino.py), the parity option still by torch.
    """

    def __init__(
        self,
        weights_dir: Path,
        max_side: int = 1024,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        runtime: str = "torch",
        threads: int = 0,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        self.device = torch.device(device)
        self.precision = precision
        nets = load_nets(weights_dir)
        self.runtime = runtime
        self._openvino = None
        if runtime == "openvino":
            if self.device.type != "cpu":
                raise ValueError(f"the OpenVINO runtime runs MTCNN on the CPU, not {self.device}")
            from .mtcnn_openvino import OpenVinoNets

            self._openvino = OpenVinoNets(nets, precision, threads)
        elif runtime != "torch":
            raise ValueError(f"runtime must be torch or openvino, got {runtime!r}")
        self.pnet, self.rnet, self.onet = (
            net.to(self.device, memory_format=torch.channels_last) for net in nets
        )
        self.max_side = max_side
        # torch modules are safe to share, but one detection at a time keeps the
        # intra-op thread pool from being oversubscribed by preprocessing workers.
        self._lock = threading.Lock()
        # With OpenVINO nets, torch only resizes the pyramid and normalises: on one thread
        # of its own (see single_threaded_torch).
        self._torch_thread = single_threaded_torch() if self._openvino is not None else None

    def detect(self, image: np.ndarray, params: DetectParams = DetectParams()) -> list[Face]:
        """Every face scoring above params.min_score, best score first."""
        return self.detect_many([image], [params])[0]

    def detect_many(
        self, images: Sequence[np.ndarray], params: Sequence[DetectParams]
    ) -> list[list[Face]]:
        """detect() for each image (with its own params); R-Net and O-Net batched across them."""
        if len(images) != len(params):
            raise ValueError(f"{len(images)} images but {len(params)} params")
        shrunk = [self._shrink(image) for image in images]
        run_args = (
            [small for small, _ in shrunk],
            [
                max(p.min_face_size * scale[0], float(_CELL))
                for p, (_, scale) in zip(params, shrunk, strict=True)
            ],
            params,
        )
        if self._torch_thread is not None and not any(p.upstream_softmax for p in params):
            found = self._torch_thread.submit(self._run_locked, *run_args).result()
        else:  # the torch nets (and the parity option) want every intra-op thread
            found = self._run_locked(*run_args)
        out = []
        for (boxes, scores, points), (_, (_, sx, sy)), p in zip(found, shrunk, params, strict=True):
            faces = []
            for box, score, pts in zip(boxes, scores, points, strict=True):
                box = box / np.array([sx, sy, sx, sy])
                pts = pts / np.array([sx, sy])
                side = min(box[2] - box[0] + 1.0, box[3] - box[1] + 1.0)
                if side < p.min_face_size:
                    continue
                faces.append(Face(box=box, score=float(score), landmarks=pts))
            out.append(faces)
        return out

    def _run_locked(
        self, images: list[np.ndarray], min_faces: list[float], params: Sequence[DetectParams]
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        with self._lock, torch.inference_mode():
            return self._run(images, min_faces, params)

    def _shrink(self, image: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float]]:
        """A copy bounded by max_side (landmarks map back to the full image) and its scales."""
        height, width = image.shape[:2]
        if max(height, width) <= self.max_side:
            return image, (1.0, 1.0, 1.0)
        scale = self.max_side / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = np.asarray(Image.fromarray(image).resize(size, _BILINEAR))
        return small, (scale, size[0] / width, size[1] / height)

    def _autocast(self, exact: bool):
        dtype = PRECISIONS[self.precision]
        if exact or dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _net(self, name: str, batch: np.ndarray, exact: bool) -> list[np.ndarray]:
        """Runs R-Net or O-Net on uint8 NHWC crops; its outputs as float32 numpy arrays.

        On CPU the crops go through in slices of CPU_SLICE: R-Net's first activations for
        1,360 crops (8 noisy photos) are 73 MB, and its PReLUs and pools, memory-bound at
        that size, made one big batch 9% slower than a photo at a time."""
        step = CPU_SLICE if self.device.type == "cpu" else max(1, len(batch))
        net = self.rnet if name == "rnet" else self.onet
        parts = []
        for start in range(0, len(batch), step):
            if self._openvino is not None and not exact:
                parts.append(self._openvino.run(name, batch[start : start + step]))
                continue
            pixels = _nchw_view(batch[start : start + step]).to(self.device, non_blocking=True)
            with self._autocast(exact):
                outputs = net(_normalise(pixels))
            parts.append([o.float().cpu().numpy() for o in outputs])
        return [np.concatenate(outputs) for outputs in zip(*parts, strict=True)]

    def _run(
        self, images: list[np.ndarray], min_faces: list[float], params: Sequence[DetectParams]
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        empty = (np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2)))
        exact = any(p.upstream_softmax for p in params)
        boxes = [
            self._stage1(image, min_face, p.upstream_softmax)
            for image, min_face, p in zip(images, min_faces, params, strict=True)
        ]
        pils = [Image.fromarray(image) for image in images]
        # Stage 2: R-Net on 24x24 crops, one batch for every image.
        crops = [_crops(pil, b, 24) for pil, b in zip(pils, boxes, strict=True) if len(b)]
        if not crops:
            return [empty] * len(images)
        logits, offsets = self._net("rnet", np.concatenate(crops), exact)
        probs, offsets = _face_probability(logits), offsets.astype(np.float64)
        refined = []
        for b, (lo, hi) in zip(boxes, _spans(boxes), strict=True):
            p, off = probs[lo:hi], offsets[lo:hi]
            keep = p > THRESHOLDS[1]
            b, p, off = b[keep], p[keep], off[keep]
            keep = nms(b, p, NMS_THRESHOLDS[1])
            refined.append(_valid(np.round(_square(_calibrate(b[keep], off[keep])))))
        # Stage 3: O-Net on 48x48 crops: scores, offsets, landmarks; one batch again.
        crops = [_crops(pil, b, 48) for pil, b in zip(pils, refined, strict=True) if len(b)]
        if not crops:
            return [empty] * len(images)
        logits, offsets, marks = self._net("onet", np.concatenate(crops), exact)
        probs = _face_probability(logits)
        offsets, marks = offsets.astype(np.float64), marks.astype(np.float64)
        out = []
        for b, (lo, hi), p in zip(refined, _spans(refined), params, strict=True):
            if hi == lo:
                out.append(empty)
                continue
            score, off, mk = probs[lo:hi], offsets[lo:hi], marks[lo:hi]
            keep = score > p.min_score
            b, score, off, mk = b[keep], score[keep], off[keep], mk[keep]
            w = b[:, 2:3] - b[:, 0:1] + 1.0
            h = b[:, 3:4] - b[:, 1:2] + 1.0
            xs = b[:, 0:1] + w * mk[:, 0:5]
            ys = b[:, 1:2] + h * mk[:, 5:10]
            b = _calibrate(b, off)
            keep = nms(b, score, NMS_THRESHOLDS[2], mode="min")
            points = np.stack([xs, ys], axis=2)
            out.append((b[keep], score[keep], points[keep]))
        return out

    def _pyramid(self, image: np.ndarray, sizes: list[tuple[int, int]], exact: bool):
        """Each (width, height) of the pyramid as [1,3,h,w] pixels on the device: uint8
        (channels-last) on the CPU, whole-valued float32 elsewhere."""
        if exact:
            pil = Image.fromarray(image)
            for size in sizes:
                yield _nchw_view(np.asarray(pil.resize(size, _BILINEAR))[None]).to(self.device)
            return
        on_cpu = _nchw_view(image[None])
        pixels = on_cpu
        if self.device.type != "cpu":
            # antialiased uint8 resizing is a CPU kernel
            pixels = on_cpu.to(self.device).float()
        height0, width0 = image.shape[:2]
        for width, height in sizes:
            source = pixels
            if max(height0 / height, width0 / width) > _DEVICE_AA_MAX_FACTOR:
                source = on_cpu  # see _DEVICE_AA_MAX_FACTOR
            level = torch.nn.functional.interpolate(
                source, size=(height, width), mode="bilinear", antialias=True, align_corners=False
            ).to(self.device)
            if level.dtype != torch.uint8:
                level = level.round_().clamp_(0, 255)  # the uint8 pixels PIL would produce
            yield level

    def _stage1(self, image: np.ndarray, min_face: float, upstream_softmax: bool) -> np.ndarray:
        """P-Net over the image pyramid: candidate square boxes, rounded to integers."""
        height, width = image.shape[:2]
        m = _CELL / min_face
        scales = []
        length = min(height, width) * m
        while length > _CELL:
            scales.append(m * FACTOR ** len(scales))
            length *= FACTOR
        sizes = [(math.ceil(width * s), math.ceil(height * s)) for s in scales]
        found_boxes, found_scores, found_offsets = [], [], []
        levels = self._pyramid(image, sizes, exact=upstream_softmax)
        for s, level in zip(scales, levels, strict=True):
            if self._openvino is not None and not upstream_softmax:
                nhwc = level.permute(0, 2, 3, 1).numpy()  # channels-last: no copy
                logits, offsets = map(torch.from_numpy, self._openvino.run("pnet", nhwc))
            else:
                with self._autocast(upstream_softmax):
                    logits, offsets = self.pnet(_normalise(level))
            # Upstream normalises over the last (width) axis, not the class axis: a bug
            # kept behind `upstream_softmax` for parity with AdaFace's own pipeline.
            probs = torch.softmax(logits.float(), dim=-1 if upstream_softmax else 1)[0, 1]
            probs, offsets = probs.cpu().numpy(), offsets[0].float().cpu().numpy()
            rows, cols = np.nonzero(probs > THRESHOLDS[0])
            if not rows.size:
                continue
            score = probs[rows, cols].astype(np.float64)
            off = offsets[:, rows, cols].T.astype(np.float64)
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


def single_threaded_torch() -> ThreadPoolExecutor:
    """A thread whose torch ops use one intra-op thread; every other thread keeps its own.

    With MTCNN's nets compiled by OpenVINO, the torch work left between their calls (the
    pyramid's resizing, normalisation) ran on torch's OpenMP pool, whose threads spin
    between parallel regions on the cores OpenVINO's own threads want: a 640x480 photo took
    55-59 ms with 2 torch threads, 48-51 ms on this thread (fp32 nets, 2-core Xeon).
    torch.set_num_threads sets the calling thread's OpenMP thread count and the default
    that threads new to torch pick up; the default is read and put back from fresh threads,
    so only this thread runs single-threaded."""
    with ThreadPoolExecutor(1) as fresh:
        default = fresh.submit(torch.get_num_threads).result()
    worker = ThreadPoolExecutor(1, thread_name_prefix="mtcnn-torch", initializer=_one_thread)
    worker.submit(int).result()  # the initializer has run
    with ThreadPoolExecutor(1) as fresh:
        fresh.submit(torch.set_num_threads, default).result()
    return worker


def _one_thread() -> None:
    torch.set_num_threads(1)
    # A thread takes the default when it first asks torch; asking now, while the default is
    # 1, settles it for this thread (it is not asked again).
    torch.get_num_threads()


def _face_probability(logits: np.ndarray) -> np.ndarray:
    """Softmax over the two classes in float32 (as upstream), face column as float64."""
    return torch.softmax(torch.from_numpy(logits), dim=1)[:, 1].numpy().astype(np.float64)


def _spans(groups: list[np.ndarray]) -> list[tuple[int, int]]:
    """(start, end) rows of each group in their concatenation (empty groups included)."""
    ends = np.cumsum([len(g) for g in groups]).tolist()
    return list(zip([0, *ends[:-1]], ends, strict=True))


def _valid(boxes: np.ndarray) -> np.ndarray:
    # Wild regressions can yield empty boxes, which upstream would crash on.
    return boxes[(boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1])]
