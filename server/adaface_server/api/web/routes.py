"""The HTTP routes: each one is an RPC of the gRPC API, with the same request and response
messages in their JSON form (proto field names), path and query parameters filling fields."""

from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf.message import Message

from adaface.v1 import common_pb2, embedder_pb2, gallery_pb2

from ..interceptor import ADMIN_METHODS

PACKAGE = "adaface.v1"


@dataclass(frozen=True)
class Route:
    """One HTTP route mapped onto the RPC `service/rpc`."""

    verb: str  # GET, POST, DELETE
    path: str  # aiohttp pattern; {name} fills the request field of that name
    service: str  # Embedder or Gallery
    rpc: str
    request: type[Message]
    response: type[Message]
    summary: str
    #: multipart file field -> where each uploaded file goes in the request ("" = not taken)
    files: dict[str, str] = field(default_factory=dict)
    query: tuple[str, ...] = ()  # request fields also read from the query string

    @property
    def method(self) -> str:
        """The gRPC method name, e.g. /adaface.v1.Gallery/Enroll."""
        return f"/{PACKAGE}.{self.service}/{self.rpc}"

    @property
    def name(self) -> str:
        """Label in metrics and access logs: the RPC name with the transport."""
        return f"http:{self.service}/{self.rpc}"

    @property
    def admin(self) -> bool:
        return self.method in ADMIN_METHODS

    @property
    def body(self) -> bool:
        return self.verb == "POST"


_G = "/v1/galleries"

ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/v1/info",
        "Embedder",
        "Info",
        embedder_pb2.InfoRequest,
        embedder_pb2.InfoResponse,
        "Model name, checksum, embedding size and server limits.",
    ),
    Route(
        "POST",
        "/v1/embed",
        "Embedder",
        "Embed",
        embedder_pb2.EmbedRequest,
        embedder_pb2.EmbedResponse,
        "Embeds images (aligned crops, crops with 5 landmarks, or photos to detect in).",
        files={"image": "images", "images": "images"},
    ),
    Route(
        "POST",
        "/v1/detect",
        "Embedder",
        "Detect",
        embedder_pb2.DetectRequest,
        embedder_pb2.DetectResponse,
        "Finds faces: boxes, scores, landmarks and (options.return_aligned) aligned crops.",
        files={"image": "images", "images": "images"},
    ),
    Route(
        "GET",
        _G,
        "Gallery",
        "ListGalleries",
        gallery_pb2.ListGalleriesRequest,
        gallery_pb2.ListGalleriesResponse,
        "Every gallery with its model and size.",
    ),
    Route(
        "POST",
        _G,
        "Gallery",
        "CreateGallery",
        gallery_pb2.CreateGalleryRequest,
        gallery_pb2.GalleryInfo,
        "Creates a gallery pinned to the served model (admin).",
    ),
    Route(
        "GET",
        _G + "/{name}",
        "Gallery",
        "GetGallery",
        gallery_pb2.GetGalleryRequest,
        gallery_pb2.GalleryInfo,
        "One gallery's model and size.",
    ),
    Route(
        "DELETE",
        _G + "/{name}",
        "Gallery",
        "DeleteGallery",
        gallery_pb2.DeleteGalleryRequest,
        gallery_pb2.DeleteGalleryResponse,
        "Deletes a gallery and everything in it (admin).",
    ),
    Route(
        "POST",
        _G + "/{gallery}/enroll",
        "Gallery",
        "Enroll",
        gallery_pb2.EnrollRequest,
        gallery_pb2.EnrollResponse,
        "Enrolls an identity from images or vectors (admin).",
        files={"image": "samples.image", "samples": "samples.image"},
    ),
    Route(
        "GET",
        _G + "/{gallery}/identities",
        "Gallery",
        "ListIdentities",
        gallery_pb2.ListIdentitiesRequest,
        gallery_pb2.ListIdentitiesResponse,
        "Identities of a gallery, a page at a time (page_size, page_token).",
        query=("page_size", "page_token"),
    ),
    Route(
        "GET",
        _G + "/{gallery}/identities/{identity}",
        "Gallery",
        "GetIdentity",
        gallery_pb2.GetIdentityRequest,
        gallery_pb2.GalleryIdentity,
        "One identity with its samples (include_vectors=true adds their vectors).",
        query=("include_vectors",),
    ),
    Route(
        "DELETE",
        _G + "/{gallery}/identities/{identity}",
        "Gallery",
        "RemoveIdentity",
        gallery_pb2.RemoveIdentityRequest,
        gallery_pb2.RemoveResponse,
        "Removes an identity and its samples (admin).",
    ),
    Route(
        "POST",
        _G + "/{gallery}/remove-samples",
        "Gallery",
        "RemoveSamples",
        gallery_pb2.RemoveSamplesRequest,
        gallery_pb2.RemoveResponse,
        "Removes samples by id (admin).",
    ),
    Route(
        "POST",
        _G + "/{gallery}/search",
        "Gallery",
        "Search",
        gallery_pb2.SearchRequest,
        gallery_pb2.SearchResponse,
        "1:N: the top matching identities for each probe.",
        files={"image": "probes.image", "probes": "probes.image"},
    ),
    Route(
        "POST",
        _G + "/{gallery}/verify",
        "Gallery",
        "Verify",
        gallery_pb2.VerifyRequest,
        gallery_pb2.VerifyResponse,
        "1:1: does a match b (images, vectors or identities)?",
        files={"a": "a.image", "b": "b.image"},
    ),
)

#: Messages whose `vector` bytes are shown as JSON float arrays.
EMBEDDING = common_pb2.Embedding.DESCRIPTOR
