"""The "cuda" backend of fastddpm.ops: the CUDA C++ library built from csrc/.

setup.py compiles csrc/ into `fastddpm/_lib/libfastddpm_cuda.so` wherever nvcc exists. The library
is torch-free (its C ABI is csrc/include/fastddpm/fastddpm.h); `_library.py` loads it with ctypes
and says whether it can run here. One file per op, like csrc/<op>.cu (`group_norm_silu.py`,
`attention.py`, `ddpm_step.py`, `multistep_update.py`), holds top to bottom the op's limits
(checked here, as ValueError), its launcher (`launch_<op>`: marshal the tensors, launch on a given
CUDA stream), its custom op `torch.ops.fastddpm_cuda.<op>` (fastddpm.custom_ops: a fake, so
torch.compile(fullgraph=True) keeps one graph, and a backward through the reference, so training
can use the fused forward; none for multistep_update, which writes its history in place) and the
function `<op>` that fastddpm.ops calls, with the reference's signature. The custom ops launch on
the current stream of their tensors' device, so a step can be captured in a CUDA graph.
"""

from . import attention, ddpm_step, group_norm_silu, multistep_update
from ._library import (
    ABI_VERSION,
    ERROR_CUDA,
    ERROR_INVALID_VALUE,
    ERROR_NOT_SUPPORTED,
    EXPORTED_SYMBOLS,
    MAX_SLOTS,
    NOISE_PHILOX,
    NOISE_TENSOR,
    SUCCESS,
    library_info,
    library_path,
    load_library,
    open_library,
    philox_normal_host,
    unavailable_reason,
)
from .attention import attention_plan, launch_attention
from .ddpm_step import launch_ddpm_step
from .group_norm_silu import group_norm_silu_plan, launch_group_norm_silu
from .multistep_update import launch_multistep_update

__all__ = [
    "ABI_VERSION",
    "ERROR_CUDA",
    "ERROR_INVALID_VALUE",
    "ERROR_NOT_SUPPORTED",
    "EXPORTED_SYMBOLS",
    "MAX_SLOTS",
    "NOISE_PHILOX",
    "NOISE_TENSOR",
    "SUCCESS",
    "attention",
    "attention_plan",
    "ddpm_step",
    "group_norm_silu",
    "group_norm_silu_plan",
    "launch_attention",
    "launch_ddpm_step",
    "launch_group_norm_silu",
    "launch_multistep_update",
    "library_info",
    "library_path",
    "load_library",
    "multistep_update",
    "open_library",
    "philox_normal_host",
    "unavailable_reason",
]
