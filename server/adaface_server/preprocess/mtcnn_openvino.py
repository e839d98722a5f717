"""MTCNN's three nets compiled by OpenVINO for the CPU (--detect-runtime openvino).

OpenVINO's CPU plugin runs the nets' few-channel convolutions, PReLUs and pools from one
compiled graph per net; torch runs them op by op through its OpenMP pool, which loses most
of its speed when the model thread wants the same cores (bench/bench_detect.py). P-Net takes
any image size (one pyramid level at a time), R-Net and O-Net any number of crops.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .mtcnn_nets import ONet, PNet, RNet

# precision -> OpenVINO's INFERENCE_PRECISION_HINT
HINTS = {"fp32": "f32", "bf16": "bf16"}


class OpenVinoNets:
    """Compiled P-Net, R-Net and O-Net; `run(name, x)` returns each output as float32 numpy.

    Not thread-safe: one infer request per net (MTCNN calls it under its lock)."""

    def __init__(self, nets: tuple[PNet, RNet, ONet], precision: str, threads: int) -> None:
        import openvino as ov

        if precision not in HINTS:
            raise ValueError(f"OpenVINO runs MTCNN in fp32 or bf16, not {precision}")
        core = ov.Core()
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": HINTS[precision],
            "PERFORMANCE_HINT": "LATENCY",
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        shapes = {"pnet": [1, 3, -1, -1], "rnet": [-1, 3, 24, 24], "onet": [-1, 3, 48, 48]}
        examples = {"pnet": (1, 3, 48, 48), "rnet": (2, 3, 24, 24), "onet": (2, 3, 48, 48)}
        self._tensor = ov.Tensor
        self._requests = {}
        for name, net in zip(("pnet", "rnet", "onet"), nets, strict=True):
            model = ov.convert_model(
                net,
                example_input=torch.zeros(examples[name]),
                input=[ov.PartialShape(shapes[name])],
            )
            model = _pixels_in(model)
            self._requests[name] = core.compile_model(model, "CPU", config).create_infer_request()

    def run(self, name: str, pixels: np.ndarray) -> list[np.ndarray]:
        """Runs a net on uint8 NHWC RGB pixels; each output as float32 numpy (a copy).

        The input is shared with OpenVINO and the outputs read from the request's own
        tensors: ~75 us a call against ~127 for `infer([array])`'s generic dispatch (a
        photo makes ~20 P-Net calls)."""
        request = self._requests[name]
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        request.set_input_tensor(self._tensor(pixels, shared_memory=True))
        request.infer()
        outputs = len(request.model_outputs)
        return [request.get_output_tensor(i).data.astype(np.float32) for i in range(outputs)]


def _pixels_in(model: Any) -> Any:
    """The net fed uint8 NHWC pixels, normalised in the graph as MTCNN does:
    (x - 127.5) / 128 in f32 (exact for whole pixels, as torch's (x - 127.5) * 0.0078125)."""
    from openvino import Layout, Type
    from openvino.preprocess import PrePostProcessor

    ppp = PrePostProcessor(model)
    ppp.input().tensor().set_element_type(Type.u8).set_layout(Layout("NHWC"))
    ppp.input().model().set_layout(Layout("NCHW"))
    ppp.input().preprocess().convert_element_type(Type.f32).mean(127.5).scale(128.0)
    return ppp.build()
