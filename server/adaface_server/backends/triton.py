"""Triton backend: forwards preprocessed batches to NVIDIA Triton over gRPC (tritonclient aio).

At start it reads the model's metadata and config from Triton and refuses a model whose
tensors differ from the AdaFace contract (FAILED_PRECONDITION naming the mismatch). Afterwards
a watcher polls Triton's `is_model_ready`: while Triton is down or reloading, `ready()` is
False (health NOT_SERVING, RPCs fail at once with UNAVAILABLE naming the target) and when it
returns the metadata is checked again and serving resumes without a restart.

Batching is Triton's: `needs_batching` is False, so the embedding service sends concurrent
chunks of at most `max_batch_size` rows and Triton's dynamic batcher merges them; stacking our
batcher's queue on top would only add latency.

Model identity for `Info` (arch, checksum, untrained): Triton does not know them, so they are
read from the exporter's metadata.json in the local `--model-repository` (the same repository
Triton serves, e.g. a shared volume in docker/compose.yaml). Without a local copy they are
reported as "unknown" and the tensor contract is taken from Triton alone.

The input channel order comes from the served config's `channel_order` parameter (what the
exporter writes), else from the local metadata.json, else BGR (exports that predate it); a
local copy that disagrees with Triton is refused like a tensor mismatch.

The input datatype comes from Triton's model metadata: FP32 (the server sends normalised
floats) or UINT8 (an `adaface-export --input-dtype uint8` model normalises inside its graph,
and the server sends the raw pixels: 37,632 instead of 150,528 bytes per image). Any other
datatype is refused at start, as is a local metadata.json that records another input dtype.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Settings
from ..errors import (
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    ResourceExhausted,
    Unavailable,
)
from ..models.repository import (
    CHANNEL_ORDER_PARAMETER,
    CHANNEL_ORDERS,
    EMBEDDING_DIM,
    EMBEDDING_NAME,
    INPUT_DIMS,
    INPUT_NAME,
    NORM_NAME,
    TRITON_DATATYPES,
    ModelRepositoryError,
    ModelSpec,
    input_contract,
    input_dtype_of_datatype,
    load_model_spec,
)
from ..request_context import time_left
from .base import LoadedModel

log = logging.getLogger(__name__)

UNKNOWN_METADATA = {"arch": "unknown", "model_sha256": "unknown", "weights": "unknown"}
# gRPC statuses meaning "Triton (or the model) is not there right now": retryable, not a bug.
_GONE = {"StatusCode.UNAVAILABLE", "StatusCode.NOT_FOUND", "StatusCode.CANCELLED"}
MAX_MESSAGE_BYTES = 2**31 - 1


class TritonBackend(LoadedModel):
    """Runs the model on a Triton server; see the module docstring for the state machine."""

    name = "triton"
    needs_batching = False

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._url = settings.triton_url
        self.target = f"Triton at {self._url}"
        self._version = settings.triton_model_version
        self._client: Any = None
        self._reason = "not connected yet"
        self._wake = asyncio.Event()
        self._watcher: asyncio.Task | None = None
        self._outputs: list[Any] = []

    # -- Backend protocol ----------------------------------------------------------------

    async def load(self) -> None:
        """Connects, checks the model against the contract and starts the readiness watcher.

        Raises Unavailable while Triton or the model is not up (the caller retries) and
        FailedPrecondition when the served model does not match what this server sends.
        """
        if self._client is None:
            self._client = self._connect()
        await self._check_model()
        self._ready = True
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(), name="triton-readiness")

    async def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self._ready:
            raise Unavailable(self._unavailable_message())
        from tritonclient.grpc import InferInput
        from tritonclient.utils import InferenceServerException

        spec = self.spec
        if spec.input_dtype == "uint8":
            if batch.dtype != np.uint8:
                # Casting normalised floats to uint8 would send garbage: our bug, loudly.
                log.error("a %s batch for the UINT8 input of %s", batch.dtype, spec.name)
                raise Internal("internal error: the model backend rejected the request")
            data = np.ascontiguousarray(batch)
        else:
            data = np.ascontiguousarray(batch, dtype=np.float32)
        tensor = InferInput(spec.input_name, list(batch.shape), TRITON_DATATYPES[spec.input_dtype])
        tensor.set_data_from_numpy(data)
        # Never wait on Triton past the deadline of the caller these rows belong to.
        limit = self._settings.triton_timeout_seconds
        timeout = time_left(limit)
        if timeout <= 0:
            raise DeadlineExceeded("deadline exceeded before inference on Triton")
        try:
            result = await self._client.infer(
                spec.name,
                [tensor],
                model_version=self._version,
                outputs=self._outputs,
                client_timeout=timeout,
            )
        except InferenceServerException as exc:
            if timeout < limit and exc.status() == "StatusCode.DEADLINE_EXCEEDED":
                raise DeadlineExceeded("deadline exceeded waiting for Triton") from None
            raise self._translate(exc, len(batch)) from None
        embeddings = result.as_numpy(spec.embedding_name)
        norms = result.as_numpy(spec.norm_name)
        n = len(batch)
        if (
            embeddings is None
            or norms is None
            or embeddings.shape != (n, spec.embedding_dim)
            or norms.shape != (n, 1)
        ):
            log.error(
                "%s returned unexpected outputs for a batch of %d: %s %s, %s %s",
                self.target,
                n,
                spec.embedding_name,
                None if embeddings is None else embeddings.shape,
                spec.norm_name,
                None if norms is None else norms.shape,
            )
            raise Internal("internal error: the model backend returned malformed outputs")
        return embeddings.astype(np.float32, copy=False), norms.astype(np.float32, copy=False)

    async def close(self) -> None:
        self._ready = False
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        if self._client is not None:
            await self._client.close()
            self._client = None

    # -- connection and model checks -----------------------------------------------------

    def _connect(self) -> Any:
        from tritonclient.grpc.aio import InferenceServerClient

        s = self._settings
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            # gRPC's default reconnect backoff grows to 2 minutes: after a Triton restart
            # the model would stay unreachable long after it is back.
            ("grpc.initial_reconnect_backoff_ms", 250),
            ("grpc.min_reconnect_backoff_ms", 250),
            ("grpc.max_reconnect_backoff_ms", max(250, int(s.triton_check_seconds * 1000))),
            # Notice a silently dead peer (e.g. a vanished container) between requests.
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        tls_files = {
            "--triton-root-certificates": s.triton_root_certificates,
            "--triton-private-key": s.triton_private_key,
            "--triton-certificate-chain": s.triton_certificate_chain,
        }
        for flag, path in tls_files.items():
            if path and not Path(path).is_file():
                raise FailedPrecondition(f"{flag} {path}: no such file")
        return InferenceServerClient(
            self._url,
            ssl=s.triton_tls,
            root_certificates=s.triton_root_certificates or None,
            private_key=s.triton_private_key or None,
            certificate_chain=s.triton_certificate_chain or None,
            channel_args=options,
        )

    async def _check_model(self) -> None:
        """Reads Triton's view of the model and adopts it if it matches the contract."""
        from tritonclient.utils import InferenceServerException

        name = self._settings.model
        timeout = self._settings.triton_connect_timeout_seconds
        try:
            if not await self._client.is_model_ready(name, self._version, client_timeout=timeout):
                raise Unavailable(await self._not_ready_message(name))
            metadata = await self._client.get_model_metadata(
                name, self._version, client_timeout=timeout
            )
            config = (
                await self._client.get_model_config(name, self._version, client_timeout=timeout)
            ).config
        except InferenceServerException as exc:
            raise Unavailable(f"{self.target} is unreachable: {_reason(exc)}") from None
        self._spec = self._adopt(metadata, config)

    async def _not_ready_message(self, name: str) -> str:
        version = f" version {self._version}" if self._version else ""
        message = f"model {name!r}{version} is not ready on {self.target}"
        with contextlib.suppress(Exception):
            index = await self._client.get_model_repository_index(
                client_timeout=self._settings.triton_connect_timeout_seconds
            )
            models = sorted(
                f"{m.name}:{m.version or '?'} {m.state or 'UNKNOWN'}" for m in index.models
            )
            message += f" (Triton's repository holds: {', '.join(models) or 'nothing'})"
        return message

    def _local_spec(self) -> ModelSpec | None:
        try:
            return load_model_spec(self._settings.model_repository, self._settings.model)
        except ModelRepositoryError as exc:
            log.warning(
                "no local copy of model %r (%s): Info reports arch and checksum as unknown",
                self._settings.model,
                exc,
            )
            return None

    def _adopt(self, metadata: Any, config: Any) -> ModelSpec:
        """A ModelSpec from Triton's metadata, or FailedPrecondition listing every mismatch."""
        local = self._local_spec()
        input_name = local.input_name if local else INPUT_NAME
        embedding_name = local.embedding_name if local else EMBEDDING_NAME
        norm_name = local.norm_name if local else NORM_NAME
        input_dims = local.input_dims if local else INPUT_DIMS
        embedding_dim = local.embedding_dim if local else EMBEDDING_DIM
        expected = {
            ("input", input_name): [-1, *input_dims],
            ("output", embedding_name): [-1, embedding_dim],
            ("output", norm_name): [-1, 1],
        }
        served = {("input", t.name): t for t in metadata.inputs}
        served.update({("output", t.name): t for t in metadata.outputs})
        problems = []
        input_dtype = None
        if config.max_batch_size < 1:
            problems.append(
                f"max_batch_size is {config.max_batch_size}; the model must batch along dim 0"
            )
        for key, shape in expected.items():
            kind, tensor_name = key
            tensor = served.get(key)
            if tensor is None:
                present = ", ".join(n for k, n in served if k == kind) or "none"
                problems.append(f"no {kind} named {tensor_name} (has: {present})")
                continue
            if kind == "input":
                input_dtype = input_dtype_of_datatype(tensor.datatype)
                if input_dtype is None:
                    problems.append(
                        f"input {tensor_name} is {tensor.datatype}, expected FP32 or UINT8 "
                        "(adaface-export --input-dtype fp32|uint8)"
                    )
                elif local is not None and input_dtype != local.input_dtype:
                    problems.append(
                        f"input {tensor_name} is {tensor.datatype} but the local metadata.json "
                        f"says input_dtype {local.input_dtype!r}"
                    )
            elif tensor.datatype != "FP32":
                problems.append(f"{kind} {tensor_name} is {tensor.datatype}, expected FP32")
            if list(tensor.shape) != shape:
                problems.append(
                    f"{kind} {tensor_name} shape is {list(tensor.shape)}, expected {shape}"
                )
        channel_order = local.channel_order if local else None
        served_order = config.parameters.get(CHANNEL_ORDER_PARAMETER)
        if served_order is not None:
            order = served_order.string_value
            if order not in CHANNEL_ORDERS:
                problems.append(
                    f"parameter {CHANNEL_ORDER_PARAMETER} is {order!r}, expected one of "
                    f"{', '.join(CHANNEL_ORDERS)}"
                )
            elif channel_order is not None and order != channel_order:
                problems.append(
                    f"parameter {CHANNEL_ORDER_PARAMETER} is {order!r} but the local "
                    f"metadata.json says {channel_order!r}"
                )
            channel_order = order
        if problems:
            raise FailedPrecondition(
                f"model {metadata.name!r} on {self.target} does not match what this server "
                f"sends and expects: {'; '.join(problems)}"
            )
        if not config.HasField("dynamic_batching"):
            log.warning(
                "model %r on %s has no dynamic_batching: concurrent requests will not be merged",
                metadata.name,
                self.target,
            )
        versions = [int(v) for v in metadata.versions if v.isdigit()]
        if local is not None and versions and local.version not in versions:
            log.warning(
                "%s serves %s versions %s but the local repository holds version %d: "
                "Info's checksum may not describe the served model",
                self.target,
                metadata.name,
                versions,
                local.version,
            )
        if local is not None and local.max_batch_size != config.max_batch_size:
            log.warning(
                "%s serves %s with max_batch_size %d, the local config.pbtxt says %d; "
                "using Triton's",
                self.target,
                metadata.name,
                config.max_batch_size,
                local.max_batch_size,
            )
        from tritonclient.grpc import InferRequestedOutput

        self._outputs = [InferRequestedOutput(embedding_name), InferRequestedOutput(norm_name)]
        return ModelSpec(
            name=self._settings.model,
            version=local.version if local else (max(versions) if versions else 0),
            input_name=input_name,
            input_dims=tuple(input_dims),
            embedding_name=embedding_name,
            norm_name=norm_name,
            embedding_dim=embedding_dim,
            max_batch_size=int(config.max_batch_size),
            model_dir=local.model_dir if local else Path(),
            metadata={
                **(local.metadata if local else UNKNOWN_METADATA),
                "input": input_contract(channel_order or "BGR"),
                "input_dtype": input_dtype,
            },
        )

    # -- readiness -----------------------------------------------------------------------

    async def _watch(self) -> None:
        """Follows Triton's readiness; woken early when an inference call hit a dead Triton."""
        from tritonclient.utils import InferenceServerException

        name = self._settings.model
        timeout = self._settings.triton_connect_timeout_seconds
        last_refusal = None
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._settings.triton_check_seconds)
            self._wake.clear()
            try:
                if self._ready:
                    ok = await self._client.is_model_ready(
                        name, self._version, client_timeout=timeout
                    )
                    if not ok:
                        self._mark_down(await self._not_ready_message(name))
                else:
                    await self._check_model()
                    self._ready = True
                    last_refusal = None
                    log.info("%s serves model %r again: back to SERVING", self.target, name)
            except InferenceServerException as exc:
                self._mark_down(f"{self.target} is unreachable: {_reason(exc)}")
            except Unavailable as exc:
                self._mark_down(str(exc))
            except FailedPrecondition as exc:
                self._mark_down(str(exc))
                if str(exc) != last_refusal:
                    log.error("refusing the model Triton now serves: %s", exc)
                    last_refusal = str(exc)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("checking %s failed", self.target)

    def _mark_down(self, reason: str) -> None:
        if self._ready:
            log.warning(
                "%s lost: %s; health is NOT_SERVING and requests fail with UNAVAILABLE "
                "until it is back",
                self.target,
                reason,
            )
        self._ready = False
        self._reason = reason

    def _unavailable_message(self) -> str:
        return f"model {self._settings.model!r} is unavailable: {self._reason}"

    def _translate(self, exc: Any, rows: int) -> Exception:
        """Maps a failed Triton call to our errors; nothing here is the caller's fault."""
        status = exc.status() or ""
        if status in _GONE:
            # Let the watcher decide whether Triton is gone, at once rather than next tick.
            self._wake.set()
            return Unavailable(f"{self.target} is unavailable: {_reason(exc)}")
        if status == "StatusCode.DEADLINE_EXCEEDED":
            return Unavailable(
                f"{self.target} did not answer within {self._settings.triton_timeout_seconds:g}s "
                "(triton_timeout_seconds)"
            )
        if status == "StatusCode.RESOURCE_EXHAUSTED":
            return ResourceExhausted(f"{self.target} is overloaded: {_reason(exc)}")
        # Anything else means Triton rejected the tensor this server built: our bug, not the
        # caller's, so it is logged in full and reported as INTERNAL.
        log.error("%s rejected a batch of %d rows: %s %s", self.target, rows, status, exc)
        return Internal("internal error: the model backend rejected the request")


def _reason(exc: Any) -> str:
    message = exc.message() if hasattr(exc, "message") else str(exc)
    status = exc.status() if hasattr(exc, "status") else None
    text = f"{status.removeprefix('StatusCode.')}: {message}" if status else str(message)
    # gRPC connection errors carry long debug strings; the first line says enough.
    return text.splitlines()[0][:300] if text else type(exc).__name__
