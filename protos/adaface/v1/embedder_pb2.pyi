from adaface.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EmbedOptions(_message.Message):
    __slots__ = ("flip_fusion", "detection")
    FLIP_FUSION_FIELD_NUMBER: _ClassVar[int]
    DETECTION_FIELD_NUMBER: _ClassVar[int]
    flip_fusion: bool
    detection: _common_pb2.DetectOptions
    def __init__(self, flip_fusion: _Optional[bool] = ..., detection: _Optional[_Union[_common_pb2.DetectOptions, _Mapping]] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("request_id", "images", "options")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.ImageInput]
    options: EmbedOptions
    def __init__(self, request_id: _Optional[str] = ..., images: _Optional[_Iterable[_Union[_common_pb2.ImageInput, _Mapping]]] = ..., options: _Optional[_Union[EmbedOptions, _Mapping]] = ...) -> None: ...

class EmbedResult(_message.Message):
    __slots__ = ("index", "embedding", "error", "faces")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FACES_FIELD_NUMBER: _ClassVar[int]
    index: int
    embedding: _common_pb2.Embedding
    error: _common_pb2.ImageError
    faces: _containers.RepeatedCompositeFieldContainer[_common_pb2.DetectedFace]
    def __init__(self, index: _Optional[int] = ..., embedding: _Optional[_Union[_common_pb2.Embedding, _Mapping]] = ..., error: _Optional[_Union[_common_pb2.ImageError, _Mapping]] = ..., faces: _Optional[_Iterable[_Union[_common_pb2.DetectedFace, _Mapping]]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("request_id", "results", "model_name", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    results: _containers.RepeatedCompositeFieldContainer[EmbedResult]
    model_name: str
    error: _common_pb2.StreamError
    def __init__(self, request_id: _Optional[str] = ..., results: _Optional[_Iterable[_Union[EmbedResult, _Mapping]]] = ..., model_name: _Optional[str] = ..., error: _Optional[_Union[_common_pb2.StreamError, _Mapping]] = ...) -> None: ...

class DetectRequest(_message.Message):
    __slots__ = ("request_id", "images", "options")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.ImageInput]
    options: _common_pb2.DetectOptions
    def __init__(self, request_id: _Optional[str] = ..., images: _Optional[_Iterable[_Union[_common_pb2.ImageInput, _Mapping]]] = ..., options: _Optional[_Union[_common_pb2.DetectOptions, _Mapping]] = ...) -> None: ...

class DetectResult(_message.Message):
    __slots__ = ("index", "faces", "error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FACES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    faces: _containers.RepeatedCompositeFieldContainer[_common_pb2.DetectedFace]
    error: _common_pb2.ImageError
    def __init__(self, index: _Optional[int] = ..., faces: _Optional[_Iterable[_Union[_common_pb2.DetectedFace, _Mapping]]] = ..., error: _Optional[_Union[_common_pb2.ImageError, _Mapping]] = ...) -> None: ...

class DetectResponse(_message.Message):
    __slots__ = ("request_id", "results")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    results: _containers.RepeatedCompositeFieldContainer[DetectResult]
    def __init__(self, request_id: _Optional[str] = ..., results: _Optional[_Iterable[_Union[DetectResult, _Mapping]]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model_name", "arch", "embedding_dim", "max_batch_size", "max_images_per_request", "max_image_bytes", "max_image_pixels", "backend", "model_checksum", "server_version", "untrained", "weights", "alignments", "device", "precision", "worker_pid", "channel_order")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MODEL_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    UNTRAINED_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    ALIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    WORKER_PID_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_ORDER_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    arch: str
    embedding_dim: int
    max_batch_size: int
    max_images_per_request: int
    max_image_bytes: int
    max_image_pixels: int
    backend: str
    model_checksum: str
    server_version: str
    untrained: bool
    weights: str
    alignments: _containers.RepeatedScalarFieldContainer[_common_pb2.Alignment]
    device: str
    precision: str
    worker_pid: int
    channel_order: str
    def __init__(self, model_name: _Optional[str] = ..., arch: _Optional[str] = ..., embedding_dim: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., max_images_per_request: _Optional[int] = ..., max_image_bytes: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., backend: _Optional[str] = ..., model_checksum: _Optional[str] = ..., server_version: _Optional[str] = ..., untrained: _Optional[bool] = ..., weights: _Optional[str] = ..., alignments: _Optional[_Iterable[_Union[_common_pb2.Alignment, str]]] = ..., device: _Optional[str] = ..., precision: _Optional[str] = ..., worker_pid: _Optional[int] = ..., channel_order: _Optional[str] = ...) -> None: ...
