"""A client killed with its uploads still open leaves nothing behind: its Import is not
committed even when the stream already carried a whole export file, and its calls are logged
CANCELLED, never OK. (grpc.aio ends a dropped connection's request stream the way it ends a
half-closed one; the server waits for the cancellation that follows before acting on it.)"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
import time

import grpc

from adaface.v1 import gallery_pb2, gallery_pb2_grpc

from .gallery_support import (
    REPO,
    free_port,
    start_server_process,
    unit_vectors,
    vector_sample,
    wait_serving,
)

ROUNDS = 5

# The dying client: opens an Import carrying a whole export file (gallery `name`), an
# EnrollStream with one acknowledged enrollment (identity `name`) and an EmbedStream with one
# answered image, never half-closes any of them, says "ready" and waits to be killed.
CLIENT = textwrap.dedent(
    """
    import struct, sys, threading, time
    import grpc
    from adaface.v1 import common_pb2, embedder_pb2, embedder_pb2_grpc
    from adaface.v1 import gallery_pb2, gallery_pb2_grpc

    address, name, path = sys.argv[1:4]
    data = open(path, "rb").read()
    forever = threading.Event()

    def held(messages):
        yield from messages
        forever.wait()  # never half-close

    channel = grpc.insecure_channel(address)
    gallery = gallery_pb2_grpc.GalleryStub(channel)
    embedder = embedder_pb2_grpc.EmbedderStub(channel)
    header = gallery_pb2.ImportRequest(header=gallery_pb2.ImportHeader(name=name, format=1))
    upload = gallery.Import.future(held([header, gallery_pb2.ImportRequest(data=data)]))
    vector = common_pb2.Embedding(vector=struct.pack("<512f", 1.0, *[0.0] * 511), dim=512)
    enroll = gallery_pb2.EnrollRequest(
        gallery="base", identity=name, samples=[gallery_pb2.GallerySample(vector=vector)]
    )
    acks = gallery.EnrollStream(held([enroll]))
    next(acks)
    crop = common_pb2.ImageInput(raw=common_pb2.RawImage(
        data=bytes(112 * 112 * 3), height=112, width=112))
    embeds = embedder.EmbedStream(held([embedder_pb2.EmbedRequest(images=[crop])]))
    next(embeds)
    time.sleep(0.5)  # the Import's bytes are on the wire and read by now
    print("ready", flush=True)
    forever.wait()
    """
)


def access_lines(text: str, method: str) -> list[str]:
    return [line for line in text.splitlines() if f"{method} " in line and "peer" in line]


def test_a_killed_client_commits_nothing_and_is_logged_cancelled(ir18_repository, tmp_path):
    repository, model = ir18_repository
    port = free_port()
    log = tmp_path / "server.log"
    proc = start_server_process(repository, model, tmp_path / "g.db", port, log)
    address = f"127.0.0.1:{port}"
    try:
        wait_serving(address, proc, log)
        with grpc.insecure_channel(address) as channel:
            gallery = gallery_pb2_grpc.GalleryStub(channel)
            gallery.CreateGallery(gallery_pb2.CreateGalleryRequest(name="base"), timeout=30)
            for i, v in enumerate(unit_vectors(3, seed=5)):
                gallery.Enroll(
                    gallery_pb2.EnrollRequest(
                        gallery="base", identity=f"p{i}", samples=[vector_sample(v)]
                    ),
                    timeout=30,
                )
            export = b"".join(
                c.data for c in gallery.Export(gallery_pb2.ExportRequest(name="base"), timeout=30)
            )
        path = tmp_path / "base.export"
        path.write_bytes(export)

        for round_ in range(ROUNDS):
            name = f"dead-{round_}"
            client = subprocess.Popen(
                [sys.executable, "-c", CLIENT, address, name, str(path)],
                cwd=REPO,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert client.stdout.readline().strip() == "ready", f"round {round_}"
            client.send_signal(signal.SIGKILL)
            client.wait()

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = log.read_text()
            if all(
                len(access_lines(text, m)) >= ROUNDS
                for m in ("Gallery/Import", "Gallery/EnrollStream", "Embedder/EmbedStream")
            ):
                break
            time.sleep(0.2)
        text = log.read_text()
        for method in ("Gallery/Import", "Gallery/EnrollStream", "Embedder/EmbedStream"):
            lines = access_lines(text, method)
            assert len(lines) == ROUNDS, (method, lines)
            for line in lines:
                assert re.search(rf"{method} CANCELLED\b", line), line
        assert "imported gallery dead-" not in text

        with grpc.insecure_channel(address) as channel:
            gallery = gallery_pb2_grpc.GalleryStub(channel)
            names = {
                g.name
                for g in gallery.ListGalleries(
                    gallery_pb2.ListGalleriesRequest(), timeout=30
                ).galleries
            }
            assert names == {"base"}, names
            # Each enrollment acknowledged before its client was killed stands.
            for round_ in range(ROUNDS):
                held = gallery.GetIdentity(
                    gallery_pb2.GetIdentityRequest(gallery="base", identity=f"dead-{round_}"),
                    timeout=30,
                )
                assert held.sample_count == 1
            # The same file, uploaded by a live client that half-closes, is committed.
            done = gallery.Import(
                iter(
                    [
                        gallery_pb2.ImportRequest(
                            header=gallery_pb2.ImportHeader(name="alive", format=1)
                        ),
                        gallery_pb2.ImportRequest(data=export),
                    ]
                ),
                timeout=30,
            )
            assert done.identity_count == 3
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
