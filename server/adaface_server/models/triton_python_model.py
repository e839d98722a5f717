"""Triton python-backend twin of the exported model: runs `model.pt` beside it (copied as model.py).

The exporter copies this file to `<repository>/<name>/<version>/model.py` for Triton builds
without the PyTorch (libtorch) backend. It serves the same tensors (`INPUT__0` ->
`OUTPUT__0`, `OUTPUT__1`), batching config and KServe gRPC protocol as the `pytorch_libtorch`
entry, so a client cannot tell the two apart. It runs inside Triton's python stub, never
inside adaface-server; it imports nothing from this package.
"""

from __future__ import annotations

import json
import os

import torch
import torch.utils.dlpack
import triton_python_backend_utils as pb_utils

MODEL_FILENAME = "model.pt"


class TritonPythonModel:
    """One model instance: the TorchScript module and the tensor names from config.pbtxt."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        threads = config.get("parameters", {}).get("INTRA_OP_THREAD_COUNT", {})
        if threads.get("string_value", "0") not in ("", "0"):
            torch.set_num_threads(int(threads["string_value"]))
        self.input_name = config["input"][0]["name"]
        self.output_names = [output["name"] for output in config["output"]]
        path = os.path.join(args["model_repository"], args["model_version"], MODEL_FILENAME)
        self.module = torch.jit.load(path, map_location="cpu").eval()

    def execute(self, requests: list) -> list:
        # Triton's dynamic batcher hands over several requests at once: run them as one
        # forward pass, as the libtorch backend does, then give each its own rows back.
        # Tensors cross the stub boundary by DLPack: with numpy 2 in the stub's environment
        # `as_numpy()` returns empty arrays.
        inputs = [
            torch.utils.dlpack.from_dlpack(
                pb_utils.get_input_tensor_by_name(request, self.input_name).to_dlpack()
            )
            for request in requests
        ]
        sizes = [int(x.shape[0]) for x in inputs]
        try:
            with torch.inference_mode():
                outputs = self.module(torch.cat(inputs) if len(inputs) > 1 else inputs[0])
        except Exception as exc:  # reported per request; Triton keeps serving
            error = pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        responses = []
        start = 0
        for size in sizes:
            tensors = [
                pb_utils.Tensor.from_dlpack(
                    name, torch.utils.dlpack.to_dlpack(out[start : start + size].contiguous())
                )
                for name, out in zip(self.output_names, outputs, strict=True)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses

    def finalize(self) -> None:
        self.module = None
