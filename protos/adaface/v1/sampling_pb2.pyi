from adaface.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SamplingOptions(_message.Message):
    __slots__ = ("batch_size", "num_instance", "seed", "epoch", "dim", "flip_fusion", "first_pass_in_order")
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    FLIP_FUSION_FIELD_NUMBER: _ClassVar[int]
    FIRST_PASS_IN_ORDER_FIELD_NUMBER: _ClassVar[int]
    batch_size: int
    num_instance: int
    seed: int
    epoch: int
    dim: int
    flip_fusion: bool
    first_pass_in_order: bool
    def __init__(self, batch_size: _Optional[int] = ..., num_instance: _Optional[int] = ..., seed: _Optional[int] = ..., epoch: _Optional[int] = ..., dim: _Optional[int] = ..., flip_fusion: _Optional[bool] = ..., first_pass_in_order: _Optional[bool] = ...) -> None: ...

class IdentityRecord(_message.Message):
    __slots__ = ("pid", "sample_count", "cursor", "vector", "image")
    PID_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    pid: str
    sample_count: int
    cursor: int
    vector: bytes
    image: _common_pb2.ImageInput
    def __init__(self, pid: _Optional[str] = ..., sample_count: _Optional[int] = ..., cursor: _Optional[int] = ..., vector: _Optional[bytes] = ..., image: _Optional[_Union[_common_pb2.ImageInput, _Mapping]] = ...) -> None: ...

class BuildEpochRequest(_message.Message):
    __slots__ = ("options", "identities")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    IDENTITIES_FIELD_NUMBER: _ClassVar[int]
    options: SamplingOptions
    identities: _containers.RepeatedCompositeFieldContainer[IdentityRecord]
    def __init__(self, options: _Optional[_Union[SamplingOptions, _Mapping]] = ..., identities: _Optional[_Iterable[_Union[IdentityRecord, _Mapping]]] = ...) -> None: ...

class EpochHeader(_message.Message):
    __slots__ = ("num_identities", "num_samples", "length", "num_batches", "batch_size", "num_instance", "position_bytes", "knn_precision", "model_name")
    NUM_IDENTITIES_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    NUM_BATCHES_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    POSITION_BYTES_FIELD_NUMBER: _ClassVar[int]
    KNN_PRECISION_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    num_identities: int
    num_samples: int
    length: int
    num_batches: int
    batch_size: int
    num_instance: int
    position_bytes: int
    knn_precision: str
    model_name: str
    def __init__(self, num_identities: _Optional[int] = ..., num_samples: _Optional[int] = ..., length: _Optional[int] = ..., num_batches: _Optional[int] = ..., batch_size: _Optional[int] = ..., num_instance: _Optional[int] = ..., position_bytes: _Optional[int] = ..., knn_precision: _Optional[str] = ..., model_name: _Optional[str] = ...) -> None: ...

class BuildEpochResponse(_message.Message):
    __slots__ = ("header", "positions", "cursors")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    CURSORS_FIELD_NUMBER: _ClassVar[int]
    header: EpochHeader
    positions: bytes
    cursors: bytes
    def __init__(self, header: _Optional[_Union[EpochHeader, _Mapping]] = ..., positions: _Optional[bytes] = ..., cursors: _Optional[bytes] = ...) -> None: ...
