"""The "cuda" backend of fastddpm.ops: the CUDA C++ library built from csrc/. Not built yet."""


def unavailable_reason() -> str | None:
    """Why `fastddpm.ops` cannot use this backend (None once it can)."""
    return "the CUDA library (csrc/) is not built in this version of fastddpm"
