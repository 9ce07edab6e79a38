"""Compile the kernels for a GPU architecture without a GPU: a check that runs in CI.

The interpreter (TRITON_INTERPRET=1) proves the arithmetic but not that a kernel compiles: the
compiler rejects things numpy accepts (non-constexpr globals, some layouts), and only ptxas knows
whether a tile size spills registers. `compile_check(arch)` lowers every kernel, for every
autotune candidate or a chosen subset, through Triton's NVIDIA backend to a cubin (LLVM and the
ptxas that ships inside the triton wheel, no driver) and reports ptxas's registers per thread,
spill bytes (the stack frame) and shared memory.

Run it in a process without TRITON_INTERPRET (the kernels must be @jit, not interpreted):

    python -m qkvgguf.runtime.kernels.aot 80 [--all-configs] [--only gemv,flash]
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import triton

from .dequant import LAYOUTS


@dataclass
class Compiled:
    name: str  # kernel and its constexprs, short
    regs: int
    stack: int  # bytes of local memory per thread: > 0 means ptxas spilled
    shared: int


def _resources(cubin: bytes) -> tuple[int, int]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", text)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no resource usage: {text[:200]}")
    return int(m.group(1)), int(m.group(2))


def compile_kernel(fn, signature: dict, constexprs: dict, arch: int, num_warps: int = 4,
                   num_stages: int = 2, name: str = "") -> Compiled:
    """Lower @jit `fn` for sm_<arch>; signature maps the non-constexpr args to Triton types."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise RuntimeError("kernels are interpreted (TRITON_INTERPRET=1): run compile_check in a fresh process")
    full = {a: ("constexpr" if a in constexprs else signature[a]) for a in fn.arg_names}
    k = triton.compile(ASTSource(fn, full, constexprs=constexprs), target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    regs, stack = _resources(k.asm["cubin"])
    return Compiled(name or fn.__name__, regs, stack, k.metadata.shared)


def _specs(all_configs: bool, arch: int):
    """(fn, signature, constexprs, num_warps, num_stages, name) for every kernel launch we make."""
    qm = importlib.import_module(__package__ + ".qmatmul")
    att = importlib.import_module(__package__ + ".attention")
    norm = importlib.import_module(__package__ + ".norm")
    rope = importlib.import_module(__package__ + ".rope")
    swiglu = importlib.import_module(__package__ + ".swiglu")
    dq = importlib.import_module(__package__ + ".dequant")

    prec = "tf32" if arch >= 80 else "ieee"  # launch.fp32_precision's default
    mm = {"x_ptr": "*fp16", "w8_ptr": "*u8", "w16_ptr": "*i16", "y_ptr": "*fp16", "M": "i32", "N": "i32",
          "NBLK": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_ym": "i32"}
    for qtype, lay in LAYOUTS.items():
        fmt = lay.kernel_args()
        gemv = qm.gemv_configs(qtype) if all_configs else qm.gemv_configs(qtype)[:1]
        for c in gemv:
            for bm in (1, 8) if all_configs else (1,):
                yield (qm._gemv_kernel, mm, {**fmt, **c.kwargs, "BLOCK_M": bm}, c.num_warps, c.num_stages,
                       f"gemv {lay.name} M<={bm} {c.kwargs} w{c.num_warps}")
        gemm = qm.gemm_configs(qtype) if all_configs else qm.gemm_configs(qtype)[:1]
        for c in gemm:
            for f16 in (True, False) if all_configs else (True,):
                sig = {**mm, "x_ptr": "*fp16" if f16 else "*fp32", "y_ptr": "*fp16" if f16 else "*fp32", "M_BUCKET": "i32"}
                yield (qm._gemm_kernel, sig, {**fmt, **c.kwargs, "DOT_F16": f16, "PRECISION": prec},
                       c.num_warps, c.num_stages, f"gemm {lay.name} {'f16' if f16 else 'f32'} {c.kwargs} w{c.num_warps}")
        yield (dq._dequant_rows_kernel,
               {"w8_ptr": "*u8", "w16_ptr": "*i16", "ids_ptr": "*i64", "out_ptr": "*fp32", "NBLK": "i32",
                "stride_wn": "i32", "stride_on": "i32"},
               {**fmt, "NB": max(1, 256 // lay.block_size)}, 4, 2, f"dequant_rows {lay.name}")

    yield (norm._rms_norm_kernel,
           {"x_ptr": "*fp16", "r_ptr": "*fp16", "w_ptr": "*fp32", "out_ptr": "*fp16", "h_ptr": "*fp16", "D": "i32",
            "eps": "fp32", "stride_x": "i32", "stride_r": "i32", "stride_o": "i32", "stride_h": "i32"},
           {"HAS_RESIDUAL": True, "BLOCK_D": 4096}, 16, 1, "rms_norm fused D=4096")
    yield (rope._rope_kernel,
           {"x_ptr": "*fp16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "out_ptr": "*fp16", "H": "i32", "HALF": "i32",
            "stride_xh": "i32", "stride_xt": "i32", "stride_oh": "i32", "stride_ot": "i32", "stride_ct": "i32"},
           {"NEOX": False, "BLOCK_H": 16, "BLOCK_HALF": 64}, 4, 1, "rope d=128")
    for gelu in (False, True):  # SwiGLU (llama) and GeGLU (gemma3)
        yield (swiglu._swiglu_kernel, {"gate_ptr": "*fp16", "up_ptr": "*fp16", "out_ptr": "*fp16", "n": "i32"},
               {"BLOCK": 1024, "GELU": gelu}, 4, 1, "geglu" if gelu else "swiglu")
    kvw = importlib.import_module(__package__ + ".kv_write")
    for fmt in kvw.BLOCK_BYTES:
        code = att.FORMATS[fmt]
        yield (kvw._kv_write_kernel,
               {"x_ptr": "*fp16", "out_ptr": "*u8", "pos_ptr": "*i64", "pos": "i32", **{s: "i32" for s in (
                   "stride_xh", "stride_xt", "stride_oh", "stride_os")}},
               {"NB": 4, "BLOCK_B": 4, "FMT": code, "POS_FROM_PTR": True}, 1, 1, f"kv_write {fmt} d=128")

    def operand(p, fmt, seg, t):
        """Signature of one KV operand's kernel arguments (attention.KVOperand.args)."""
        dense = "*fp16" if fmt == "dense" else "*u8"
        sig = {f"{p}a": t if fmt == "dense" and not seg else "*fp16", f"{p}b": t if fmt == "dense" else dense,
               f"{p}b16": t if fmt == "dense" else "*fp16", f"{p}bs": "*fp16" if seg else (t if fmt == "dense" else "*u8"),
               f"{p}c": t if fmt == "dense" and not seg else "*fp16"}
        ints = ("a_end", "b_end", "sh_a", "ss_a", "sh_b", "ss_b", "sh_bs", "sh_c", "ss_c")
        return {**sig, **{f"{p}_{s}": "i32" for s in ints}}, {f"{p.upper()}_FMT": att.FORMATS[fmt], f"{p.upper()}_SEG": seg}

    caches = [("dense", False, "dense", False), ("q8_0", False, "q8_0", False), ("q4_0", False, "q4_0", False),
              ("q4g_k", True, "q4_0", True)]
    for d in (64, 128):
        for kf, kseg, vf, vseg in caches:
            for f16 in (True, False) if kf == "dense" else (True,):
                t = "*fp16" if f16 else "*fp32"
                ks, kc = operand("k", kf, kseg, t)
                vs, vc = operand("v", vf, vseg, t)
                name = f"d={d} K {kf} V {vf} {'f16' if f16 else 'f32'}"
                quant = kf != "dense"
                pc, dc = att.prefill_config(d, f16, quant), att.decode_config(d, quant)
                yield (att._prefill_kernel,
                       {"q_ptr": t, "o_ptr": t, "T": "i32", "S": "i32", "n_past": "i32", "window": "i32",
                        "ring": "i32", "GROUP": "i32",
                        "qk_scale": "fp32", **{s: "i32" for s in ("stride_qh", "stride_qt", "stride_oh", "stride_ot")},
                        **ks, **vs},
                       {"HEAD_DIM": d, "BLOCK_D": d, "BLOCK_M": pc["block_m"], "BLOCK_N": pc["block_n"], **kc, **vc,
                        "DOT_F16": f16, "PRECISION": prec, "SWA": False},
                       pc["num_warps"], pc["num_stages"], f"flash_prefill {name}")
                yield (att._decode_split_kernel,
                       {"q_ptr": t, "acc_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "n_valid_ptr": "*i32",
                        "n_valid": "i32", "window": "i32", "ring": "i32", "GROUP": "i32", "qk_scale": "fp32", "stride_qh": "i32", **ks, **vs},
                       {"HEAD_DIM": d, "BLOCK_D": d, "BLOCK_H": 16, "BLOCK_N": dc["block_n"],
                        **kc, **vc, "VALID_FROM_PTR": True, "DOT_F16": f16, "PRECISION": prec,
                        "SWA": False},
                       dc["num_warps"], 2, f"flash_decode {name}")
        yield (att._decode_reduce_kernel,
               {"acc_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "o_ptr": "*fp16", "num_splits": "i32",
                "stride_oh": "i32"},
               {"BLOCK_S": 64, "HEAD_DIM": d, "BLOCK_D": d}, 4, 1, f"decode_reduce d={d}")


def compile_check(arch: int, all_configs: bool = False, only: list[str] | None = None) -> list[Compiled]:
    """Compile every kernel (default autotune candidate, or all of them) for sm_<arch>; `only`
    keeps the launches whose name contains one of the given substrings."""
    return [compile_kernel(fn, sig, consts, arch, warps, stages, name)
            for fn, sig, consts, warps, stages, name in _specs(all_configs, arch)
            if not only or any(o in name for o in only)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    arch = int(argv[0]) if argv and argv[0].isdigit() else 80
    only = argv[argv.index("--only") + 1].split(",") if "--only" in argv else None
    rows = compile_check(arch, "--all-configs" in argv, only)
    for r in rows:
        flag = "  SPILLS" if r.stack else ""
        print(f"sm_{arch}  {r.name:<70} regs {r.regs:3d}  stack {r.stack:5d}  smem {r.shared:6d}{flag}")
    return 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("aot: unset TRITON_INTERPRET (the kernels must compile, not interpret)")
    sys.exit(main())
