"""Info.weights names the checkpoint a model was exported from."""

from __future__ import annotations

import hashlib
import logging

import grpc

from adaface.v1 import embedder_pb2, embedder_pb2_grpc
from adaface_server.models.export import export_model

from .server_harness import ServerThread, server_settings


def test_info_names_the_checkpoint_the_model_was_exported_from(tmp_path, ir18_checkpoint):
    logging.getLogger("adaface_server.export").setLevel(logging.ERROR)
    export_model(ir18_checkpoint, "ir_18", tmp_path, "from_ckpt", max_batch_size=4)
    digest = hashlib.sha256(ir18_checkpoint.read_bytes()).hexdigest()
    server = ServerThread(server_settings(tmp_path, "from_ckpt")).start()
    try:
        server.wait_serving()
        with grpc.insecure_channel(server.address) as channel:
            info = embedder_pb2_grpc.EmbedderStub(channel).Info(
                embedder_pb2.InfoRequest(), timeout=30
            )
    finally:
        server.stop()
    assert info.weights == f"checkpoint {ir18_checkpoint.name} (sha256 {digest[:12]})"
