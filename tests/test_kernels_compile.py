"""The Triton kernels compile for Ampere (sm_80) and Hopper (sm_90) without a GPU, in every dtype they take.

The interpreter runs the kernels' arithmetic on the CPU but never lowers them, so an error that only the
GPU compiler raises (the first GPU run found one: fp64 accumulators rejected by `tl.dot`'s default
out_dtype) passes the interpreter tests. `triton.compile` with an explicit `GPUTarget` lowers them to PTX
and machine code here, as the GPU would at first launch.
"""

from __future__ import annotations

import re

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from kernels import triton_ops as ops  # noqa: E402
from kernels.metadata import SMALL_TILE_ROWS  # noqa: E402

POINTER_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64"}
INDEX_POINTERS = ("tiles_ptr", "ranks_ptr", "pages_ptr", "slices_ptr")
UNIT_STRIDES = ("stride_xd", "stride_ad", "stride_bn", "stride_yn")
ALIGNED_SIZES = ("d_in", "split_columns", "max_rank")  # multiples of 16 in every real model and pool


def signature(kernel, data: str, acc: str, constexprs: dict) -> dict[str, str]:
    """Every argument's type as a launch from kernels.triton_ops would bind it."""
    types = {}
    for name in kernel.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name in INDEX_POINTERS:
            types[name] = "*i32"
        elif name == "v_ptr":  # the fp32 (fp64) intermediate
            types[name] = acc
        elif name.endswith("_ptr"):
            types[name] = data
        else:
            types[name] = "i64" if name.startswith("stride") else "i32"
    return types


def compile_for(kernel, dtype: torch.dtype, arch: int, constexprs: dict):
    """Compiled as a launch specialises it: unit strides (the innermost dimension of every tensor) are the
    constant 1, and pointers, the other strides and the sizes are known multiples of 16, as they are for the
    engine's contiguous buffers of a real model (Triton marks each such argument at launch)."""
    if not isinstance(kernel, JITFunction):  # TRITON_INTERPRET=1 (another test module) wrapped it
        kernel = JITFunction(kernel.fn)
    constexprs = constexprs | {"ACC": ops._ACC[dtype]} | {name: 1 for name in UNIT_STRIDES if name in kernel.arg_names}
    types = signature(kernel, POINTER_TYPES[dtype], "*" + ("fp64" if dtype == torch.float64 else "fp32"),
                      constexprs)
    aligned = {
        (kernel.arg_names.index(name),): [["tt.divisibility", 16]]
        for name in kernel.arg_names
        if name not in constexprs and (name.endswith("_ptr") or name.startswith("stride") or name in ALIGNED_SIZES)
    }
    return triton.compile(ASTSource(kernel, types, constexprs, aligned), target=GPUTarget("cuda", arch, 32))


def global_accesses(ptx: str, op: str) -> set[str]:
    """The kinds of global loads ("ld") or stores ("st") in the PTX, e.g. {"ld.global.v4.b32", "ld.global.b16"}."""
    return set(re.findall(rf"\b{op}\.global[.\w]*", ptx))


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", list(POINTER_TYPES), ids=lambda d: str(d).removeprefix("torch."))
def test_shrink_and_expand_compile_for_the_gpu(dtype: torch.dtype, arch: int) -> None:
    vector = 16 // dtype.itemsize  # what a launch on aligned buffers (every real model's) passes
    shrink = compile_for(ops._shrink_kernel, dtype, arch, {
        "RANK_BLOCKS": 4, "PRECISION": ops._precision(dtype, False), "UPCAST": False,
        "BLOCK_M": SMALL_TILE_ROWS, "BLOCK_R": ops.BLOCK_R, "BLOCK_K": ops.BLOCK_K, "D_ALIGN": vector,
    })
    expand = compile_for(ops._expand_kernel, dtype, arch, {
        "NUM_SLICES": 3, "SPLITS": 2, "PRECISION": ops._precision(dtype, True),
        "BLOCK_M": SMALL_TILE_ROWS, "BLOCK_N": ops.BLOCK_N, "BLOCK_R": ops.BLOCK_R, "COL_ALIGN": vector,
    })
    for kernel in (shrink, expand):
        assert kernel.asm["cubin"], "no machine code"
        assert f".target sm_{arch}" in kernel.asm["ptx"]
    if dtype in (torch.float16, torch.bfloat16):
        # Half inputs must reach the tensor cores in the shrink (the reduction over d_in is its whole cost).
        assert "mma" in shrink.asm["ptx"]
    # The expand streams B and y: with aligned slices (every real model's) each access moves 16 bytes.
    wide = {"v4.b32", "v2.b64"}
    assert {a.removeprefix("ld.global.") for a in global_accesses(expand.asm["ptx"], "ld")} & wide, "B, y loads"
    assert {a.removeprefix("st.global.") for a in global_accesses(expand.asm["ptx"], "st")} & wide, "y stores"
    # The shrink copies x and A tiles asynchronously into shared memory (16-byte cp.async, pipelined).
    assert "cp.async" in shrink.asm["ptx"]
