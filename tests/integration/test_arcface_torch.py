"""InsightFace arcface_torch checkpoints: export with their RGB contract, serve them fed RGB."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from google.protobuf import text_format
from PIL import Image
from tritonclient.grpc import model_config_pb2 as mc

from adaface.v1 import common_pb2, embedder_pb2, embedder_pb2_grpc
from adaface_server.models.arcface_iresnet import (
    load_arcface_backbone,
    random_arcface_state_dict,
)
from adaface_server.models.checkpoint import random_state_dict, save_adaface_checkpoint
from adaface_server.models.export import existing_export_matches, main
from adaface_server.models.repository import ModelRepositoryError, load_model_spec

from .server_harness import ServerThread, running, server_settings

ARCFACE_NAME = "arcface_r18"
SEED = 5
RGB_CONTRACT = {"channel_order": "RGB", "normalisation": "(x/255-0.5)/0.5"}
BGR_CONTRACT = {"channel_order": "BGR", "normalisation": "(x/255-0.5)/0.5"}


@pytest.fixture(scope="module")
def arcface_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A backbone.pth as arcface_torch's DDP training saves it: module.* keys, random r18."""
    path = tmp_path_factory.mktemp("arcface") / "backbone.pth"
    state = random_arcface_state_dict("r18", SEED)
    torch.save({"module." + k: v for k, v in state.items()}, path)
    return path


@pytest.fixture(scope="module")
def arcface_repository(arcface_checkpoint, tmp_path_factory) -> Path:
    """The exporter CLI's output for arcface_checkpoint (default model name)."""
    repository = tmp_path_factory.mktemp("arcface_repository")
    argv = ["--format", "arcface_torch", "--arch", "r18", "--max-batch-size", "8"]
    argv += ["--checkpoint", str(arcface_checkpoint), "--repository", str(repository)]
    assert main(argv) == 0
    return repository


@pytest.fixture(scope="module")
def arcface_server(arcface_repository):
    settings = server_settings(arcface_repository, ARCFACE_NAME)
    server = ServerThread(settings).start()
    server.wait_serving()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stub(arcface_server):
    channel = grpc.insecure_channel(arcface_server.address)
    yield embedder_pb2_grpc.EmbedderStub(channel)
    channel.close()


def colour_crop(seed: int) -> np.ndarray:
    """A 112x112 RGB crop whose red and blue channels differ everywhere they can."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:112, 0:112]
    red = (xx * 2 + 10 * seed) % 256
    blue = 255 - (yy * 2) % 256
    green = (xx + yy) % 256
    base = np.stack([red, green, blue], axis=-1) + rng.integers(-20, 20, (112, 112, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def png(arr: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format="PNG")
    return buffer.getvalue()


def eager(checkpoint: Path, crops: list[np.ndarray], order: str) -> tuple[np.ndarray, np.ndarray]:
    """The eager arcface model (not the exported file) fed crops in `order`, float64 maths."""
    model = load_arcface_backbone(checkpoint, "r18")
    rows = []
    for crop in crops:
        pixels = crop if order == "RGB" else crop[:, :, ::-1]
        rows.append(torch.tensor((pixels / 255.0 - 0.5) / 0.5).permute(2, 0, 1).float())
    with torch.inference_mode():
        emb, norm = model(torch.stack(rows))
    return emb.numpy(), norm.numpy()


def served(stub, crops: list[np.ndarray], flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    request = embedder_pb2.EmbedRequest(
        images=[common_pb2.ImageInput(encoded=png(c)) for c in crops],
        options=embedder_pb2.EmbedOptions(flip_fusion=flip),
    )
    results = stub.Embed(request).results
    emb = np.stack([np.frombuffer(r.embedding.vector, "<f4") for r in results])
    return emb, np.array([[r.embedding.norm] for r in results], dtype=np.float32)


# --------------------------------------------------------------------------- export


def test_export_records_the_rgb_contract(arcface_repository, arcface_checkpoint):
    spec = load_model_spec(arcface_repository, ARCFACE_NAME)
    assert spec.arch == "r18" and spec.channel_order == "RGB" and not spec.untrained
    metadata = spec.metadata
    assert metadata["format"] == "arcface_torch"
    assert metadata["input"] == RGB_CONTRACT
    assert metadata["preprocessing"]["color_order"] == "RGB"
    assert metadata["checkpoint_file"] == arcface_checkpoint.name
    # The parity gate ran on this export: TorchScript reproduced the eager model.
    assert metadata["max_abs_diff"] <= 1e-5
    config = text_format.Parse(
        (arcface_repository / ARCFACE_NAME / "config.pbtxt").read_text(), mc.ModelConfig()
    )
    assert config.parameters["channel_order"].string_value == "RGB"
    assert config.parameters["INFERENCE_MODE"].string_value == "true"


def test_torchscript_equals_the_eager_arcface_model(arcface_repository, arcface_checkpoint):
    module = torch.jit.load(str(load_model_spec(arcface_repository, ARCFACE_NAME).model_path))
    x = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.inference_mode():
        got = module(x)
        want = load_arcface_backbone(arcface_checkpoint, "r18")(x)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], want[1], atol=0, rtol=1e-5)


def test_adaface_exports_say_bgr(ir18_repository):
    repository, name = ir18_repository
    spec = load_model_spec(repository, name)
    assert spec.channel_order == "BGR"
    assert spec.metadata["input"] == BGR_CONTRACT and spec.metadata["format"] == "adaface"
    text = (repository / name / "config.pbtxt").read_text()
    config = text_format.Parse(text, mc.ModelConfig())
    assert config.parameters["channel_order"].string_value == "BGR"


def copy_model(source: Path, name: str, target: Path) -> Path:
    root = target / name
    (root / "1").mkdir(parents=True)
    for part in ("1/model.pt", "1/metadata.json", "config.pbtxt"):
        (root / part).write_bytes((source / name / part).read_bytes())
    return root


def test_exports_without_a_contract_are_bgr(tmp_path, arcface_repository):
    root = copy_model(arcface_repository, ARCFACE_NAME, tmp_path)
    metadata = json.loads((root / "1/metadata.json").read_text())
    del metadata["input"]
    (root / "1/metadata.json").write_text(json.dumps(metadata))
    config = text_format.Parse((root / "config.pbtxt").read_text(), mc.ModelConfig())
    del config.parameters["channel_order"]
    (root / "config.pbtxt").write_text(text_format.MessageToString(config))
    assert load_model_spec(tmp_path, ARCFACE_NAME).channel_order == "BGR"


def test_config_and_metadata_that_disagree_are_refused(tmp_path, arcface_repository):
    root = copy_model(arcface_repository, ARCFACE_NAME, tmp_path)
    text = (root / "config.pbtxt").read_text().replace('"RGB"', '"BGR"')
    (root / "config.pbtxt").write_text(text)
    with pytest.raises(ModelRepositoryError, match=r"channel_order 'BGR'.*says 'RGB'"):
        load_model_spec(tmp_path, ARCFACE_NAME)


def test_unknown_channel_order_is_refused(tmp_path, arcface_repository):
    root = copy_model(arcface_repository, ARCFACE_NAME, tmp_path)
    metadata = json.loads((root / "1/metadata.json").read_text())
    metadata["input"]["channel_order"] = "GBR"
    (root / "1/metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ModelRepositoryError, match=r"input\.channel_order.*'GBR'"):
        load_model_spec(tmp_path, ARCFACE_NAME)


def test_if_missing_tells_formats_apart(arcface_repository, arcface_checkpoint):
    args = (arcface_repository, ARCFACE_NAME, 1, "r18", arcface_checkpoint)
    assert existing_export_matches(*args, model_format="arcface_torch")
    assert not existing_export_matches(*args, model_format="adaface")


def test_cli_refuses_an_adaface_arch_for_arcface_torch(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["--format", "arcface_torch", "--arch", "ir_50", "--repository", str(tmp_path)])
    assert err.value.code == 2
    assert "'ir_50' is not a arcface_torch arch" in capsys.readouterr().err


def test_cli_refuses_a_checkpoint_of_the_other_format(tmp_path, arcface_checkpoint, capsys):
    logging.getLogger("adaface_server.export").setLevel(logging.ERROR)
    adaface = save_adaface_checkpoint(random_state_dict("ir_18", 0), tmp_path / "a.ckpt")
    argv = ["--repository", str(tmp_path / "repo")]
    code = main(["--format", "arcface_torch", "--arch", "r18", "--checkpoint", str(adaface), *argv])
    assert code == 2
    assert "use --format adaface" in capsys.readouterr().err
    code = main(["--arch", "ir_18", "--checkpoint", str(arcface_checkpoint), *argv])
    assert code == 2
    assert "has no backbone weights" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").rglob("model.pt"))


# --------------------------------------------------------------------------- serving


def test_info_shows_the_rgb_contract(stub, arcface_server):
    info = stub.Info(embedder_pb2.InfoRequest())
    assert info.model_name == ARCFACE_NAME and info.arch == "r18"
    assert info.channel_order == "RGB"
    assert info.model_checksum == arcface_server.spec.checksum
    assert not info.untrained


def test_served_embeddings_equal_the_eager_model_fed_rgb(stub, arcface_checkpoint):
    crops = [colour_crop(s) for s in range(3)]
    emb, norms = served(stub, crops)
    want_emb, want_norms = eager(arcface_checkpoint, crops, "RGB")
    np.testing.assert_allclose(emb, want_emb, atol=1e-4, rtol=0)
    np.testing.assert_allclose(norms, want_norms, rtol=1e-4)
    # Fed BGR the same net gives other vectors: the server really feeds RGB.
    bgr_emb, _ = eager(arcface_checkpoint, crops, "BGR")
    assert np.abs(emb - bgr_emb).max() > 1e-2
    assert np.abs(want_emb - bgr_emb).max() > 1e-2


def test_flip_fusion_fuses_rgb_views(stub, arcface_checkpoint):
    crops = [colour_crop(7)]
    emb, norms = served(stub, crops, flip=True)
    views, view_norms = eager(arcface_checkpoint, [crops[0], crops[0][:, ::-1]], "RGB")
    total = (views * view_norms).sum(axis=0)
    np.testing.assert_allclose(emb[0], total / np.linalg.norm(total), atol=1e-4, rtol=0)
    np.testing.assert_allclose(norms[0, 0], np.linalg.norm(total), rtol=1e-4)


# --------------------------------------------------------------------------- Triton


def triton_metadata(name: str):
    """What Triton's get_model_metadata returns for an exported model."""
    from tritonclient.grpc import service_pb2

    tensor = service_pb2.ModelMetadataResponse.TensorMetadata
    return service_pb2.ModelMetadataResponse(
        name=name,
        versions=["1"],
        inputs=[tensor(name="INPUT__0", datatype="FP32", shape=[-1, 3, 112, 112])],
        outputs=[
            tensor(name="OUTPUT__0", datatype="FP32", shape=[-1, 512]),
            tensor(name="OUTPUT__1", datatype="FP32", shape=[-1, 1]),
        ],
    )


def adopt(local_repository: Path, served_config_path: Path):
    """The spec the Triton backend adopts for a served config, given a local repository."""
    from adaface_server.backends.triton import TritonBackend

    settings = server_settings(
        local_repository, ARCFACE_NAME, backend="triton", triton_url="127.0.0.1:1"
    )
    config = text_format.Parse(served_config_path.read_text(), mc.ModelConfig())
    return TritonBackend(settings)._adopt(triton_metadata(ARCFACE_NAME), config)


def test_triton_takes_the_channel_order_from_the_served_config(tmp_path, arcface_repository):
    served_config = arcface_repository / ARCFACE_NAME / "config.pbtxt"
    assert adopt(arcface_repository, served_config).channel_order == "RGB"
    # No local copy: Triton's config alone decides.
    (tmp_path / "empty").mkdir()
    assert adopt(tmp_path / "empty", served_config).channel_order == "RGB"
    # A served config without the parameter (an older export) and no local copy: BGR.
    legacy = tmp_path / "legacy.pbtxt"
    config = text_format.Parse(served_config.read_text(), mc.ModelConfig())
    del config.parameters["channel_order"]
    legacy.write_text(text_format.MessageToString(config))
    assert adopt(tmp_path / "empty", legacy).channel_order == "BGR"


def test_triton_refuses_a_local_copy_with_another_channel_order(tmp_path, arcface_repository):
    from adaface_server.errors import FailedPrecondition

    root = copy_model(arcface_repository, ARCFACE_NAME, tmp_path / "local")
    metadata = json.loads((root / "1/metadata.json").read_text())
    metadata["input"]["channel_order"] = "BGR"
    (root / "1/metadata.json").write_text(json.dumps(metadata))
    (root / "config.pbtxt").write_text(
        (root / "config.pbtxt").read_text().replace('"RGB"', '"BGR"')
    )
    served_config = arcface_repository / ARCFACE_NAME / "config.pbtxt"
    with pytest.raises(FailedPrecondition, match="channel_order is 'RGB' but the local"):
        adopt(tmp_path / "local", served_config)


@pytest.fixture(scope="module")
def arcface_triton_server(arcface_repository, tmp_path_factory):
    """The arcface model served by a real tritonserver (python-backend twin) behind the server."""
    from adaface_server.models.export import export_python_backend

    from .triton_harness import (
        TritonProcess,
        TritonUnavailable,
        find_tritonserver,
        missing_tritonserver,
    )

    try:
        install = find_tritonserver()
    except TritonUnavailable as exc:
        missing_tritonserver(exc)
    twin = tmp_path_factory.mktemp("arcface_triton_repository")
    export_python_backend(arcface_repository, ARCFACE_NAME, twin, threads=1)
    log_path = tmp_path_factory.mktemp("arcface_triton_logs") / "tritonserver.log"
    triton = TritonProcess(twin, log_path, install).start()
    try:
        settings = server_settings(
            arcface_repository, ARCFACE_NAME, backend="triton", triton_url=triton.url
        )
        with running(settings) as (server,):
            yield server
    finally:
        triton.stop()


def test_triton_path_feeds_rgb(arcface_triton_server, arcface_checkpoint):
    channel = grpc.insecure_channel(arcface_triton_server.address)
    try:
        stub = embedder_pb2_grpc.EmbedderStub(channel)
        info = stub.Info(embedder_pb2.InfoRequest())
        assert (info.backend, info.channel_order) == ("triton", "RGB")
        crops = [colour_crop(s) for s in range(2)]
        emb, norms = served(stub, crops)
    finally:
        channel.close()
    want_emb, want_norms = eager(arcface_checkpoint, crops, "RGB")
    np.testing.assert_allclose(emb, want_emb, atol=1e-4, rtol=0)
    np.testing.assert_allclose(norms, want_norms, rtol=1e-4)
    bgr_emb, _ = eager(arcface_checkpoint, crops, "BGR")
    assert np.abs(emb - bgr_emb).max() > 1e-2


# --------------------------------------------------------------------------- galleries


def test_a_gallery_filled_by_the_rgb_model_refuses_a_bgr_model(
    tmp_path, arcface_repository, ir18_repository
):
    """The gallery pin (the model file's sha256) covers the channel order: an AdaFace (BGR)
    server sharing the store cannot add its embeddings to a gallery an arcface (RGB) filled."""
    from adaface.v1 import gallery_pb2, gallery_pb2_grpc

    store = tmp_path / "galleries.db"
    sample = gallery_pb2.GallerySample(image=common_pb2.ImageInput(encoded=png(colour_crop(1))))
    checksums = []
    for repository, name in ((arcface_repository, ARCFACE_NAME), ir18_repository):
        server = ServerThread(server_settings(repository, name, gallery_path=store)).start()
        try:
            server.wait_serving()
            checksums.append(server.spec.checksum)
            with grpc.insecure_channel(server.address) as channel:
                gallery = gallery_pb2_grpc.GalleryStub(channel)
                if name == ARCFACE_NAME:
                    info = gallery.CreateGallery(gallery_pb2.CreateGalleryRequest(name="rgb"))
                    assert info.model_checksum == server.spec.checksum
                    gallery.Enroll(
                        gallery_pb2.EnrollRequest(gallery="rgb", identity="a", samples=[sample])
                    )
                    continue
                request = gallery_pb2.EnrollRequest(gallery="rgb", identity="b", samples=[sample])
                with pytest.raises(grpc.RpcError) as err:
                    gallery.Enroll(request, timeout=60)
        finally:
            server.stop()
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert checksums[0] in err.value.details() and checksums[1] in err.value.details()


def test_a_bf16_arcface_export_keeps_the_rgb_contract_within_its_gate(arcface_checkpoint, tmp_path):
    """--precision applies to arcface_torch backbones too: the reduced model's features come
    from the same unnormalised output, and the exported file still wants RGB."""
    argv = ["--format", "arcface_torch", "--arch", "r18", "--precision", "bf16"]
    argv += ["--checkpoint", str(arcface_checkpoint), "--repository", str(tmp_path)]
    argv += ["--name", "arcface_bf16"]
    assert main(argv) == 0
    meta = json.loads((tmp_path / "arcface_bf16" / "1" / "metadata.json").read_text())
    assert meta["precision"] == "bf16" and meta["input"]["channel_order"] == "RGB"
    assert meta["min_cosine"] >= 0.999
    crops = [colour_crop(seed) for seed in range(4)]
    reference, _ = eager(arcface_checkpoint, crops, "RGB")
    scripted = torch.jit.load(str(tmp_path / "arcface_bf16" / "1" / "model.pt"))
    rgb = np.stack([c.transpose(2, 0, 1) for c in crops])  # the model's own RGB order
    x = (torch.from_numpy(rgb).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        emb, norm = scripted(x)
    assert emb.dtype == torch.float32 and norm.dtype == torch.float32
    cosine = (emb.numpy() * reference).sum(axis=1)
    assert cosine.min() >= 0.999, cosine
