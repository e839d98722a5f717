"""Every Gallery RPC on a real server (ir_18 test model, real SQLite file in tmp_path)."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
import torch

from adaface.v1 import common_pb2, gallery_pb2, gallery_pb2_grpc

from .gallery_support import (
    DIM,
    corrupt_sample,
    crop,
    image_sample,
    png,
    rpc_error,
    unit_vectors,
    vector_sample,
)
from .server_harness import ServerThread, server_settings


@pytest.fixture(scope="module")
def server(ir18_repository, tmp_path_factory):
    repository, name = ir18_repository
    path = tmp_path_factory.mktemp("gallery") / "galleries.sqlite3"
    settings = server_settings(repository, name, gallery_path=path, max_images_per_request=8)
    server = ServerThread(settings).start().wait_serving()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield gallery_pb2_grpc.GalleryStub(channel)


@pytest.fixture(scope="module")
def checksum(server) -> str:
    return server.spec.checksum


def create(stub, name: str, **kw) -> gallery_pb2.GalleryInfo:
    return stub.CreateGallery(gallery_pb2.CreateGalleryRequest(name=name, **kw), timeout=30)


def enroll(stub, gallery: str, identity: str, samples, **kw) -> gallery_pb2.EnrollResponse:
    request = gallery_pb2.EnrollRequest(gallery=gallery, identity=identity, samples=samples, **kw)
    return stub.Enroll(request, timeout=60)


def search(stub, gallery: str, probes, **kw) -> gallery_pb2.SearchResponse:
    request = gallery_pb2.SearchRequest(gallery=gallery, probes=probes, **kw)
    return stub.Search(request, timeout=60)


# -- galleries ------------------------------------------------------------------------------


def test_create_get_list_delete(stub, checksum):
    info = create(stub, "lifecycle", metadata={"site": "lab"})
    assert (info.name, info.model_checksum, info.dim) == ("lifecycle", checksum, DIM)
    assert info.model_name == "adaface_ir18"
    assert (info.identity_count, info.sample_count) == (0, 0)
    assert (info.index, info.dtype) == ("exact", "float32")
    got = stub.GetGallery(gallery_pb2.GetGalleryRequest(name="lifecycle"), timeout=10)
    assert dict(got.metadata) == {"site": "lab"}
    names = [g.name for g in stub.ListGalleries(gallery_pb2.ListGalleriesRequest()).galleries]
    assert "lifecycle" in names and names == sorted(names)
    enroll(stub, "lifecycle", "a", [vector_sample(v) for v in unit_vectors(3, 1)])
    deleted = stub.DeleteGallery(gallery_pb2.DeleteGalleryRequest(name="lifecycle"))
    assert (deleted.identities_removed, deleted.samples_removed) == (1, 3)
    err = rpc_error(stub.GetGallery, gallery_pb2.GetGalleryRequest(name="lifecycle"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == "gallery 'lifecycle' not found"


# -- enrollment ------------------------------------------------------------------------------


def test_enroll_images_and_vectors_reports_bad_images(stub):
    create(stub, "enroll")
    vec = unit_vectors(1, 2)[0] * 3.0  # not unit: the server normalises
    r = enroll(
        stub,
        "enroll",
        "alice",
        [image_sample(1), corrupt_sample(), vector_sample(vec)],
        metadata={"team": "red"},
    )
    assert r.created and r.identity == "alice" and r.sample_count == 2
    assert [s.index for s in r.samples] == [0, 1, 2]
    assert r.samples[0].sample_id and r.samples[2].sample_id and r.samples[1].sample_id == 0
    assert r.samples[1].error.reason == common_pb2.ImageError.REASON_UNDECODABLE
    assert r.samples[1].error.message.startswith("samples[1]")
    ident = stub.GetIdentity(
        gallery_pb2.GetIdentityRequest(gallery="enroll", identity="alice", include_vectors=True)
    )
    assert ident.sample_count == 2 and dict(ident.metadata) == {"team": "red"}
    stored = np.frombuffer(ident.samples[1].vector.vector, "<f4")
    np.testing.assert_allclose(stored, vec / np.linalg.norm(vec), atol=1e-6)


def test_enroll_every_image_failing_enrolls_nothing(stub):
    create(stub, "allbad")
    err = rpc_error(
        stub.Enroll,
        gallery_pb2.EnrollRequest(
            gallery="allbad", identity="bob", samples=[corrupt_sample(), corrupt_sample()]
        ),
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("identity 'bob': no sample could be enrolled: samples[0]")
    info = stub.GetGallery(gallery_pb2.GetGalleryRequest(name="allbad"))
    assert info.identity_count == 0


def test_append_upsert_remove_and_list(stub):
    create(stub, "modes")
    vecs = unit_vectors(6, 3)
    enroll(stub, "modes", "carol", [vector_sample(vecs[0])])
    r = enroll(
        stub,
        "modes",
        "carol",
        [vector_sample(vecs[1])],
        mode=gallery_pb2.ENROLL_MODE_APPEND,
        metadata={"k": "v"},
    )
    assert not r.created and r.sample_count == 2
    r = enroll(stub, "modes", "dave", [vector_sample(vecs[2])], mode=gallery_pb2.ENROLL_MODE_UPSERT)
    assert r.created and r.sample_count == 1
    r = enroll(stub, "modes", "dave", [vector_sample(vecs[3])], mode=gallery_pb2.ENROLL_MODE_UPSERT)
    assert not r.created and r.sample_count == 2
    removed = stub.RemoveSamples(
        gallery_pb2.RemoveSamplesRequest(gallery="modes", sample_ids=[r.samples[0].sample_id])
    )
    assert removed.samples_removed == 1
    hits = search(stub, "modes", [vector_sample(vecs[3])], top_k=5).results[0].matches
    assert all(h.sample_id != r.samples[0].sample_id for h in hits)
    for i in range(5):
        enroll(stub, "modes", f"p{i}", [vector_sample(vecs[5])])
    removed = stub.RemoveIdentity(gallery_pb2.RemoveIdentityRequest(gallery="modes", identity="p0"))
    assert (removed.identities_removed, removed.samples_removed) == (1, 1)
    pages, token = [], ""
    while True:
        page = stub.ListIdentities(
            gallery_pb2.ListIdentitiesRequest(gallery="modes", page_size=2, page_token=token)
        )
        pages.append([i.identity for i in page.identities])
        token = page.next_page_token
        if not token:
            break
    assert pages == [["carol", "dave"], ["p1", "p2"], ["p3", "p4"]]
    info = stub.GetGallery(gallery_pb2.GetGalleryRequest(name="modes"))
    assert (info.identity_count, info.sample_count) == (6, 7)


# -- search -----------------------------------------------------------------------------------


def test_search_vectors_matches_brute_force(stub):
    create(stub, "search")
    rng = np.random.default_rng(4)
    vecs = unit_vectors(60, 5)
    owner = rng.integers(0, 20, 60)
    for ident in range(20):
        samples = [vector_sample(v) for v in vecs[owner == ident]] or [vector_sample(vecs[0])]
        enroll(stub, "search", f"id{ident:02d}", samples)
    probes = unit_vectors(4, 6)
    response = search(stub, "search", [vector_sample(p) for p in probes], top_k=5)
    assert response.searched_identities == 20
    for p, result in zip(probes, response.results, strict=True):
        best = {}
        for ident in range(20):
            rows = vecs[owner == ident] if (owner == ident).any() else vecs[:1]
            best[f"id{ident:02d}"] = float((rows @ p).max())
        expected = sorted(best.items(), key=lambda kv: -kv[1])[:5]
        assert [m.identity for m in result.matches] == [k for k, _ in expected]
        np.testing.assert_allclose(
            [m.score for m in result.matches], [s for _, s in expected], atol=1e-5
        )
    # min_score cuts the list; mean-template scoring is offered too.
    top = response.results[0].matches
    cut = search(
        stub, "search", [vector_sample(probes[0])], top_k=5, min_score=top[2].score
    ).results[0]
    assert [m.identity for m in cut.matches] == [m.identity for m in top[:3]]
    mean = search(
        stub, "search", [vector_sample(probes[0])], top_k=3, scoring=gallery_pb2.SCORING_MEAN
    ).results[0]
    templates = {}
    for ident in range(20):
        rows = vecs[owner == ident] if (owner == ident).any() else vecs[:1]
        t = rows.sum(0)
        templates[f"id{ident:02d}"] = float(t @ probes[0] / np.linalg.norm(t))
    expected = sorted(templates.items(), key=lambda kv: -kv[1])[:3]
    assert [m.identity for m in mean.matches] == [k for k, _ in expected]


def test_search_images_and_per_probe_errors(stub):
    create(stub, "faces")
    for i in range(4):
        enroll(stub, "faces", f"person{i}", [image_sample(100 + i)])
    response = search(stub, "faces", [image_sample(102), corrupt_sample()], top_k=2)
    first, bad = response.results
    assert first.matches[0].identity == "person2" and first.matches[0].score > 0.9999
    assert bad.error.reason == common_pb2.ImageError.REASON_UNDECODABLE
    assert bad.error.message.startswith("probes[1]") and not bad.matches


# -- verify -------------------------------------------------------------------------------------


def test_verify_every_operand_kind(stub):
    create(stub, "verify")
    vecs = unit_vectors(3, 7)
    enroll(stub, "verify", "erin", [vector_sample(vecs[0]), vector_sample(vecs[1])])
    enroll(stub, "verify", "frank", [vector_sample(vecs[2])])
    V = gallery_pb2.VerifyOperand
    emb = common_pb2.Embedding(vector=vecs[1].astype("<f4").tobytes(), dim=DIM)
    r = stub.Verify(
        gallery_pb2.VerifyRequest(gallery="verify", a=V(identity="erin"), b=V(vector=emb))
    )
    assert r.match and abs(r.score - 1.0) < 1e-5 and r.threshold == pytest.approx(0.3)
    assert r.a_sample_id > 0 and r.b_sample_id == 0
    r = stub.Verify(
        gallery_pb2.VerifyRequest(
            gallery="verify", a=V(identity="erin"), b=V(identity="frank"), threshold=0.99
        )
    )
    assert r.score == pytest.approx(float(max(vecs[:2] @ vecs[2])), abs=1e-5)
    assert not r.match and r.threshold == pytest.approx(0.99)
    image = common_pb2.ImageInput(encoded=png(crop(5)))
    r = stub.Verify(gallery_pb2.VerifyRequest(a=V(image=image), b=V(image=image)))
    assert r.match and r.score > 0.9999


# -- export / import -------------------------------------------------------------------------


def test_export_import_roundtrip(stub):
    create(stub, "src", metadata={"a": "b"})
    vecs = unit_vectors(5, 8)
    enroll(stub, "src", "g1", [vector_sample(vecs[0]), vector_sample(vecs[1])], metadata={"x": "1"})
    enroll(stub, "src", "g2", [vector_sample(vecs[2])])
    enroll(stub, "src", "g3", [vector_sample(vecs[3])])
    stub.RemoveIdentity(gallery_pb2.RemoveIdentityRequest(gallery="src", identity="g3"))
    data = b"".join(c.data for c in stub.Export(gallery_pb2.ExportRequest(name="src")))
    assert data.startswith(b"ADAFACE-GALLERY 1\n")

    def upload(name: str, payload: bytes, fmt=gallery_pb2.IMPORT_FORMAT_NATIVE):
        yield gallery_pb2.ImportRequest(header=gallery_pb2.ImportHeader(name=name, format=fmt))
        for i in range(0, len(payload), 1000):
            yield gallery_pb2.ImportRequest(data=payload[i : i + 1000])

    info = stub.Import(upload("copy", data))
    assert (info.name, info.identity_count, info.sample_count) == ("copy", 2, 3)
    assert dict(info.metadata) == {"a": "b"}
    g1 = stub.GetIdentity(
        gallery_pb2.GetIdentityRequest(gallery="copy", identity="g1", include_vectors=True)
    )
    assert dict(g1.metadata) == {"x": "1"}
    got = np.stack([np.frombuffer(s.vector.vector, "<f4") for s in g1.samples])
    np.testing.assert_array_equal(got, vecs[:2])
    hit = search(stub, "copy", [vector_sample(vecs[2])], top_k=1).results[0].matches[0]
    assert hit.identity == "g2"
    err = rpc_error(stub.Import, upload("copy", data))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert err.details() == "gallery 'copy' already exists"
    # A header and no file at all is a malformed upload, named as such.
    err = rpc_error(stub.Import, upload("empty", b""))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "data: the stream carried no file after its header"
    # A file cut before its end record is an upload that never finished: CANCELLED.
    err = rpc_error(stub.Import, upload("cut", data[:-30]))
    assert err.code() == grpc.StatusCode.CANCELLED
    assert err.details().startswith("import: the upload ended at byte")
    assert rpc_error(stub.GetGallery, gallery_pb2.GetGalleryRequest(name="cut")).code() == (
        grpc.StatusCode.NOT_FOUND
    )


def test_import_seed_gallery_pth(stub, tmp_path, checksum):
    features = torch.from_numpy(unit_vectors(5, 9) * 2.0)
    path = tmp_path / "gallery.pth"
    torch.save({"features": features, "labels": [3, 1, 3, 2, 1]}, path)

    def upload():
        yield gallery_pb2.ImportRequest(
            header=gallery_pb2.ImportHeader(name="seed", format=gallery_pb2.IMPORT_FORMAT_SEED_PTH)
        )
        yield gallery_pb2.ImportRequest(data=path.read_bytes())

    info = stub.Import(upload())
    assert (info.identity_count, info.sample_count, info.model_checksum) == (3, 5, checksum)
    three = stub.GetIdentity(gallery_pb2.GetIdentityRequest(gallery="seed", identity="3"))
    assert three.sample_count == 2
    probe = features[3].numpy() / 2.0
    hit = search(stub, "seed", [vector_sample(probe)], top_k=1).results[0].matches[0]
    assert hit.identity == "2" and hit.score == pytest.approx(1.0, abs=1e-5)


# -- the error table -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def errors_gallery(stub):
    create(stub, "errs")
    enroll(stub, "errs", "known", [vector_sample(unit_vectors(1, 10)[0])])
    return "errs"


def _bad_vector(kind: str) -> gallery_pb2.GallerySample:
    v = unit_vectors(1, 11)[0]
    if kind == "dim":
        v = v[:500]
    elif kind == "nan":
        v = v.copy()
        v[7] = np.nan
    elif kind == "zero":
        v = np.zeros(DIM, np.float32)
    return vector_sample(v)


GOOD = vector_sample(unit_vectors(1, 12)[0])


@pytest.mark.parametrize(
    ("rpc", "request_factory", "code", "message"),
    [
        (
            "Enroll",
            lambda: gallery_pb2.EnrollRequest(gallery="nope", identity="x", samples=[GOOD]),
            "NOT_FOUND",
            "gallery 'nope' not found",
        ),
        (
            "Search",
            lambda: gallery_pb2.SearchRequest(gallery="nope", probes=[GOOD]),
            "NOT_FOUND",
            "gallery 'nope' not found",
        ),
        (
            "DeleteGallery",
            lambda: gallery_pb2.DeleteGalleryRequest(name="nope"),
            "NOT_FOUND",
            "gallery 'nope' not found",
        ),
        (
            "RemoveIdentity",
            lambda: gallery_pb2.RemoveIdentityRequest(gallery="errs", identity="ghost"),
            "NOT_FOUND",
            "identity 'ghost' not found in gallery 'errs'",
        ),
        (
            "GetIdentity",
            lambda: gallery_pb2.GetIdentityRequest(gallery="errs", identity="ghost"),
            "NOT_FOUND",
            "identity 'ghost' not found in gallery 'errs'",
        ),
        (
            "Enroll",
            lambda: gallery_pb2.EnrollRequest(
                gallery="errs",
                identity="ghost",
                samples=[GOOD],
                mode=gallery_pb2.ENROLL_MODE_APPEND,
            ),
            "NOT_FOUND",
            "identity 'ghost' not found in gallery 'errs'",
        ),
        (
            "RemoveSamples",
            lambda: gallery_pb2.RemoveSamplesRequest(gallery="errs", sample_ids=[987654]),
            "NOT_FOUND",
            "sample 987654 not found in gallery 'errs'",
        ),
        (
            "Verify",
            lambda: gallery_pb2.VerifyRequest(
                gallery="errs",
                a=gallery_pb2.VerifyOperand(identity="ghost"),
                b=gallery_pb2.VerifyOperand(identity="known"),
            ),
            "NOT_FOUND",
            "identity 'ghost' not found in gallery 'errs'",
        ),
        (
            "CreateGallery",
            lambda: gallery_pb2.CreateGalleryRequest(name="errs"),
            "ALREADY_EXISTS",
            "gallery 'errs' already exists",
        ),
        (
            "Enroll",
            lambda: gallery_pb2.EnrollRequest(gallery="errs", identity="known", samples=[GOOD]),
            "ALREADY_EXISTS",
            "identity 'known' already exists in gallery 'errs'",
        ),
        (
            "Enroll",
            lambda: gallery_pb2.EnrollRequest(
                gallery="errs", identity="v", samples=[GOOD, _bad_vector("dim")]
            ),
            "INVALID_ARGUMENT",
            "samples[1].vector: need 512 float32 values (2048 bytes), got 500",
        ),
        (
            "Enroll",
            lambda: gallery_pb2.EnrollRequest(
                gallery="errs", identity="v", samples=[_bad_vector("nan")]
            ),
            "INVALID_ARGUMENT",
            "samples[0].vector: values must be finite; value [7] is nan",
        ),
        (
            "Search",
            lambda: gallery_pb2.SearchRequest(
                gallery="errs", probes=[GOOD, GOOD, _bad_vector("zero")]
            ),
            "INVALID_ARGUMENT",
            "probes[2].vector: an all-zero vector has no direction",
        ),
        (
            "Search",
            lambda: gallery_pb2.SearchRequest(gallery="errs", probes=[GOOD], top_k=5000),
            "INVALID_ARGUMENT",
            "top_k: must be 0..1000, got 5000",
        ),
        (
            "Search",
            lambda: gallery_pb2.SearchRequest(gallery="errs"),
            "INVALID_ARGUMENT",
            "probes: at least one probe is required",
        ),
        (
            "Enroll",
            lambda: gallery_pb2.EnrollRequest(gallery="errs", identity="", samples=[GOOD]),
            "INVALID_ARGUMENT",
            "identity: must be 1..256 characters, got 0",
        ),
        (
            "Enroll",
            lambda: gallery_pb2.EnrollRequest(
                gallery="errs", identity="w", samples=[gallery_pb2.GallerySample()]
            ),
            "INVALID_ARGUMENT",
            "samples[0]: set either image or vector",
        ),
        (
            "CreateGallery",
            lambda: gallery_pb2.CreateGalleryRequest(name="bad name!"),
            "INVALID_ARGUMENT",
            "name: gallery names are 1..128 characters of [A-Za-z0-9._-] starting with a "
            "letter or digit, got 'bad name!'",
        ),
        (
            "ListIdentities",
            lambda: gallery_pb2.ListIdentitiesRequest(gallery="errs", page_token="%%%"),
            "INVALID_ARGUMENT",
            "page_token: not a token this server issued: '%%%'",
        ),
        (
            "Verify",
            lambda: gallery_pb2.VerifyRequest(
                a=gallery_pb2.VerifyOperand(identity="known"),
                b=gallery_pb2.VerifyOperand(identity="known"),
            ),
            "INVALID_ARGUMENT",
            "gallery: required when an operand is an identity",
        ),
    ],
)
def test_error_table(stub, errors_gallery, rpc, request_factory, code, message):
    err = rpc_error(getattr(stub, rpc), request_factory())
    assert err.code() == grpc.StatusCode[code]
    assert err.details() == message


def test_export_unknown_gallery(stub):
    err = rpc_error(
        lambda r, timeout: list(stub.Export(r, timeout=timeout)),
        gallery_pb2.ExportRequest(name="nope"),
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == "gallery 'nope' not found"


def test_vectors_from_another_model_are_refused(stub, checksum):
    other = "f" * 64
    err = rpc_error(
        stub.Search,
        gallery_pb2.SearchRequest(gallery="errs", probes=[GOOD], model_checksum=other),
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert checksum in err.details() and other in err.details()


# -- concurrency ----------------------------------------------------------------------------------


def test_searches_never_see_half_applied_enrollments(stub):
    """Identity i is enrolled in one call with samples e_i and f_i (orthonormal). Its mean
    template scores exactly 1/sqrt(2) against probe e_i; a search seeing only e_i would
    report 1.0. Searches run while the enrollments happen."""
    create(stub, "race")
    n = 40
    basis = np.linalg.qr(np.random.default_rng(13).standard_normal((DIM, 2 * n)))[0].T
    basis = basis.astype(np.float32)
    stop = threading.Event()
    seen: list[tuple[str, float]] = []
    failures: list[BaseException] = []

    def searcher() -> None:
        try:
            while not stop.is_set():
                response = search(
                    stub,
                    "race",
                    [vector_sample(basis[2 * i]) for i in range(0, n, 4)],
                    top_k=1,
                    scoring=gallery_pb2.SCORING_MEAN,
                )
                for r in response.results:
                    seen.extend((m.identity, m.score) for m in r.matches)
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=searcher) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(n):
            enroll(
                stub,
                "race",
                f"r{i}",
                [vector_sample(basis[2 * i]), vector_sample(basis[2 * i + 1])],
            )
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures
    matched = [s for _, s in seen if s > 0.5]
    assert matched, "the searches never overlapped the enrollments"
    np.testing.assert_allclose(matched, 1 / np.sqrt(2), atol=1e-5)
