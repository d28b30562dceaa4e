"""The Triton kernels compile for Ampere (sm_80) and Hopper (sm_90) without a GPU, in every dtype they take.

The interpreter runs the kernels' arithmetic on the CPU but never lowers them, so an error that only the
GPU compiler raises (the first GPU run found one: fp64 accumulators rejected by `tl.dot`'s default
out_dtype) passes the interpreter tests. `triton.compile` with an explicit `GPUTarget` lowers them to PTX
and machine code here, as the GPU would at first launch. For the attention kernels the PTX is also read for
what makes them fast: vectorised or asynchronous K/V loads, and tensor-core instructions for half inputs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

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


# ------------------------------------------------------------------------------------------- attention

ATTENTION_INDEX_POINTERS = ("tables_ptr", "lens_ptr", "starts_ptr", "tiles_ptr")
ATTENTION_GROUP = 4  # Llama-3's 32 query heads over 8 KV heads
ATTENTION_PAGE = 16  # the default --block-size


def attention_signature(kernel, data: str, constexprs: dict) -> tuple[dict[str, str], dict]:
    """Argument types and alignment as a launch from kernels.attention_triton on contiguous caches binds them:
    pointers 16-byte aligned and the cache/query strides multiples of 16 elements (head_dim 64 or 128)."""
    types, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            types[name] = "constexpr"
            continue
        if name in ATTENTION_INDEX_POINTERS:
            types[name] = "*i32"
        elif name.startswith("part_"):  # the decode's fp32 partials
            types[name] = "*fp32"
        elif name.endswith("_ptr"):
            types[name] = data
        else:
            types[name] = "fp32" if name == "scale_log2" else "i32"
        if name.endswith("_ptr") or (name.startswith("stride") and name != "stride_table"):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return types, attrs


def compile_attention_kernels(arch: int, dtype_name: str, head_dim: int) -> dict[str, str]:
    """PTX of the decode, reduce and prefill kernels with the constexprs the engine launches them with."""
    from kernels import attention_triton as attn

    dtype = getattr(torch, dtype_name)
    shared = {"HEAD_DIM": head_dim, "BLOCK_D": head_dim, "PAGE": ATTENTION_PAGE, "UPCAST": False,
              "PRECISION": attn.precision(dtype)}
    block_m = attn.PREFILL_ROWS
    launches = {
        "decode": (attn._decode_kernel, shared | {"GROUP": ATTENTION_GROUP, "BLOCK_G": attn.MIN_DOT,
                                                  "BLOCK_N": attn.BLOCK_N}, 4),
        "reduce": (attn._decode_reduce_kernel, {"HEAD_DIM": head_dim, "BLOCK_D": head_dim, "BLOCK_S": 16}, 4),
        "prefill": (attn._prefill_kernel, shared | {"GROUP": ATTENTION_GROUP, "BLOCK_M": block_m,
                                                    "BLOCK_N": attn.BLOCK_N}, attn.prefill_warps(block_m, head_dim)),
    }
    ptx = {}
    for name, (kernel, constexprs, warps) in launches.items():
        types, attrs = attention_signature(kernel, POINTER_TYPES[dtype], constexprs)
        compiled = triton.compile(ASTSource(kernel, types, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": warps})
        assert compiled.asm["cubin"], f"no machine code for {name}"
        ptx[name] = compiled.asm["ptx"]
    return ptx


ATTENTION_COMBOS = [(arch, dtype, head_dim) for arch in (80, 90) for dtype in ("float16", "bfloat16", "float32")
                    for head_dim in (64, 128)]


@pytest.fixture(scope="module")
def attention_ptx() -> dict[tuple[int, str, int], dict[str, str]]:
    """Every combination compiled in one fresh process with the compiler on: the attention kernels call their
    own @triton.jit helpers, which a process that switched the interpreter on (other test modules) holds as
    interpreted functions that `triton.compile` cannot lower."""
    script = (
        "import json, sys\n"
        "from tests.test_kernels_compile import ATTENTION_COMBOS, compile_attention_kernels\n"
        "json.dump([compile_attention_kernels(*combo) for combo in ATTENTION_COMBOS], sys.stdout)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=root,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return dict(zip(ATTENTION_COMBOS, json.loads(done.stdout), strict=True))


@pytest.mark.parametrize(("arch", "dtype", "head_dim"), ATTENTION_COMBOS, ids=lambda v: str(v))
def test_attention_kernels_compile_for_the_gpu(
    attention_ptx: dict, arch: int, dtype: str, head_dim: int
) -> None:
    ptx = attention_ptx[(arch, dtype, head_dim)]
    for name, code in ptx.items():
        assert f".target sm_{arch}" in code, name
    for name in ("decode", "prefill"):
        # K/V rows come in as 16-byte vector loads or asynchronous copies (the key loop's software pipeline).
        assert "ld.global.v4" in ptx[name] or "cp.async" in ptx[name], f"{name}: no vectorised K/V loads"
        if dtype != "float32":  # q k^T and p v on the tensor cores (mma.sync on sm_80, wgmma on sm_90)
            assert "mma" in ptx[name], f"{name}: no tensor-core instructions"
