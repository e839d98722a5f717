"""Client bearer tokens, TLS/mTLS and request ids against real servers (and the CLIs)."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import adaface_client.retry as retry_module
from adaface_client import (
    AlreadyExists,
    AsyncClient,
    Client,
    Extractor,
    GalleryClient,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    read_token_file,
    tls_credentials,
    use_request_id,
)
from adaface_client.sampling import GraphSampler, build_epoch
from adaface_client.transport import open_channel

from .gallery_support import REPO, crop, png, unit_vectors
from .pki import make_pki
from .server_harness import ServerThread, server_settings

# Made up per run, so finding one in any output can only mean the client leaked it.
USER_TOKEN = "user-" + secrets.token_hex(12)
ADMIN_TOKEN = "admin-" + secrets.token_hex(12)
WRONG_TOKEN = "wrong-" + secrets.token_hex(12)
SECRETS = (USER_TOKEN, ADMIN_TOKEN, WRONG_TOKEN)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> SimpleNamespace:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def token_files(tmp_path_factory) -> SimpleNamespace:
    d = tmp_path_factory.mktemp("tokens")
    users, admins = d / "users.txt", d / "admins.txt"
    users.write_text(f"# user tokens\n{USER_TOKEN}\n")
    admins.write_text(f"{ADMIN_TOKEN}\n")
    user, wrong = d / "user.token", d / "wrong.token"
    user.write_text(f"  {USER_TOKEN}\n")  # whitespace around the token is ignored
    wrong.write_text(WRONG_TOKEN)
    admin = d / "admin.token"
    admin.write_text(ADMIN_TOKEN + "\n")
    return SimpleNamespace(dir=d, users=users, admins=admins, user=user, wrong=wrong, admin=admin)


def _wait_serving(address: str, credentials: grpc.ChannelCredentials | None) -> None:
    # ServerThread.wait_serving dials in plaintext; TLS servers need their credentials.
    deadline = time.monotonic() + 120
    with open_channel(address, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            except grpc.RpcError:
                status = None
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.05)
    raise TimeoutError(f"server at {address} not SERVING")


@pytest.fixture(scope="module")
def auth_server(ir18_repository, token_files):
    """Plaintext, with user and admin tokens: the token must travel without TLS too."""
    repository, name = ir18_repository
    settings = server_settings(
        repository,
        name,
        auth_tokens_file=str(token_files.users),
        admin_tokens_file=str(token_files.admins),
    )
    server = ServerThread(settings).start()
    yield server.wait_serving()
    server.stop()


@pytest.fixture(scope="module")
def tls_server(ir18_repository, pki):
    """Server-side TLS only; reached as localhost:PORT (the certificate's DNS name)."""
    repository, name = ir18_repository
    cert, key = pki.server
    settings = server_settings(
        repository, name, tls_certificate=str(cert), tls_private_key=str(key)
    )
    server = ServerThread(settings).start()
    server.address = server.address.replace("127.0.0.1", "localhost")
    _wait_serving(server.address, tls_credentials(pki.ca))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mtls_server(ir18_repository, pki, token_files):
    """Mutual TLS and tokens together, on 127.0.0.1 (an IP SAN of the certificate)."""
    repository, name = ir18_repository
    cert, key = pki.server
    settings = server_settings(
        repository,
        name,
        tls_certificate=str(cert),
        tls_private_key=str(key),
        tls_client_ca=str(pki.ca),
        auth_tokens_file=str(token_files.users),
        admin_tokens_file=str(token_files.admins),
    )
    server = ServerThread(settings).start()
    _wait_serving(server.address, tls_credentials(pki.ca, *pki.client))
    yield server
    server.stop()


def _answered(server: ServerThread, method: str, code: str, at_least: float = 0.0) -> float:
    """How many `method` calls the server answered with `code` (its own Prometheus count).

    The server counts a call just after its status went out, so a caller that just saw the
    answer waits (up to 10 s) for the count to reach `at_least`."""
    deadline = time.monotonic() + 10
    while True:
        value = server.app.metrics.registry.get_sample_value(
            "adaface_requests_total", {"method": method, "code": code}
        )
        if (value or 0.0) >= at_least or time.monotonic() > deadline:
            return value or 0.0
        time.sleep(0.01)


@pytest.fixture
def backoffs(monkeypatch) -> list[int]:
    """The client's retry backoffs (none may happen for auth failures), made instant."""
    seen: list[int] = []

    def delay(base: float, attempt: int) -> float:
        seen.append(attempt)
        return 0.0

    monkeypatch.setattr(retry_module, "backoff_delay", delay)
    return seen


def _assert_no_secret(*texts: str) -> None:
    for text in texts:
        for token in SECRETS:
            assert token not in text


# --------------------------------------------------------------------------------------
# Bearer tokens


def test_token_accepted_on_every_client_and_call_kind(auth_server) -> None:
    address = auth_server.address
    with Client(address, token=USER_TOKEN) as client:
        info = client.info()
        embeddings, _ = client.embed(
            [crop(1), crop(2)], alignment="aligned"
        )  # Embed goes through .future()
    assert info.embedding_dim == 512 and embeddings.shape == (2, 512)

    async def run() -> np.ndarray:
        async with AsyncClient(address, token=USER_TOKEN) as client:
            return (await client.embed([crop(1)], alignment="aligned"))[0]

    np.testing.assert_allclose(asyncio.run(run()), embeddings[:1], rtol=0, atol=1e-6)
    with Extractor(address, token=USER_TOKEN, progress=False) as extractor:
        features = extractor.extract([crop(2)], alignment="aligned")
    np.testing.assert_allclose(features, embeddings[1:], rtol=0, atol=1e-6)

    # Past authentication every kind of call reaches its servicer: NotFound, not
    # Unauthenticated, for a gallery that does not exist.
    with GalleryClient(address, token=ADMIN_TOKEN, retries=0) as gallery:
        assert isinstance(gallery.list_galleries(), list)  # unary
        with pytest.raises(NotFound):
            list(gallery.export_chunks("missing"))  # unary -> stream
        with pytest.raises(InvalidArgument, match="bad magic"):
            gallery.import_gallery(b"not an export file", name="x")  # stream -> unary
        (outcome,) = gallery.enroll_many("missing", [("ann", [unit_vectors(1, 3)[0]])])
        assert isinstance(outcome, NotFound)  # stream <-> stream
    dataset = [("a.png", "ann"), ("b.png", "ann"), ("c.png", "ben"), ("d.png", "ben")]
    sampler = GraphSampler(
        dataset,
        server=address,
        batch_size=2,
        num_instance=1,
        features=lambda rows: unit_vectors(len(rows), 4),
        token=USER_TOKEN,
    )
    indices = list(sampler)  # one BuildEpoch stream
    assert indices and set(indices) <= set(range(len(dataset)))


def test_missing_or_wrong_token_raises_unauthenticated_once(auth_server, backoffs) -> None:
    for token in (None, WRONG_TOKEN):
        before = _answered(auth_server, "Embedder/Info", "UNAUTHENTICATED")
        with (
            Client(auth_server.address, token=token, retries=3) as client,
            pytest.raises(Unauthenticated) as info,
        ):
            client.info()
        error = info.value
        assert error.code == grpc.StatusCode.UNAUTHENTICATED
        assert ("missing" if token is None else "invalid") in error.details
        # Not retried: exactly one attempt reached the server.
        assert backoffs == []
        assert _answered(auth_server, "Embedder/Info", "UNAUTHENTICATED", before + 1) == before + 1
        assert len(error.request_id) == 32 and error.request_id in str(error)
        _assert_no_secret(str(error), repr(error))


def test_unauthenticated_on_streams_and_async(auth_server, backoffs) -> None:
    with GalleryClient(auth_server.address, retries=3) as gallery:
        with pytest.raises(Unauthenticated):
            list(gallery.export_chunks("missing"))
        with pytest.raises(Unauthenticated):
            gallery.import_gallery(b"x", name="x")
    with pytest.raises(Unauthenticated):
        build_epoch(auth_server.address, [1], unit_vectors(1, 1), batch_size=1, num_instance=1)

    async def run() -> None:
        async with AsyncClient(auth_server.address, token=WRONG_TOKEN, retries=3) as client:
            await client.embed([crop(0)], alignment="aligned")

    before = _answered(auth_server, "Embedder/Info", "UNAUTHENTICATED")
    with pytest.raises(Unauthenticated) as info:
        asyncio.run(run())
    assert _answered(auth_server, "Embedder/Info", "UNAUTHENTICATED", before + 1) == before + 1
    assert info.value.request_id
    assert backoffs == []


def test_gallery_writes_need_an_admin_token(auth_server, backoffs) -> None:
    vectors = unit_vectors(2, 11)
    with GalleryClient(auth_server.address, token=USER_TOKEN, retries=3) as reader:
        before = _answered(auth_server, "Gallery/CreateGallery", "PERMISSION_DENIED")
        with pytest.raises(PermissionDenied, match="admin token") as info:
            reader.create_gallery("sec_readonly")
        denied = _answered(auth_server, "Gallery/CreateGallery", "PERMISSION_DENIED", before + 1)
        assert denied == before + 1 and backoffs == []
        _assert_no_secret(str(info.value))
        with GalleryClient(auth_server.address, token=ADMIN_TOKEN) as admin:
            admin.create_gallery("sec_admin")
            admin.enroll("sec_admin", "ann", [vectors[0]])
        # Reading needs no admin token.
        (result,) = reader.search("sec_admin", [vectors[0]], top_k=1)
        assert result.matches[0].identity == "ann"
        with pytest.raises(PermissionDenied):
            reader.remove_identity("sec_admin", "ann")


def test_request_id_is_sent_echoed_and_reported(auth_server) -> None:
    with (
        Client(auth_server.address, retries=0) as client,
        use_request_id("job-42.part/1"),
        pytest.raises(Unauthenticated) as info,
    ):
        client.info()
    assert info.value.request_id == "job-42.part/1"
    assert "(request id job-42.part/1)" in str(info.value)

    # Per-enrollment errors of a stream carry the stream's request id.
    with GalleryClient(auth_server.address, token=ADMIN_TOKEN) as admin:
        admin.create_gallery("sec_ids")
        admin.enroll("sec_ids", "ann", [png(crop(5))], alignment="aligned")
        with use_request_id("bulk-7"):
            (outcome,) = admin.enroll_many(
                "sec_ids", [("ann", [png(crop(6))])], alignment="aligned"
            )
    assert isinstance(outcome, AlreadyExists) and outcome.request_id == "bulk-7"

    # Without a scope every call gets its own fresh id.
    ids = set()
    for _ in range(2):
        with Client(auth_server.address, retries=0) as client, pytest.raises(Unauthenticated) as e:
            client.info()
        ids.add(e.value.request_id)
    assert len(ids) == 2


def test_bad_tokens_and_request_ids_are_refused_locally_without_echo() -> None:
    for bad in ("", "two words", "tab\there", "naïve-token-ééé"):
        with pytest.raises(ValueError) as info:
            Client("127.0.0.1:1", token=bad)
        if bad:
            assert bad not in str(info.value)
    with pytest.raises(ValueError, match="request_id"), use_request_id("no spaces allowed"):
        pass


def test_read_token_file(tmp_path: Path, token_files) -> None:
    assert read_token_file(token_files.user) == USER_TOKEN
    two = tmp_path / "two"
    two.write_text(f"{USER_TOKEN}\n{ADMIN_TOKEN}\n")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for path, what in ((two, "2 whitespace-separated words"), (empty, "no token")):
        with pytest.raises(ValueError, match=what) as info:
            read_token_file(path)
        _assert_no_secret(str(info.value))


# --------------------------------------------------------------------------------------
# TLS


def test_tls_with_the_ca_works_and_plaintext_or_a_stranger_ca_does_not(tls_server, pki) -> None:
    with Client(tls_server.address, credentials=tls_credentials(pki.ca)) as client:
        assert client.embed([crop(3)], alignment="aligned")[0].shape == (1, 512)

    async def run() -> int:
        async with AsyncClient(tls_server.address, credentials=tls_credentials(pki.ca)) as c:
            return (await c.info()).embedding_dim

    assert asyncio.run(run()) == 512
    for credentials in (None, tls_credentials(pki.other_ca)):
        with (
            Client(tls_server.address, credentials=credentials, retries=0, timeout=10) as client,
            pytest.raises(Unavailable),
        ):
            client.info()


def test_mtls_needs_a_client_certificate_from_the_trusted_ca(mtls_server, pki) -> None:
    with Client(
        mtls_server.address, credentials=tls_credentials(pki.ca, *pki.client), token=USER_TOKEN
    ) as client:
        assert client.info().embedding_dim == 512
    for credentials in (tls_credentials(pki.ca), tls_credentials(pki.ca, *pki.stranger)):
        # Refused at the handshake, before any token is looked at.
        with (
            Client(mtls_server.address, credentials=credentials, token=USER_TOKEN, retries=0) as c,
            pytest.raises(Unavailable),
        ):
            c.info()
    # The certificate alone is not enough where tokens are configured.
    with (
        Client(mtls_server.address, credentials=tls_credentials(pki.ca, *pki.client)) as client,
        pytest.raises(Unauthenticated),
    ):
        client.info()


def test_tls_credentials_refuse_half_a_key_pair_and_non_pem(pki, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="go together"):
        tls_credentials(pki.ca, certificate=pki.client[0])
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"\x00not pem")
    with pytest.raises(ValueError, match="not a PEM file"):
        tls_credentials(junk)


# --------------------------------------------------------------------------------------
# CLIs as subprocesses


def _run(
    script: str, *args: object, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "ADAFACE_TOKEN"}
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, script, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=full_env,
    )
    _assert_no_secret(proc.stdout, proc.stderr)
    return proc


def test_embed_cli_token_file_and_env(auth_server, token_files, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.png").write_bytes(png(crop(8)))
    out = tmp_path / "f.npz"
    common = ("client/embed.py", photos, "--server", auth_server.address, "--aligned")

    proc = _run(*common, "--out", out, "--token-file", token_files.user)
    assert proc.returncode == 0, proc.stderr
    with np.load(out) as data:
        assert data["labels"].tolist() == ["a.png"]
    out.unlink()
    proc = _run(*common, "--out", out, env={"ADAFACE_TOKEN": USER_TOKEN})
    assert proc.returncode == 0, proc.stderr
    assert out.exists()

    proc = _run(*common, "--out", tmp_path / "g.npz")
    assert proc.returncode == 2 and "UNAUTHENTICATED" in proc.stderr
    assert "did not accept the credentials" in proc.stderr
    # The file wins over the environment.
    proc = _run(*common, "--out", tmp_path / "g.npz", "--token-file", token_files.wrong,
                env={"ADAFACE_TOKEN": USER_TOKEN})  # fmt: skip
    assert proc.returncode == 2 and "invalid bearer token" in proc.stderr
    assert not (tmp_path / "g.npz").exists()
    # A token on the command line is refused, and not repeated.
    proc = _run(*common, "--out", tmp_path / "g.npz", "--token", USER_TOKEN)
    assert proc.returncode == 2 and "--token-file" in proc.stderr


def test_gallery_cli_roles_and_mtls(auth_server, mtls_server, token_files, pki) -> None:
    def gallery(server: ServerThread, *args: object, **kw: object) -> subprocess.CompletedProcess:
        return _run("client/gallery.py", "--server", server.address, *args, **kw)

    proc = gallery(auth_server, "--token-file", token_files.user, "create", "sec_cli")
    assert proc.returncode == 2 and "PERMISSION_DENIED" in proc.stderr
    proc = gallery(auth_server, "create", "sec_cli", env={"ADAFACE_TOKEN": ADMIN_TOKEN})
    assert proc.returncode == 0, proc.stderr
    proc = gallery(auth_server, "--token-file", token_files.user, "list")
    assert proc.returncode == 0 and "sec_cli\t" in proc.stdout

    cert, key = pki.client
    tls = ("--tls-ca", pki.ca, "--tls-cert", cert, "--tls-key", key)
    proc = gallery(mtls_server, *tls, "--token-file", token_files.admin, "create", "sec_m")
    assert proc.returncode == 0, proc.stderr
    proc = gallery(mtls_server, "--tls-ca", pki.ca, "--tls-cert", cert, "list")
    assert proc.returncode == 2 and "--tls-key" in proc.stderr
    proc = gallery(mtls_server, "--tls-ca", pki.ca, "--token-file", token_files.user, "list")
    assert proc.returncode == 2 and "UNAVAILABLE" in proc.stderr
    proc = gallery(mtls_server, "--token-file", token_files.dir / "absent", "list")
    assert proc.returncode == 2 and "cannot read" in proc.stderr


def test_unauthenticated_is_not_retried_by_the_embed_loop(auth_server, backoffs) -> None:
    with Client(auth_server.address, token=USER_TOKEN) as client:
        info = client.info()
    with Client(auth_server.address, retries=4, max_in_flight=1) as client:
        client._info = info  # skip Info: the Embed path's own retry loop is exercised
        before = _answered(auth_server, "Embedder/Embed", "UNAUTHENTICATED")
        with pytest.raises(Unauthenticated):
            client.embed([crop(0), crop(1)], alignment="aligned")
    assert backoffs == []
    assert _answered(auth_server, "Embedder/Embed", "UNAUTHENTICATED", before + 1) == before + 1
