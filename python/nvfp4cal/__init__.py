"""nvfp4cal: calibrate LLM weights into NVIDIA NVFP4 from PyTorch.

    import nvfp4cal
    with nvfp4cal.capture(model, layout="full") as cap:   # hooks on every nn.Linear
        for batch in batches:
            model(batch)
    cap.save("hessians.safetensors")                      # what `nvfp4cal quantize` reads
    q = nvfp4cal.Client(["host:50051"]).quantize(weight, hessian=H, method="dss")
    # or layer by layer, earlier layers replaced by their dequantized NVFP4 weights:
    nvfp4cal.calibrate_sequential(model, batches, client, method="gptq").save("hessians.safetensors")
    # fine-tune the block scales of a checkpoint against the model (distillation):
    nvfp4cal.finetune_scales(model, "model-nvfp4", train_windows, val_windows, out="model-ft")

`capture` needs torch only. `Client` needs grpcio, protobuf and the generated stubs, and is
imported on first use (see nvfp4cal._proto for where the stubs come from).
"""

__version__ = "0.1.0"

from .capture import (CaptureMemoryError, HessianCapture, capture,  # noqa: E402
                      layout_for_method)
from .hessians_file import (read_safetensors, resolve_hessian_entry,  # noqa: E402
                            write_hessians, write_safetensors)
from .finetune import (FinetuneError, FinetuneResult, finetune_scales,  # noqa: E402
                       snap_e4m3)
from .sequential import (LocalServer, SequentialCalibration, SequentialError,  # noqa: E402
                         calibrate_sequential, find_decoder_layers)

__all__ = ["__version__", "capture", "HessianCapture", "CaptureMemoryError", "layout_for_method",
           "write_hessians", "write_safetensors", "read_safetensors", "resolve_hessian_entry",
           "calibrate_sequential", "SequentialCalibration", "SequentialError", "LocalServer",
           "find_decoder_layers", "finetune_scales", "FinetuneResult", "FinetuneError",
           "snap_e4m3",
           "Client", "Session", "QuantizedTensor", "ServerError"]

_CLIENT_NAMES = ("Client", "Session", "QuantizedTensor", "ServerError")


def __getattr__(name):
    """nvfp4cal.Client and friends, imported lazily (grpcio and the stubs load only then)."""
    if name in _CLIENT_NAMES:
        from . import client  # pylint: disable=import-outside-toplevel
        return getattr(client, name)
    raise AttributeError(f"module 'nvfp4cal' has no attribute {name!r}")
