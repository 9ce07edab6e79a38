"""Backend choice, in one place: Triton kernels on capable CUDA GPUs, the torch ops elsewhere.

    select_backend("auto")    "triton" on a CUDA GPU of compute capability >= 7.5 with triton
                              installed, else "torch" (CPU, Pascal and older GPUs, no triton)
    select_backend("torch")   "torch", always
    select_backend("triton")  "triton", or QkvggufError saying why not; without CUDA it is allowed
                              only under TRITON_INTERPRET=1 (the kernels then run on CPU tensors,
                              slowly: a test mode)

Nothing here imports triton or touches the GPU beyond querying the device's capability.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from qkvgguf.errors import QkvggufError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "torch")
MIN_CAPABILITY = (7, 5)  # Turing: the oldest architecture Triton compiles for


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _why_not_triton(device: torch.device) -> str | None:
    """None when the Triton kernels can run on device, else the one-line reason."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'qkvgguf[triton]')"
    if device.type != "cuda":
        return f"device {device} is not a CUDA GPU"
    if not torch.cuda.is_available():
        return "CUDA is not available to torch"
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return (f"{name} has compute capability {cap[0]}.{cap[1]}, Triton needs "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer")
    return None


def select_backend(name: str = "auto", device: torch.device | str | None = None) -> str:
    """'triton' or 'torch' for `name` in auto/triton/torch on `device` (default: cuda if present)."""
    if name not in BACKENDS:
        raise QkvggufError(f"backend '{name}' is not one of {', '.join(BACKENDS)}")
    if name == "torch":
        return "torch"
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    reason = _why_not_triton(device)
    if name == "auto":
        if reason is not None:
            log.debug("backend auto -> torch: %s", reason)
            return "torch"
        return "triton"
    # name == "triton": forced
    if reason is None:
        return "triton"
    if device.type == "cpu" and _interpreting() and importlib.util.find_spec("triton") is not None:
        log.info("backend triton on CPU: TRITON_INTERPRET=1, kernels run in the interpreter")
        return "triton"
    raise QkvggufError(f"backend triton is not available: {reason} (use --backend torch, or TRITON_INTERPRET=1 to test on CPU)")
