"""The embedding service: preprocess images, run them through the backend, fuse flips."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from . import __version__, request_context
from .backends.base import Backend
from .batching import DynamicBatcher
from .config import Settings
from .errors import (
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    ServiceError,
    StartupError,
    Unavailable,
    Unimplemented,
)
from .fusion import fuse_flip_pairs
from .metrics import Metrics
from .preprocess.decode import DecodeLimits, ImageRejected
from .preprocess.detect import MTCNN, DetectParams, Face
from .preprocess.pipeline import (
    AlignMode,
    DecodedPhoto,
    FaceCrop,
    ImageItem,
    decode_for_detection,
    detect_crops_many,
    face_crop,
    png_bytes,
    to_model_input,
)

log = logging.getLogger(__name__)

# Photos of a call go through the detector together, up to this many at a time: its R-Net
# and O-Net run once per group, and only a group's decoded pixels are held at once.
DETECT_GROUP = 8


@dataclass(frozen=True)
class FaceOutcome:
    """One detected face: where it is, and (Embed only) its embedding."""

    face: Face
    embedding: np.ndarray | None = None
    norm: float = 0.0
    aligned_png: bytes = b""


@dataclass(frozen=True)
class ImageOutcome:
    """The result for one image: an embedding and its norm, or a rejection reason."""

    embedding: np.ndarray | None = None  # [D] float32, unit norm
    norm: float = 0.0
    error_reason: str | None = None  # ImageError.Reason suffix, e.g. "UNDECODABLE"
    error_message: str = ""
    faces: tuple[FaceOutcome, ...] = ()  # ALIGNMENT_DETECT: the selected faces

    @property
    def ok(self) -> bool:
        return self.embedding is not None


@dataclass(frozen=True)
class ModelInfo:
    model_name: str
    arch: str
    embedding_dim: int
    max_batch_size: int
    backend: str
    model_checksum: str
    server_version: str
    untrained: bool
    weights: str
    device: str = ""  # where the embedded model runs ("cpu", "cuda:0"); "" for Triton
    precision: str = ""  # "fp32", "bf16" or "fp16"; "" for Triton
    worker_pid: int = 0  # the process that answered (several share a port with --workers)
    channel_order: str = "BGR"  # the model's input contract ("BGR" AdaFace, "RGB" arcface)


class EmbeddingService:
    """Owns the backend, the batcher and the preprocessing threads."""

    def __init__(
        self, settings: Settings, backend: Backend, metrics: Metrics | None = None
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.metrics = metrics or Metrics()
        self.limits = DecodeLimits(settings.max_image_bytes, settings.max_image_pixels)
        self._preprocess = ThreadPoolExecutor(
            max_workers=settings.preprocess_workers, thread_name_prefix="preprocess"
        )
        self._batcher: DynamicBatcher | None = None
        self._ready = False
        # Rows sent to a backend that batches on its side (Triton), bounded by max_queue.
        self._inflight_rows = 0
        # Rows admitted but still being decoded and aligned, counted against max_queue too.
        self._preprocessing_rows = 0
        self._failure: str | None = None  # why loading gave up, for UNAVAILABLE messages
        # Loaded at construction so missing weights stop the server at start-up.
        self.detector: MTCNN | None = None
        if settings.detector == "mtcnn":
            self.detector = _load_detector(settings)

    # -- lifecycle ---------------------------------------------------------------------

    async def load(self, on_ready: Callable[[], object] | None = None) -> None:
        """Loads the model, retrying while it is missing (e.g. not exported yet)."""
        last_message = None
        while True:
            try:
                await self.backend.load()
                break
            except StartupError as exc:
                # e.g. a device or precision this machine cannot run: retrying cannot help.
                self._failure = str(exc)
                raise
            except ServiceError as exc:
                if not isinstance(exc, Unavailable):
                    # e.g. Triton serves a model with other tensors: retrying cannot help.
                    self._failure = str(exc)
                    raise
                if str(exc) != last_message:
                    log.warning(
                        "model not available yet, retrying every %.1fs: %s",
                        self.settings.load_retry_seconds,
                        exc,
                    )
                    last_message = str(exc)
                await asyncio.sleep(self.settings.load_retry_seconds)
        spec = self.backend.spec
        if spec.untrained:
            log.warning(
                "MODEL %s HAS RANDOM, UNTRAINED WEIGHTS: its embeddings are meaningless. "
                "Export a real AdaFace checkpoint (make serve CKPT=... ARCH=...).",
                spec.name,
            )
        if self.backend.needs_batching:
            self._batcher = DynamicBatcher(
                self._timed_infer,
                self.backend.max_batch_size,
                self.settings.max_queue,
                on_drop=self.metrics.rows_dropped.inc,
            )
            self._batcher.start()
        self._ready = True
        log.info(
            "model %s (%s, sha256 %s…) ready on the %s backend; input %s %s",
            spec.name,
            spec.arch,
            spec.checksum[:12],
            self.backend.name,
            spec.channel_order,
            "uint8 pixels (normalised by the model)" if spec.input_dtype == "uint8" else "fp32",
        )
        if on_ready is not None:
            on_ready()

    def ready(self) -> bool:
        return self._ready and self.backend.ready()

    async def close(self) -> None:
        self._ready = False
        if self._batcher is not None:
            await self._batcher.stop()
        await self.backend.close()
        self._preprocess.shutdown(wait=False, cancel_futures=True)

    @property
    def queued_rows(self) -> int:
        return self._batcher.queued_rows if self._batcher else self._inflight_rows

    def info(self) -> ModelInfo:
        spec = self._spec()
        meta = spec.metadata
        if spec.untrained:
            weights = "RANDOM, UNTRAINED weights: embeddings are meaningless"
        elif meta.get("weights") == "unknown":
            weights = f"unknown: no local metadata.json for the model on {self.backend.target}"
        else:
            weights = _checkpoint_weights(meta)
        return ModelInfo(
            model_name=spec.name,
            arch=spec.arch,
            embedding_dim=spec.embedding_dim,
            max_batch_size=self.backend.max_batch_size,
            backend=self.backend.name,
            model_checksum=spec.checksum,
            server_version=__version__,
            untrained=spec.untrained,
            weights=weights,
            device=getattr(self.backend, "device", ""),
            precision=getattr(self.backend, "precision", ""),
            worker_pid=os.getpid(),
            channel_order=spec.channel_order,
        )

    def _spec(self):
        if not self._ready and self._failure is not None:
            raise Unavailable(f"model {self.settings.model!r} cannot be served: {self._failure}")
        if not self._ready:
            raise Unavailable(
                f"model {self.settings.model!r} is not ready (loading or warming up; "
                f"{self.backend.target})"
            )
        if not self.backend.ready():
            raise Unavailable(
                f"model {self.settings.model!r} is not ready: {self.backend.target} is unavailable"
            )
        return self.backend.spec

    # -- embedding ---------------------------------------------------------------------

    def _check_count(self, items: Sequence[ImageItem]) -> None:
        if not items:
            raise InvalidArgument("images: at least one image is required")
        if len(items) > self.settings.max_images_per_request:
            raise InvalidArgument(
                f"images: at most {self.settings.max_images_per_request} per request "
                f"(max_images_per_request), got {len(items)}"
            )

    def _no_detector(self, field: str) -> Unimplemented:
        return Unimplemented(
            f"{field}: ALIGNMENT_DETECT needs a face detector, which this server does not "
            'run (--detector none): send 112x112 crops with alignment="aligned" '
            "(CLI --aligned) or 5 landmarks, or start the server with a detector"
        )

    async def embed(
        self, items: Sequence[ImageItem], flip: bool, detect: DetectParams | None = None
    ) -> list[ImageOutcome]:
        """Embeds every item; per-image problems become outcomes, not exceptions."""
        self._spec()
        self._check_count(items)
        if self.detector is None:
            for i, item in enumerate(items):
                if item.mode is AlignMode.DETECT:
                    raise self._no_detector(f"images[{i}].alignment")
        params = detect or DetectParams()
        crops = await self._crops_of(items, params, rows=len(items) * (2 if flip else 1))
        # One model batch holds every crop: single crops and each detected face.
        rows: list[tuple[int, FaceCrop | None]] = []
        arrays: list[np.ndarray] = []
        outcomes: list[ImageOutcome] = []
        for i, c in enumerate(crops):
            outcomes.append(c if isinstance(c, ImageOutcome) else ImageOutcome())
            if isinstance(c, np.ndarray):
                rows.append((i, None))
                arrays.append(c)
            elif isinstance(c, list):
                for face in c:
                    rows.append((i, face))
                    arrays.append(face.crop)
        if not rows:
            return outcomes
        spec = self.backend.spec
        batch = await asyncio.get_running_loop().run_in_executor(
            self._preprocess, to_model_input, arrays, flip, spec.channel_order, spec.input_dtype
        )
        embeddings, norms = await self._infer(batch, group=2 if flip else 1)
        if flip:
            embeddings, norms = fuse_flip_pairs(embeddings, norms)
        faces: dict[int, list[FaceOutcome]] = {}
        for row, (i, face) in enumerate(rows):
            if face is None:
                outcomes[i] = ImageOutcome(embedding=embeddings[row], norm=float(norms[row, 0]))
                continue
            faces.setdefault(i, []).append(
                FaceOutcome(
                    face=face.face,
                    embedding=embeddings[row],
                    norm=float(norms[row, 0]),
                    aligned_png=png_bytes(face.crop) if params.return_aligned else b"",
                )
            )
        for i, found in faces.items():
            outcomes[i] = ImageOutcome(
                embedding=found[0].embedding, norm=found[0].norm, faces=tuple(found)
            )
        return outcomes

    async def detect(self, items: Sequence[ImageItem], params: DetectParams) -> list[ImageOutcome]:
        """Detection only (no model needed): outcomes carry faces, never embeddings."""
        if self.detector is None:
            raise self._no_detector("Detect")
        self._check_count(items)
        crops = await self._crops_of(items, params, rows=len(items))
        outcomes = []
        for c in crops:
            if isinstance(c, ImageOutcome):
                outcomes.append(c)
                continue
            assert isinstance(c, list)
            found = tuple(
                FaceOutcome(
                    face=f.face, aligned_png=png_bytes(f.crop) if params.return_aligned else b""
                )
                for f in c
            )
            outcomes.append(ImageOutcome(faces=found))
        return outcomes

    def _admit(self, rows: int) -> None:
        waiting = self.queued_rows + self._preprocessing_rows
        if waiting and waiting + rows > self.settings.max_queue:
            where = (
                "queued for the model" if self._batcher else f"in flight to {self.backend.target}"
            )
            raise ResourceExhausted(
                f"server overloaded: {waiting} images being preprocessed or {where}, "
                f"{rows} more would exceed the queue limit of {self.settings.max_queue} "
                "(max_queue)"
            )

    async def _crops_of(
        self, items: Sequence[ImageItem], params: DetectParams, rows: int
    ) -> list[np.ndarray | list[FaceCrop] | ImageOutcome]:
        """Decodes, detects and aligns on the preprocessing threads; counts failures.

        Overload is refused here, before any decoding: refusals stay cheap and never wait
        behind the images the server already accepted. `rows` is what the items will cost."""
        request_context.check_deadline("preprocessing")
        self._admit(rows)
        self._preprocessing_rows += rows
        try:
            crops = await asyncio.get_running_loop().run_in_executor(
                self._preprocess, self._crops, items, params, request_context.deadline()
            )
        finally:
            self._preprocessing_rows -= rows
        for c in crops:
            if isinstance(c, ImageOutcome) and c.error_reason:
                self.metrics.image_failures.labels(c.error_reason).inc()
        return crops

    def _crops(
        self, items: Sequence[ImageItem], params: DetectParams, deadline: float | None = None
    ) -> list[np.ndarray | list[FaceCrop] | ImageOutcome]:
        crops: list[np.ndarray | list[FaceCrop] | ImageOutcome | None] = [None] * len(items)
        photos: list[tuple[int, DecodedPhoto]] = []  # decoded, waiting for the detector

        def rejected(i: int, exc: ImageRejected) -> ImageOutcome:
            return ImageOutcome(error_reason=exc.reason, error_message=f"images[{i}]: {exc}")

        def detect_pending() -> None:
            assert self.detector is not None
            found = detect_crops_many([p for _, p in photos], self.detector, params)
            for (i, _), result in zip(photos, found, strict=True):
                crops[i] = rejected(i, result) if isinstance(result, ImageRejected) else result
            photos.clear()

        for i, item in enumerate(items):
            if deadline is not None and time.monotonic() >= deadline:
                # Runs in a worker thread: the caller has gone; stop spending CPU on it.
                raise DeadlineExceeded(f"deadline exceeded while preprocessing images[{i}]")
            try:
                if item.mode is AlignMode.DETECT:
                    assert self.detector is not None
                    photos.append(
                        (i, decode_for_detection(item, self.limits, self.detector.max_side))
                    )
                    if len(photos) == DETECT_GROUP:
                        detect_pending()
                else:
                    crops[i] = face_crop(item, self.limits)
            except ImageRejected as exc:
                crops[i] = rejected(i, exc)
        if photos:
            detect_pending()
        return [c for c in crops if c is not None]

    async def _timed_infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        started = time.perf_counter()
        result = await self.backend.infer(batch)
        self.metrics.inference.observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(len(batch))
        return result

    async def _infer(self, batch: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
        request_context.check_deadline("inference")
        if self._batcher is not None:
            deadline = request_context.deadline()
            return await self._batcher.submit(batch, group=group, deadline=deadline)
        # Backends that batch on their side get concurrent chunks, no added delay.
        rows = len(batch)
        if self._inflight_rows and self._inflight_rows + rows > self.settings.max_queue:
            raise ResourceExhausted(
                f"server overloaded: {self._inflight_rows} images in flight to "
                f"{self.backend.target}, {rows} more would exceed the queue limit of "
                f"{self.settings.max_queue} (max_queue)"
            )
        step = self.backend.max_batch_size - self.backend.max_batch_size % group
        chunks = [batch[i : i + step] for i in range(0, rows, step)]
        self._inflight_rows += rows
        try:
            results = await asyncio.gather(*(self._timed_infer(c) for c in chunks))
        finally:
            self._inflight_rows -= rows
        return np.concatenate([e for e, _ in results]), np.concatenate([n for _, n in results])


def _checkpoint_weights(meta: dict) -> str:
    """'checkpoint <file> (sha256 <first 12 digits>)' from the exporter's metadata.json."""
    name = meta.get("checkpoint_file") or "(file name not recorded)"
    digest = meta.get("checkpoint_sha256")
    return f"checkpoint {name}" + (f" (sha256 {digest[:12]})" if digest else "")


def _load_detector(settings: Settings) -> MTCNN:
    """MTCNN where --detect-device, --detect-precision and --detect-runtime place it."""
    from .backends.precision import PrecisionError, detector_placement, exact_fp32_on_cuda

    try:
        place = detector_placement(
            settings.detect_device,
            settings.detect_precision,
            settings.device,
            settings.detect_runtime,
        )
    except PrecisionError as exc:
        raise StartupError(str(exc)) from None
    # fp32 nets (and the parity option) on CUDA mean fp32, not TF32, even when the model
    # itself is elsewhere (--device cpu --detect-device cuda).
    exact_fp32_on_cuda(place.device)
    detector = MTCNN(
        settings.mtcnn_weights,
        settings.detect_max_side,
        place.device,
        place.precision,
        place.runtime,
        settings.threads,
    )
    log.info(
        "face detector MTCNN runs on %s in %s with %s (requested --detect-device %s "
        "--detect-precision %s --detect-runtime %s)",
        place.device,
        place.precision,
        place.runtime,
        settings.detect_device,
        settings.detect_precision,
        settings.detect_runtime,
    )
    return detector
