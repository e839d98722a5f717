"""The HTTP/JSON API against a live server: every documented route, errors, tokens, ids."""

from __future__ import annotations

import base64
import logging
import urllib.request

import grpc
import numpy as np
import pytest

from adaface.v1 import common_pb2, embedder_pb2, embedder_pb2_grpc, gallery_pb2, gallery_pb2_grpc
from adaface_server.logs import ACCESS_LOGGER

from .http_support import astronaut_jpeg, base_url, multipart, request, start_http_server

ADMIN = "admin-token-0123456789"
USER = "user-token-0123456789"


@pytest.fixture(scope="module")
def http_server(ir18_repository):
    repository, name = ir18_repository
    server = start_http_server(repository, name)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def url(http_server) -> str:
    return base_url(http_server)


@pytest.fixture(scope="module")
def photo() -> bytes:
    return astronaut_jpeg()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _detect_image(photo: bytes) -> dict:
    return {"encoded": _b64(photo), "alignment": "ALIGNMENT_DETECT"}


# -- a small JSON-schema check, enough for the document's own constructs ----------------


def _check(schema: dict, value, doc: dict, where: str = "$") -> None:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return _check(doc["components"]["schemas"][name], value, doc, where)
    if "oneOf" in schema:
        errors = []
        for option in schema["oneOf"]:
            try:
                _check(option, value, doc, where)
                return None
            except AssertionError as exc:
                errors.append(str(exc))
        raise AssertionError(f"{where}: matches no option: {errors}")
    kind = schema.get("type")
    python = {
        "object": dict,
        "array": list,
        "string": str,
        "boolean": bool,
        "integer": int,
        "number": (int, float),
    }
    if kind is not None:
        assert isinstance(value, python[kind]), f"{where}: {value!r} is not {kind}"
        if kind in ("integer", "number"):
            assert not isinstance(value, bool), f"{where}: {value!r} is not {kind}"
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    if kind == "object":
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if key in properties:
                _check(properties[key], item, doc, f"{where}.{key}")
            elif isinstance(extra, dict):
                _check(extra, item, doc, f"{where}.{key}")
            else:
                raise AssertionError(f"{where}.{key}: not in the documented schema")
    if kind == "array":
        for i, item in enumerate(value):
            _check(schema["items"], item, doc, f"{where}[{i}]")
    return None


def test_every_documented_route_answers_as_documented(url, photo):
    doc = request("GET", url + "/openapi.json").body
    assert doc["openapi"].startswith("3.")
    g = "documented"
    aligned = request(
        "POST",
        url + "/v1/detect",
        {"images": [{"encoded": _b64(photo)}], "options": {"return_aligned": True}},
    ).body["results"][0]["faces"][0]["aligned_png"]
    crop = {"image": {"encoded": aligned, "alignment": "ALIGNMENT_ALIGNED"}}
    # In order: what later calls need is made by earlier ones; the gallery goes last.
    cases = [
        ("get", "/healthz", "/healthz", None),
        ("get", "/v1/info", "/v1/info", None),
        ("post", "/v1/embed", "/v1/embed", {"images": [_detect_image(photo)]}),
        ("post", "/v1/detect", "/v1/detect", {"images": [{"encoded": _b64(photo)}]}),
        ("post", "/v1/galleries", "/v1/galleries", {"name": g}),
        ("get", "/v1/galleries", "/v1/galleries", None),
        ("get", "/v1/galleries/{name}", f"/v1/galleries/{g}", None),
        (
            "post",
            "/v1/galleries/{gallery}/enroll",
            f"/v1/galleries/{g}/enroll",
            {"identity": "eileen", "samples": [crop, {"vector": [0.5] * 512}]},
        ),
        ("get", "/v1/galleries/{gallery}/identities", f"/v1/galleries/{g}/identities", None),
        (
            "get",
            "/v1/galleries/{gallery}/identities/{identity}",
            f"/v1/galleries/{g}/identities/eileen?include_vectors=true",
            None,
        ),
        ("post", "/v1/galleries/{gallery}/search", f"/v1/galleries/{g}/search", {"probes": [crop]}),
        (
            "post",
            "/v1/galleries/{gallery}/verify",
            f"/v1/galleries/{g}/verify",
            {"a": crop, "b": {"identity": "eileen"}},
        ),
        ("post", "/v1/galleries/{gallery}/remove-samples", None, None),  # filled below
        (
            "delete",
            "/v1/galleries/{gallery}/identities/{identity}",
            f"/v1/galleries/{g}/identities/eileen",
            None,
        ),
        ("delete", "/v1/galleries/{name}", f"/v1/galleries/{g}", None),
    ]
    documented = {(verb, path) for path, ops in doc["paths"].items() for verb in ops}
    assert documented == {(verb, path) for verb, path, _, _ in cases}
    answers = {}
    for verb, path, target, body in cases:
        if path.endswith("remove-samples"):
            stored = answers[("post", "/v1/galleries/{gallery}/enroll")]["samples"]
            target, body = (
                f"/v1/galleries/{g}/remove-samples",
                {"sample_ids": [stored[1]["sample_id"]]},
            )
        reply = request(verb.upper(), url + target, body)
        op = doc["paths"][path][verb]
        assert str(reply.status) in op["responses"], (path, reply.status, reply.body)
        assert reply.status == 200, (path, reply.body)
        content = op["responses"]["200"].get("content")
        if content:
            _check(content["application/json"]["schema"], reply.body, doc)
        answers[(verb, path)] = reply.body
    enrolled = answers[("post", "/v1/galleries/{gallery}/enroll")]
    assert enrolled["identity"] == "eileen" and enrolled["sample_count"] == 2
    matches = answers[("post", "/v1/galleries/{gallery}/search")]["results"][0]["matches"]
    assert matches[0]["identity"] == "eileen" and matches[0]["score"] > 0.99
    assert answers[("post", "/v1/galleries/{gallery}/verify")]["match"] is True
    removed = answers[("delete", "/v1/galleries/{gallery}/identities/{identity}")]
    assert removed == {"identities_removed": 1, "samples_removed": 1}


def test_every_documented_route_documents_its_errors(url):
    doc = request("GET", url + "/openapi.json").body
    bad = {  # routes without a gallery in the path: a request they must refuse
        ("get", "/v1/info"): ("/v1/info?bogus=1", None),
        ("post", "/v1/embed"): ("/v1/embed", {"images": []}),
        ("post", "/v1/detect"): ("/v1/detect", {"images": []}),
        ("get", "/v1/galleries"): ("/v1/galleries?bogus=1", None),
        ("post", "/v1/galleries"): ("/v1/galleries", {"name": ""}),
    }
    checked = 0
    for path, ops in doc["paths"].items():
        for verb, op in ops.items():
            if path == "/healthz":
                continue
            if (verb, path) in bad:
                target, body = bad[(verb, path)]
                expected = 400
            else:  # an unknown gallery
                target = path.replace("{name}", "missing").replace("{gallery}", "missing")
                target, expected = target.replace("{identity}", "x"), 404
                body = {"a": {"identity": "x"}, "b": {"identity": "y"}} if "verify" in path else {}
            reply = request(verb.upper(), url + target, body if verb == "post" else None)
            assert reply.status == expected, (verb, path, reply.body)
            assert str(reply.status) in op["responses"]
            schema = op["responses"][str(reply.status)]["content"]["application/json"]["schema"]
            _check(schema, reply.body, doc)
            assert reply.body["error"]["request_id"] == reply.headers["x-request-id"]
            checked += 1
    assert checked == 14  # every API route


def test_json_multipart_base64_and_grpc_give_the_same_embedding(http_server, url, photo):
    by_json = request("POST", url + "/v1/embed", {"images": [_detect_image(photo)]}).body
    vector = np.asarray(by_json["results"][0]["embedding"]["vector"], np.float32)
    assert vector.shape == (512,)
    assert abs(np.linalg.norm(vector) - 1) < 1e-4

    body, kind = multipart([("image", "a.jpg", photo)], {"alignment": "ALIGNMENT_DETECT"})
    by_form = request(
        "POST", url + "/v1/embed?vector_format=base64", raw=body, content_type=kind
    ).body
    packed = base64.b64decode(by_form["results"][0]["embedding"]["vector"])
    np.testing.assert_allclose(np.frombuffer(packed, "<f4"), vector, atol=1e-6)

    with grpc.insecure_channel(http_server.address) as channel:
        stub = embedder_pb2_grpc.EmbedderStub(channel)
        image = common_pb2.ImageInput(encoded=photo, alignment=common_pb2.ALIGNMENT_DETECT)
        reply = stub.Embed(embedder_pb2.EmbedRequest(images=[image]), timeout=60)
    by_grpc = np.frombuffer(reply.results[0].embedding.vector, "<f4")
    np.testing.assert_allclose(by_grpc, vector, atol=1e-6)
    faces = by_json["results"][0]["faces"]
    assert len(faces) == 1 and len(faces[0]["box"]) == 4 and faces[0]["score"] > 0.9


def _grpc_details(server, call) -> tuple[grpc.StatusCode, str]:
    with grpc.insecure_channel(server.address) as channel:
        try:
            call(channel)
        except grpc.RpcError as exc:
            return exc.code(), exc.details()
    raise AssertionError("the gRPC call succeeded")


def test_errors_carry_the_grpc_status_and_message(http_server, url, photo):
    reply = request("POST", url + "/v1/galleries/nowhere/search", {"probes": [{"vector": [1]}]})
    code, details = _grpc_details(
        http_server,
        lambda ch: gallery_pb2_grpc.GalleryStub(ch).Search(
            gallery_pb2.SearchRequest(gallery="nowhere"), timeout=10
        ),
    )
    assert code is grpc.StatusCode.NOT_FOUND
    assert reply.status == 404
    assert reply.body["error"]["code"] == "NOT_FOUND"
    assert reply.body["error"]["message"] == details and "nowhere" in details

    bad = {"images": [{"encoded": _b64(photo), "landmarks": [1, 2, 3, 4, 5, 6]}]}
    reply = request("POST", url + "/v1/embed", bad)
    assert reply.status == 400
    assert reply.body["error"] == {
        "code": "INVALID_ARGUMENT",
        "message": "images[0].landmarks: need 10 values, got 6",
        "request_id": reply.headers["x-request-id"],
    }

    reply = request("POST", url + "/v1/embed", {"images": [{"encoded": _b64(b"not an image")}]})
    assert reply.status == 400 and reply.body["error"]["code"] == "INVALID_ARGUMENT"
    assert reply.body["details"]["results"][0]["error"]["reason"] == "REASON_UNDECODABLE"

    many = {"images": [{"encoded": _b64(b"x")}] * 65}
    reply = request("POST", url + "/v1/embed", many)
    assert reply.status == 400
    assert reply.body["error"]["message"] == (
        "images: at most 64 per request (max_images_per_request), got 65"
    )
    mixed = {"images": [_detect_image(photo), {"encoded": _b64(b"not an image")}]}
    reply = request("POST", url + "/v1/embed", mixed)
    assert reply.status == 200
    assert "embedding" in reply.body["results"][0] and "error" not in reply.body["results"][0]
    assert reply.body["results"][1]["error"]["reason"] == "REASON_UNDECODABLE"
    assert reply.body["results"][1]["error"]["message"].startswith("images[1]")
    reply = request("POST", url + "/v1/embed", raw=b"{not json")
    assert reply.status == 400 and reply.body["error"]["message"].startswith("body:")
    reply = request("POST", url + "/v1/embed", {"imagez": []})
    assert reply.status == 400 and "imagez" in reply.body["error"]["message"]
    reply = request("POST", url + "/v1/embed?vector_format=hex", {"images": []})
    assert reply.status == 400 and "vector_format" in reply.body["error"]["message"]
    reply = request("POST", url + "/v1/galleries", {"name": "twice"})
    assert reply.status == 200
    reply = request("POST", url + "/v1/galleries", {"name": "twice"})
    assert reply.status == 409 and reply.body["error"]["code"] == "ALREADY_EXISTS"
    reply = request(
        "POST", url + "/v1/galleries/twice/enroll", {"identity": "x", "samples": [{"vector": "@@"}]}
    )
    assert reply.status == 400 and "samples" in reply.body["error"]["message"]
    late = request(
        "POST",
        url + "/v1/embed",
        {"images": [_detect_image(photo)]},
        headers={"x-request-timeout": "0.000001"},
    )
    assert late.status == 504 and late.body["error"]["code"] == "DEADLINE_EXCEEDED"
    assert late.body["error"]["message"].startswith("deadline exceeded before")
    reply = request("GET", url + "/v1/info", headers={"x-request-timeout": "soon"})
    assert reply.status == 400
    assert reply.body["error"]["message"].startswith("x-request-timeout: need seconds")
    reply = request("POST", url + "/v1/galleries/twice/search?top_k=3", {"probes": []})
    assert reply.status == 400
    assert reply.body["error"]["message"].startswith("top_k: not a query parameter here")
    reply = request("GET", url + "/v1/nothing-here")
    assert reply.status == 404 and reply.body["error"]["code"] == "NOT_FOUND"
    assert request("GET", url + "/healthz").body == {"status": "SERVING"}


def test_request_ids_metrics_and_access_log(http_server, url, caplog):
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        reply = request("GET", url + "/v1/info", headers={"x-request-id": "trace-me-42"})
    assert reply.status == 200 and reply.headers["x-request-id"] == "trace-me-42"
    lines = [
        r for r in caplog.records if getattr(r, "fields", {}).get("request_id") == "trace-me-42"
    ]
    assert len(lines) == 1
    assert lines[0].fields["rpc"] == "http:Embedder/Info" and lines[0].fields["status"] == "OK"
    made_up = request("GET", url + "/v1/info").headers["x-request-id"]
    assert made_up and made_up != "trace-me-42"
    metrics_url = f"http://127.0.0.1:{http_server.app.metrics_port}/metrics"
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    assert 'adaface_requests_total{code="OK",method="http:Embedder/Info"}' in text


def test_tokens_admin_rule_and_body_limit(ir18_repository, tmp_path, photo):
    repository, name = ir18_repository
    (tmp_path / "users").write_text(USER + "\n")
    (tmp_path / "admins").write_text(ADMIN + "\n")
    server = start_http_server(
        repository,
        name,
        auth_tokens_file=str(tmp_path / "users"),
        admin_tokens_file=str(tmp_path / "admins"),
        max_message_bytes=50_000,
    )
    try:
        url = base_url(server)
        reply = request("GET", url + "/v1/info")
        assert reply.status == 401 and reply.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer" in reply.body["error"]["message"]
        reply = request("GET", url + "/v1/info", headers={"Authorization": "Bearer wrong-wrong"})
        assert reply.status == 401 and reply.body["error"]["message"] == "invalid bearer token"
        user = {"Authorization": f"Bearer {USER}"}
        admin = {"Authorization": f"Bearer {ADMIN}"}
        assert request("GET", url + "/v1/info", headers=user).status == 200
        reply = request("POST", url + "/v1/galleries", {"name": "g"}, headers=user)
        assert reply.status == 403 and reply.body["error"]["code"] == "PERMISSION_DENIED"
        assert request("POST", url + "/v1/galleries", {"name": "g"}, headers=admin).status == 200
        assert request("GET", url + "/healthz").status == 200  # health needs no token
        big = {"images": [{"encoded": _b64(photo)}]}
        reply = request("POST", url + "/v1/embed", big, headers=user)
        assert reply.status == 400 and "max_message_bytes" in reply.body["error"]["message"]
        assert request("GET", url + "/v1/info", headers=user).status == 200
    finally:
        server.stop()
