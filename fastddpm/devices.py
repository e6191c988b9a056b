"""The one check of a device the user names (--device, device=): it exists here, and fastddpm runs on it.

`check_device("cuda")` on a machine without CUDA, `"cuda:7"` on one with two GPUs, `"mps"` where
Metal is absent, `"meta"` (no data), or `"foo"` each raise a one-line ValueError naming the device
and what is there instead, before any model is loaded or any work is done.
"""

from __future__ import annotations

import torch

SUPPORTED = ("cpu", "cuda", "mps")


def check_device(device: str | torch.device, option: str = "--device") -> torch.device:
    """The torch.device that `device` names, if this machine has it; else a ValueError naming `option`.

    Accepts "cpu", "cuda", "cuda:K" (K < torch.cuda.device_count()) and "mps" where available.
    """
    if isinstance(device, str):
        try:
            parsed = torch.device(device)
        except RuntimeError:
            raise ValueError(
                f"{option} {device!r} is not a device; use cpu, cuda or cuda:K, or mps"
            ) from None
    elif isinstance(device, torch.device):
        parsed = device
    else:
        raise ValueError(f"{option} must be a device name such as 'cpu' or 'cuda:0', got {device!r}")
    if parsed.type not in SUPPORTED:
        raise ValueError(
            f"{option} {str(parsed)!r}: fastddpm runs on {', '.join(SUPPORTED)}, not {parsed.type}"
        )
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{option} {str(parsed)!r}: torch sees no CUDA device here; use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(
                f"{option} {str(parsed)!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}"
            )
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{option} 'mps': torch sees no Metal (MPS) device here; use --device cpu")
    return parsed
