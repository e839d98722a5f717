"""adaface_client: Embedder clients (sync and asyncio), typed errors and AdaFace helpers.

TLS: pass credentials=tls_credentials(ca, certificate, private_key) to any client; a bearer
token: token="..."; use_request_id("...") tags the calls made inside it."""

from adaface_client.client import (
    AdafaceError,
    AlreadyExists,
    AsyncClient,
    Cancelled,
    Client,
    DeadlineExceeded,
    DetectedFace,
    DetectionOptions,
    DetectResult,
    FailedPrecondition,
    ImageErrors,
    ImageResult,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServerInfo,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    from_rpc_error,
    make_image_input,
)
from adaface_client.extract import ExtractionError, Extractor, GatherTimeout
from adaface_client.gallery import (
    EnrollResult,
    GalleryClient,
    GalleryInfo,
    IdentityInfo,
    IdentityRef,
    Match,
    ProbeResult,
    VerifyResult,
)
from adaface_client.manifest import ManifestMismatch
from adaface_client.transport import read_token_file, tls_credentials, use_request_id
from adaface_client.utils import fuse_features_with_norm, l2_norm

__all__ = [
    "AdafaceError",
    "AlreadyExists",
    "AsyncClient",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "DetectResult",
    "DetectedFace",
    "DetectionOptions",
    "EnrollResult",
    "ExtractionError",
    "Extractor",
    "FailedPrecondition",
    "GalleryClient",
    "GalleryInfo",
    "GatherTimeout",
    "GraphSampler",
    "IdentityInfo",
    "IdentityRef",
    "ImageErrors",
    "ImageResult",
    "Internal",
    "InvalidArgument",
    "ManifestMismatch",
    "Match",
    "NotFound",
    "PermissionDenied",
    "ProbeResult",
    "RandomIdentitySampler",
    "ResourceExhausted",
    "ServerInfo",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "VerifyResult",
    "from_rpc_error",
    "fuse_features_with_norm",
    "l2_norm",
    "make_image_input",
    "read_token_file",
    "tls_credentials",
    "use_request_id",
]

# The samplers are torch Samplers: loaded on first use so plain embedding never imports torch.
_LAZY = {
    "GraphSampler": "adaface_client.sampling",
    "RandomIdentitySampler": "adaface_client.sampling",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        try:
            module = importlib.import_module(_LAZY[name])
        except ModuleNotFoundError as e:
            if e.name != "torch":
                raise
            raise ImportError(
                f"adaface_client.{name} is a torch Sampler and needs torch: "
                "pip install 'adaface-client[torch]'"
            ) from e
        return getattr(module, name)
    raise AttributeError(f"module 'adaface_client' has no attribute {name!r}")
