from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Alignment(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALIGNMENT_UNSPECIFIED: _ClassVar[Alignment]
    ALIGNMENT_ALIGNED: _ClassVar[Alignment]
    ALIGNMENT_LANDMARKS: _ClassVar[Alignment]
    ALIGNMENT_DETECT: _ClassVar[Alignment]

class FaceSelection(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FACE_SELECTION_UNSPECIFIED: _ClassVar[FaceSelection]
    FACE_SELECTION_BEST: _ClassVar[FaceSelection]
    FACE_SELECTION_LARGEST: _ClassVar[FaceSelection]
    FACE_SELECTION_ALL: _ClassVar[FaceSelection]

class AlignMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALIGN_METHOD_UNSPECIFIED: _ClassVar[AlignMethod]
    ALIGN_METHOD_ADAFACE: _ClassVar[AlignMethod]
    ALIGN_METHOD_INSIGHTFACE: _ClassVar[AlignMethod]
ALIGNMENT_UNSPECIFIED: Alignment
ALIGNMENT_ALIGNED: Alignment
ALIGNMENT_LANDMARKS: Alignment
ALIGNMENT_DETECT: Alignment
FACE_SELECTION_UNSPECIFIED: FaceSelection
FACE_SELECTION_BEST: FaceSelection
FACE_SELECTION_LARGEST: FaceSelection
FACE_SELECTION_ALL: FaceSelection
ALIGN_METHOD_UNSPECIFIED: AlignMethod
ALIGN_METHOD_ADAFACE: AlignMethod
ALIGN_METHOD_INSIGHTFACE: AlignMethod

class RawImage(_message.Message):
    __slots__ = ("height", "width", "data")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    data: bytes
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class ImageInput(_message.Message):
    __slots__ = ("encoded", "raw", "alignment", "landmarks")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    ALIGNMENT_FIELD_NUMBER: _ClassVar[int]
    LANDMARKS_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    raw: RawImage
    alignment: Alignment
    landmarks: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, encoded: _Optional[bytes] = ..., raw: _Optional[_Union[RawImage, _Mapping]] = ..., alignment: _Optional[_Union[Alignment, str]] = ..., landmarks: _Optional[_Iterable[float]] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("vector", "dim", "norm")
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    NORM_FIELD_NUMBER: _ClassVar[int]
    vector: bytes
    dim: int
    norm: float
    def __init__(self, vector: _Optional[bytes] = ..., dim: _Optional[int] = ..., norm: _Optional[float] = ...) -> None: ...

class ImageError(_message.Message):
    __slots__ = ("reason", "message")
    class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        REASON_UNSPECIFIED: _ClassVar[ImageError.Reason]
        REASON_UNDECODABLE: _ClassVar[ImageError.Reason]
        REASON_TOO_MANY_BYTES: _ClassVar[ImageError.Reason]
        REASON_TOO_MANY_PIXELS: _ClassVar[ImageError.Reason]
        REASON_NOT_ALIGNED: _ClassVar[ImageError.Reason]
        REASON_ALIGNMENT_FAILED: _ClassVar[ImageError.Reason]
        REASON_NO_FACE: _ClassVar[ImageError.Reason]
    REASON_UNSPECIFIED: ImageError.Reason
    REASON_UNDECODABLE: ImageError.Reason
    REASON_TOO_MANY_BYTES: ImageError.Reason
    REASON_TOO_MANY_PIXELS: ImageError.Reason
    REASON_NOT_ALIGNED: ImageError.Reason
    REASON_ALIGNMENT_FAILED: ImageError.Reason
    REASON_NO_FACE: ImageError.Reason
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    reason: ImageError.Reason
    message: str
    def __init__(self, reason: _Optional[_Union[ImageError.Reason, str]] = ..., message: _Optional[str] = ...) -> None: ...

class DetectOptions(_message.Message):
    __slots__ = ("selection", "min_face_size", "min_score", "return_aligned", "upstream_softmax", "align_method")
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    MIN_FACE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    RETURN_ALIGNED_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_SOFTMAX_FIELD_NUMBER: _ClassVar[int]
    ALIGN_METHOD_FIELD_NUMBER: _ClassVar[int]
    selection: FaceSelection
    min_face_size: float
    min_score: float
    return_aligned: bool
    upstream_softmax: bool
    align_method: AlignMethod
    def __init__(self, selection: _Optional[_Union[FaceSelection, str]] = ..., min_face_size: _Optional[float] = ..., min_score: _Optional[float] = ..., return_aligned: _Optional[bool] = ..., upstream_softmax: _Optional[bool] = ..., align_method: _Optional[_Union[AlignMethod, str]] = ...) -> None: ...

class DetectedFace(_message.Message):
    __slots__ = ("box", "score", "landmarks", "embedding", "aligned_png")
    BOX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    LANDMARKS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    ALIGNED_PNG_FIELD_NUMBER: _ClassVar[int]
    box: _containers.RepeatedScalarFieldContainer[float]
    score: float
    landmarks: _containers.RepeatedScalarFieldContainer[float]
    embedding: Embedding
    aligned_png: bytes
    def __init__(self, box: _Optional[_Iterable[float]] = ..., score: _Optional[float] = ..., landmarks: _Optional[_Iterable[float]] = ..., embedding: _Optional[_Union[Embedding, _Mapping]] = ..., aligned_png: _Optional[bytes] = ...) -> None: ...

class StreamError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...
