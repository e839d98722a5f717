from adaface.v1 import common_pb2 as _common_pb2
from adaface.v1 import embedder_pb2 as _embedder_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Scoring(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCORING_UNSPECIFIED: _ClassVar[Scoring]
    SCORING_MAX: _ClassVar[Scoring]
    SCORING_MEAN: _ClassVar[Scoring]

class EnrollMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENROLL_MODE_UNSPECIFIED: _ClassVar[EnrollMode]
    ENROLL_MODE_CREATE: _ClassVar[EnrollMode]
    ENROLL_MODE_APPEND: _ClassVar[EnrollMode]
    ENROLL_MODE_UPSERT: _ClassVar[EnrollMode]

class ImportFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMPORT_FORMAT_UNSPECIFIED: _ClassVar[ImportFormat]
    IMPORT_FORMAT_NATIVE: _ClassVar[ImportFormat]
    IMPORT_FORMAT_SEED_PTH: _ClassVar[ImportFormat]
SCORING_UNSPECIFIED: Scoring
SCORING_MAX: Scoring
SCORING_MEAN: Scoring
ENROLL_MODE_UNSPECIFIED: EnrollMode
ENROLL_MODE_CREATE: EnrollMode
ENROLL_MODE_APPEND: EnrollMode
ENROLL_MODE_UPSERT: EnrollMode
IMPORT_FORMAT_UNSPECIFIED: ImportFormat
IMPORT_FORMAT_NATIVE: ImportFormat
IMPORT_FORMAT_SEED_PTH: ImportFormat

class GalleryInfo(_message.Message):
    __slots__ = ("name", "model_checksum", "model_name", "dim", "identity_count", "sample_count", "created_at", "metadata", "index", "dtype", "index_bytes")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_COUNT_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    INDEX_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    model_checksum: str
    model_name: str
    dim: int
    identity_count: int
    sample_count: int
    created_at: float
    metadata: _containers.ScalarMap[str, str]
    index: str
    dtype: str
    index_bytes: int
    def __init__(self, name: _Optional[str] = ..., model_checksum: _Optional[str] = ..., model_name: _Optional[str] = ..., dim: _Optional[int] = ..., identity_count: _Optional[int] = ..., sample_count: _Optional[int] = ..., created_at: _Optional[float] = ..., metadata: _Optional[_Mapping[str, str]] = ..., index: _Optional[str] = ..., dtype: _Optional[str] = ..., index_bytes: _Optional[int] = ...) -> None: ...

class CreateGalleryRequest(_message.Message):
    __slots__ = ("name", "model_checksum", "dim", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    model_checksum: str
    dim: int
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., model_checksum: _Optional[str] = ..., dim: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GetGalleryRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListGalleriesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListGalleriesResponse(_message.Message):
    __slots__ = ("galleries",)
    GALLERIES_FIELD_NUMBER: _ClassVar[int]
    galleries: _containers.RepeatedCompositeFieldContainer[GalleryInfo]
    def __init__(self, galleries: _Optional[_Iterable[_Union[GalleryInfo, _Mapping]]] = ...) -> None: ...

class DeleteGalleryRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteGalleryResponse(_message.Message):
    __slots__ = ("identities_removed", "samples_removed")
    IDENTITIES_REMOVED_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_REMOVED_FIELD_NUMBER: _ClassVar[int]
    identities_removed: int
    samples_removed: int
    def __init__(self, identities_removed: _Optional[int] = ..., samples_removed: _Optional[int] = ...) -> None: ...

class GallerySample(_message.Message):
    __slots__ = ("image", "vector")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    image: _common_pb2.ImageInput
    vector: _common_pb2.Embedding
    def __init__(self, image: _Optional[_Union[_common_pb2.ImageInput, _Mapping]] = ..., vector: _Optional[_Union[_common_pb2.Embedding, _Mapping]] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("request_id", "gallery", "identity", "metadata", "samples", "mode", "options", "model_checksum")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    gallery: str
    identity: str
    metadata: _containers.ScalarMap[str, str]
    samples: _containers.RepeatedCompositeFieldContainer[GallerySample]
    mode: EnrollMode
    options: _embedder_pb2.EmbedOptions
    model_checksum: str
    def __init__(self, request_id: _Optional[str] = ..., gallery: _Optional[str] = ..., identity: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., samples: _Optional[_Iterable[_Union[GallerySample, _Mapping]]] = ..., mode: _Optional[_Union[EnrollMode, str]] = ..., options: _Optional[_Union[_embedder_pb2.EmbedOptions, _Mapping]] = ..., model_checksum: _Optional[str] = ...) -> None: ...

class EnrollSampleResult(_message.Message):
    __slots__ = ("index", "sample_id", "error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    sample_id: int
    error: _common_pb2.ImageError
    def __init__(self, index: _Optional[int] = ..., sample_id: _Optional[int] = ..., error: _Optional[_Union[_common_pb2.ImageError, _Mapping]] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("request_id", "identity", "samples", "sample_count", "created", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    identity: str
    samples: _containers.RepeatedCompositeFieldContainer[EnrollSampleResult]
    sample_count: int
    created: bool
    error: _common_pb2.StreamError
    def __init__(self, request_id: _Optional[str] = ..., identity: _Optional[str] = ..., samples: _Optional[_Iterable[_Union[EnrollSampleResult, _Mapping]]] = ..., sample_count: _Optional[int] = ..., created: _Optional[bool] = ..., error: _Optional[_Union[_common_pb2.StreamError, _Mapping]] = ...) -> None: ...

class RemoveSamplesRequest(_message.Message):
    __slots__ = ("gallery", "sample_ids")
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    gallery: str
    sample_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, gallery: _Optional[str] = ..., sample_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class RemoveIdentityRequest(_message.Message):
    __slots__ = ("gallery", "identity")
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    gallery: str
    identity: str
    def __init__(self, gallery: _Optional[str] = ..., identity: _Optional[str] = ...) -> None: ...

class RemoveResponse(_message.Message):
    __slots__ = ("identities_removed", "samples_removed")
    IDENTITIES_REMOVED_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_REMOVED_FIELD_NUMBER: _ClassVar[int]
    identities_removed: int
    samples_removed: int
    def __init__(self, identities_removed: _Optional[int] = ..., samples_removed: _Optional[int] = ...) -> None: ...

class GalleryStoredSample(_message.Message):
    __slots__ = ("sample_id", "vector", "created_at")
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    sample_id: int
    vector: _common_pb2.Embedding
    created_at: float
    def __init__(self, sample_id: _Optional[int] = ..., vector: _Optional[_Union[_common_pb2.Embedding, _Mapping]] = ..., created_at: _Optional[float] = ...) -> None: ...

class GalleryIdentity(_message.Message):
    __slots__ = ("identity", "metadata", "sample_count", "created_at", "samples")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    identity: str
    metadata: _containers.ScalarMap[str, str]
    sample_count: int
    created_at: float
    samples: _containers.RepeatedCompositeFieldContainer[GalleryStoredSample]
    def __init__(self, identity: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., sample_count: _Optional[int] = ..., created_at: _Optional[float] = ..., samples: _Optional[_Iterable[_Union[GalleryStoredSample, _Mapping]]] = ...) -> None: ...

class GetIdentityRequest(_message.Message):
    __slots__ = ("gallery", "identity", "include_vectors")
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_VECTORS_FIELD_NUMBER: _ClassVar[int]
    gallery: str
    identity: str
    include_vectors: bool
    def __init__(self, gallery: _Optional[str] = ..., identity: _Optional[str] = ..., include_vectors: _Optional[bool] = ...) -> None: ...

class ListIdentitiesRequest(_message.Message):
    __slots__ = ("gallery", "page_size", "page_token")
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    gallery: str
    page_size: int
    page_token: str
    def __init__(self, gallery: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListIdentitiesResponse(_message.Message):
    __slots__ = ("identities", "next_page_token")
    IDENTITIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    identities: _containers.RepeatedCompositeFieldContainer[GalleryIdentity]
    next_page_token: str
    def __init__(self, identities: _Optional[_Iterable[_Union[GalleryIdentity, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("gallery", "probes", "top_k", "min_score", "scoring", "options", "model_checksum")
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    PROBES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    SCORING_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    gallery: str
    probes: _containers.RepeatedCompositeFieldContainer[GallerySample]
    top_k: int
    min_score: float
    scoring: Scoring
    options: _embedder_pb2.EmbedOptions
    model_checksum: str
    def __init__(self, gallery: _Optional[str] = ..., probes: _Optional[_Iterable[_Union[GallerySample, _Mapping]]] = ..., top_k: _Optional[int] = ..., min_score: _Optional[float] = ..., scoring: _Optional[_Union[Scoring, str]] = ..., options: _Optional[_Union[_embedder_pb2.EmbedOptions, _Mapping]] = ..., model_checksum: _Optional[str] = ...) -> None: ...

class GalleryMatch(_message.Message):
    __slots__ = ("identity", "score", "sample_id")
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    identity: str
    score: float
    sample_id: int
    def __init__(self, identity: _Optional[str] = ..., score: _Optional[float] = ..., sample_id: _Optional[int] = ...) -> None: ...

class SearchResult(_message.Message):
    __slots__ = ("index", "matches", "error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    matches: _containers.RepeatedCompositeFieldContainer[GalleryMatch]
    error: _common_pb2.ImageError
    def __init__(self, index: _Optional[int] = ..., matches: _Optional[_Iterable[_Union[GalleryMatch, _Mapping]]] = ..., error: _Optional[_Union[_common_pb2.ImageError, _Mapping]] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("results", "searched_identities")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    SEARCHED_IDENTITIES_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SearchResult]
    searched_identities: int
    def __init__(self, results: _Optional[_Iterable[_Union[SearchResult, _Mapping]]] = ..., searched_identities: _Optional[int] = ...) -> None: ...

class VerifyOperand(_message.Message):
    __slots__ = ("image", "vector", "identity")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    image: _common_pb2.ImageInput
    vector: _common_pb2.Embedding
    identity: str
    def __init__(self, image: _Optional[_Union[_common_pb2.ImageInput, _Mapping]] = ..., vector: _Optional[_Union[_common_pb2.Embedding, _Mapping]] = ..., identity: _Optional[str] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("gallery", "a", "b", "threshold", "scoring", "options", "model_checksum")
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SCORING_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    gallery: str
    a: VerifyOperand
    b: VerifyOperand
    threshold: float
    scoring: Scoring
    options: _embedder_pb2.EmbedOptions
    model_checksum: str
    def __init__(self, gallery: _Optional[str] = ..., a: _Optional[_Union[VerifyOperand, _Mapping]] = ..., b: _Optional[_Union[VerifyOperand, _Mapping]] = ..., threshold: _Optional[float] = ..., scoring: _Optional[_Union[Scoring, str]] = ..., options: _Optional[_Union[_embedder_pb2.EmbedOptions, _Mapping]] = ..., model_checksum: _Optional[str] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("score", "match", "threshold", "a_sample_id", "b_sample_id")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    MATCH_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    A_SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    B_SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    score: float
    match: bool
    threshold: float
    a_sample_id: int
    b_sample_id: int
    def __init__(self, score: _Optional[float] = ..., match: _Optional[bool] = ..., threshold: _Optional[float] = ..., a_sample_id: _Optional[int] = ..., b_sample_id: _Optional[int] = ...) -> None: ...

class ExportRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ExportChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class ImportHeader(_message.Message):
    __slots__ = ("name", "format", "model_checksum")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    MODEL_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    name: str
    format: ImportFormat
    model_checksum: str
    def __init__(self, name: _Optional[str] = ..., format: _Optional[_Union[ImportFormat, str]] = ..., model_checksum: _Optional[str] = ...) -> None: ...

class ImportRequest(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: ImportHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[ImportHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...
