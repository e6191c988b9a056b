"""Devices named on the command line, checked before any work: one-line errors, no tracebacks."""

from __future__ import annotations

import torch


def resolve_device(text: str) -> torch.device:
    """ "cpu", "cuda" or "cuda:N" -> torch.device; ValueError (one line) for a name torch does not
    know, a device type fastddpm does not run on, or a CUDA device that is not there."""
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {text!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"device {text!r} is not supported; use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"device {text!r} was asked for, but torch sees no CUDA device")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {text!r}: there are only {torch.cuda.device_count()} CUDA devices")
    return device
