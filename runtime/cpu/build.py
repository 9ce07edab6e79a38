"""Compile qmatmul.cpp and decode.cpp once per machine and load them with ctypes; None (and one log line) if that fails.

    lib = load()        # ctypes.CDLL, or None: no compiler, a failed build, or QKVGGUF_CPU_KERNELS=0

The library is plain C++ with no torch headers, so a build takes a couple of seconds (torch's
cpp_extension with <torch/extension.h> took ~40x longer here) and needs only a C++ compiler with
OpenMP. It is built for this CPU (-march=native) into the user cache, under a name that hashes the
source, the compiler, the flags and the CPU's feature flags, so an upgrade or another machine
sharing the home directory builds its own. The build writes a temporary file and renames it into
place: two processes building at once both succeed, one rename wins. The compiled library links
libgomp by soname, which resolves to the OpenMP runtime torch already loaded, so both share one
thread pool.

Environment:
    QKVGGUF_CPU_KERNELS=0    never build or load: the torch path (dequantize, float32 matmul)
    QKVGGUF_CACHE_DIR        where builds go (default $XDG_CACHE_HOME/qkvgguf or ~/.cache/qkvgguf)
    CXX                      the compiler (default c++, then g++, then clang++)
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time

log = logging.getLogger(__name__)

_HERE = os.path.dirname(os.path.abspath(__file__))
# the block-format matmuls and the decode step's small ops, compiled into one library
SOURCES = [os.path.join(_HERE, "qmatmul.cpp"), os.path.join(_HERE, "decode.cpp")]
HEADERS = [os.path.join(_HERE, "half.h")]  # part of the build key: an edit rebuilds
# -ffp-contract=off: the dequant functions round like ggml's (no fused q*d + m), so they match the
# reference bit for bit; the SIMD dot products use FMA explicitly
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
ENV_SWITCH = "QKVGGUF_CPU_KERNELS"

_state: dict = {}  # "lib": the loaded library or None once tried


def disabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").lower() in ("0", "false", "off", "no")


def cache_dir() -> str:
    root = os.environ.get("QKVGGUF_CACHE_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qkvgguf")
    return os.path.join(root, "cpu")


def _compiler() -> str | None:
    for cand in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    import platform
    return platform.processor() + platform.machine()


def _key(cxx: str) -> str:
    h = hashlib.sha256()
    for source in SOURCES + HEADERS:
        with open(source, "rb") as f:
            h.update(f.read())
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = cxx
    for part in (version, " ".join(FLAGS), _cpu_flags(), sys.platform):
        h.update(part.encode())
    return h.hexdigest()[:16]


def build(cxx: str) -> str:
    """The path of the compiled library, building it if this source/compiler/CPU has none yet.
    Raises OSError or subprocess.CalledProcessError on failure."""
    out_dir = cache_dir()
    target = os.path.join(out_dir, f"qmatmul-{_key(cxx)}.so")
    if os.path.exists(target):
        return target
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        t0 = time.perf_counter()
        subprocess.run([cxx, *FLAGS, *SOURCES, "-o", tmp], check=True, capture_output=True, text=True, timeout=300)
        os.replace(tmp, target)
        log.info("built the CPU kernels in %.1f s: %s", time.perf_counter() - t0, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    i32, i64, p = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
    lib.qk_block_elems.argtypes = [i32]
    lib.qk_block_elems.restype = i32
    lib.qk_block_bytes.argtypes = [i32]
    lib.qk_block_bytes.restype = i32
    lib.qk_matmul.argtypes = [i32, p, i64, i64, i64, p, i64, p, i32]
    lib.qk_matmul.restype = i32
    lib.qk_dequant_rows.argtypes = [i32, p, i64, i64, i64, i64, p, i32]
    lib.qk_dequant_rows.restype = i32
    lib.qk_dequant_rows_bf16.argtypes = [i32, p, i64, i64, i64, i64, p, i32]
    lib.qk_dequant_rows_bf16.restype = i32
    f32 = ctypes.c_float
    lib.qk_add_rms_norm.argtypes = [p, p, p, i64, i64, f32, p, p, i32]
    lib.qk_add_rms_norm.restype = None
    lib.qk_rope.argtypes = [p, i64, i64, i64, p, p, i32]
    lib.qk_rope.restype = None
    lib.qk_attn_decode.argtypes = [p, p, p, i64, i64, i64, p, p, i32, i64, i64, i64, i64, i64, i64, f32, p, i32]
    lib.qk_attn_decode.restype = i32
    lib.qk_glu.argtypes = [p, p, i64, i32, p]
    lib.qk_glu.restype = None
    return lib


def load() -> ctypes.CDLL | None:
    """The kernels library, built on first call; None (logged once, at warning level) when it cannot be."""
    if "lib" in _state:
        return _state["lib"]
    lib = None
    if disabled():
        log.info("%s=0: CPU matmuls use the torch path (dequantize, float32 matmul)", ENV_SWITCH)
    else:
        cxx = _compiler()
        if cxx is None:
            log.warning("no C++ compiler found (set CXX): CPU matmuls fall back to the torch path "
                        "(dequantize, float32 matmul), several times slower")
        else:
            try:
                import torch  # noqa: F401  (loads torch's libgomp first, so ours resolves to it)
                lib = _bind(ctypes.CDLL(build(cxx)))
            except subprocess.CalledProcessError as e:
                err = (e.stderr or "").strip().splitlines()
                log.warning("building the CPU kernels with %s failed (%s): CPU matmuls fall back to the torch path",
                            cxx, err[-1] if err else f"exit {e.returncode}")
            except (OSError, subprocess.SubprocessError) as e:
                log.warning("the CPU kernels could not be built or loaded (%s): CPU matmuls fall back to the "
                            "torch path", e)
    _state["lib"] = lib
    return lib
