"""The kernels compile for the GPU (sm_90, the H200 that is lent now and then), on a machine
with no GPU: Triton's compiler (with the ptxas its wheel ships) runs without a device. The
interpreter tests check the semantics; this catches what the interpreter accepts but the
compiler does not (types of loop-carried values, scalar/tensor mixes, unsupported ops)."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install 'ragtop[test]')")

COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ragtop.gpu import kernels as K

TYPES = {"q_ptr": "*fp32", "k_ptr": "*fp32", "v_ptr": "*fp32", "kmin_ptr": "*fp32", "kmax_ptr": "*fp32",
         "bound_ptr": "*fp32", "w_ptr": "*fp32", "out_ptr": "*fp32", "table_ptr": "*fp32", "proj_ptr": "*fp32",
         "start_ptr": "*i64", "pos_ptr": "*i64", "ids_ptr": "*i64", "tier_ptr": "*i64", "row_ptr": "*i64",
         "sel_ptr": "*i32", "scale": "fp32"}


def build(fn, **constexprs):
    signature = {n: "constexpr" if n in constexprs else TYPES.get(n, "i32") for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(fn.arg_names.index(n),): v for n, v in constexprs.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert "cubin" in compiled.asm and compiled.asm["cubin"]
    print("compiled", fn.__name__)


build(K._summary_update_kernel, BS=64, BS_P2=64, DH=64, DH_P2=64)
for G, G_P2, DH in ((3, 4, 64), (1, 2, 32)):  # SmolLM2's shape, the small preset's
    build(K._block_bounds_kernel, G=G, G_P2=G_P2, BS=64, TILE=16, DH=DH, DH_P2=DH)
    build(K._block_decode_kernel, G=G, TOPK=256, BUDGET=16, BS=64, SINK=4, WINDOW=64, DH=DH, DH_P2=DH, BS_P2=64,
          NB_P2=2048, SEL_P2=32, CAND_P2=2048, SINK_P2=4, WIN_P2=64)
build(K._ragged_embedding_kernel, W=288, W_CHUNK=128, BLOCK_D=32)
"""


def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier run's cache
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    r = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=300)
    if r.returncode and "ptxas" in r.stderr and "not found" in r.stderr.lower():
        pytest.skip(f"this triton has no ptxas: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("compiled") == 6
