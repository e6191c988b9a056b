"""The CUDA library's kernels on sm_90, as ptxas reports them: the hot ones neither spill nor keep
a local-memory stack frame; and the arithmetic of benchmarks/resources.py (the ptxas report
parser, H100 occupancy, which kernels are hot) on hand-worked cases.

The library's objects are rebuilt for sm_90 with setup.py's sources and flags plus -Xptxas -v
(one nvcc job, about 25 s on two cores) into a temporary folder; kernel names come from ptxas's
report, so the tests follow whatever kernels csrc/ instantiates.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import resources


@pytest.fixture(scope="module")
def kernels(tmp_path_factory) -> list[dict]:
    try:
        return resources.cuda_kernel_resources(tmp_path_factory.mktemp("cuda-resources"))
    except FileNotFoundError as err:  # as setup.py, which then installs without the library
        pytest.skip(str(err))


OPS = ("attention", "group_norm_silu", "ddpm_step", "multistep_update")


def test_every_op_has_kernels_on_sm90(kernels):
    assert {k["arch"] for k in kernels} == {"sm_90"}
    names = [k["kernel"] for k in kernels]
    for op in OPS:
        assert any(n.startswith(op) for n in names), (op, names)
    hot = resources.hot_kernels(names)
    for op in OPS:
        assert any(n.startswith(op) for n in hot), (op, sorted(hot))


def test_hot_kernels_neither_spill_nor_use_a_stack_frame(kernels):
    """Hot: every kernel a production launch can take (resources.hot_kernels): the vectorized
    group_norm_silu_kernel, ddpm_step_vec_kernel and multistep_update_vec_kernel instantiations,
    and the attention kernels for head dims 8, 256 and 512. Local memory (spills, or arrays indexed
    at run time) is device memory traffic in the innermost loops."""
    hot = resources.hot_kernels([k["kernel"] for k in kernels])
    heavy = [
        k for k in kernels if k["kernel"] in hot and (k["stack"] or k["spill_stores"] or k["spill_loads"])
    ]
    assert not heavy, json.dumps(heavy, indent=1)


PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 12 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 72 registers, used 1 barriers, 8 bytes cumulative stack size
ptxas info    : Compile time = 169.816 ms
ptxas info    : Function properties for _Z6helperv
    24 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function '_Z3barv' for 'sm_90'
ptxas info    : Function properties for _Z3barv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 128 bytes smem, 400 bytes cmem[0]
"""


def test_parse_ptxas_reads_each_entry_function():
    assert resources.parse_ptxas(PTXAS_LOG) == [
        {
            "name": "_Z3fooPf",
            "arch": "sm_90",
            "stack": 8,
            "spill_stores": 12,
            "spill_loads": 20,
            "regs": 72,
            "smem": 0,
        },
        {
            "name": "_Z3barv",
            "arch": "sm_90",
            "stack": 0,
            "spill_stores": 0,
            "spill_loads": 0,
            "regs": 40,
            "smem": 128,
        },
    ]


def test_parse_ptxas_refuses_a_report_without_registers():
    with pytest.raises(ValueError, match="without a register count"):
        resources.parse_ptxas("ptxas info    : Compiling entry function '_Z3foov' for 'sm_90'\n")


@pytest.mark.parametrize(
    "regs, threads, shared, expected",
    [
        # 154 regs -> 20 x 256 = 5120 per warp; 16384 // 5120 = 3 warps per sub-partition, 12 per SM:
        # one 8-warp block (registers); shared 96 KiB + 1 KiB allows 2; occupancy 8 / 64
        (154, 256, 96 * 1024, 8 / 64),
        # 32 regs, 4 warps, no shared: 16 blocks by threads (2048 / 128) and by registers (64 / 4)
        (32, 128, 0, 1.0),
        # 16 regs, 1 warp: the 32-block limit leaves 32 warps
        (16, 32, 0, 0.5),
        # 128 regs, 8 warps, 64 KiB shared: registers allow 4 warps per sub-partition = 2 blocks,
        # shared 228 KiB // (65 KiB) = 3 blocks; 16 / 64
        (128, 256, 64 * 1024, 0.25),
        # 40 regs, 16 warps, 100 KiB: 2 blocks fit 228 KiB (2 x 101 KiB), registers 3 (48 / 16)
        (40, 512, 100 * 1024, 0.5),
        # more than a block may have
        (32, 128, 228 * 1024, 0.0),
    ],
)
def test_occupancy_by_hand(regs, threads, shared, expected):
    assert resources.occupancy(regs, threads, shared) == pytest.approx(expected)


def test_warps_by_registers_counts_sub_partitions():
    # 192 regs: 6144 per warp; 65536 // 6144 would be 10 warps, but each sub-partition of 16384
    # holds only 2: 8 warps
    assert resources.warps_by_registers(192) == 8
    assert resources.warps_by_registers(255) == 4 * (16384 // 8192)
    assert resources.warps_by_registers(1) == 64


def test_hot_kernels_by_name():
    names = [
        "attention_tc_kernel<__half, 16>(fastddpm::AttentionParams)",
        "attention_tc_kernel<__half, 64>(fastddpm::AttentionParams)",
        "attention_tc_kernel<__half, 256>(fastddpm::AttentionParams)",
        "attention_tc_kernel<__half, 512>(fastddpm::AttentionParams)",
        "attention_simt_kernel<32>(fastddpm::AttentionParams)",
        "attention_simt_kernel<64>(fastddpm::AttentionParams)",
        "attention_simt_kernel<512>(fastddpm::AttentionParams)",
        "ddpm_step_vec_kernel<float, float, 2, 4>(fastddpm::DdpmStepParams)",
        "ddpm_step_scalar_kernel<float, float, 2>(fastddpm::DdpmStepParams)",
        "group_norm_silu_scalar_kernel<float, 0>(fastddpm::GroupNormParams, bool)",
        "probe_kernel()",
    ]
    assert resources.hot_kernels(names) == {
        names[0],  # D = 8 takes the smallest bound, 16
        names[2],
        names[3],
        names[4],  # fp32 D = 8 takes 32
        names[6],  # fp32 D = 256 and 512 both take 512 (no 256 instantiation here)
        names[7],
    }
