"""The sampler's C kernels (fastllm/_sampling.c), loaded with ctypes, or None where they are not built.

The package builds them as the extension `fastllm._sampling` when a C compiler is there (pip does, with the
wheel); without one it installs without them and the sampler keeps its numpy + ONNX Runtime passes (same
distributions, slower). `FASTLLM_NATIVE=0` turns them off (the tests run the sampler both ways).

Arguments are raw addresses of the caller's C-contiguous buffers; the wrappers here check nothing, so the caller
(the Sampler, which owns its scratch) must pass arrays of the documented dtype and size.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
from pathlib import Path

_P, _I64, _F32, _F64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_double
_SIGNATURES = {  # name: (result, arguments), as fastllm/_sampling.c declares them
    "fl_vectorised": (ctypes.c_int, ()),
    "fl_limit": (ctypes.c_int, (ctypes.c_int,)),
    "fl_exp_rows": (None, (_P, _I64, _P, _I64, _I64, _I64, _P, _P, _I64, _P, _I64)),
    "fl_max_rows": (None, (_P, _I64, _P, _I64, _I64, _P, _P, _I64)),
    "fl_draw_rows": (None, (_P, _I64, _P, _I64, _P, _P, _P, _I64, _I64, _I64, _P, _P, _I64)),
    "fl_search": (_I64, (_P, _I64, _F64)),
    "fl_reaching": (_F64, (_P, _I64, _F32)),
    "fl_inside": (ctypes.c_int, (_P, _I64, _I64, _F64)),
    "fl_top": (_I64, (_P, _I64, _I64, _P, _P)),
    "fl_top_rows": (None, (_P, _I64, _P, _I64, _I64, _P, _I64, _P, _P, _P, _I64)),
    "fl_at_least_rows": (None, (_P, _I64, _P, _I64, _I64, _P, _I64, _P, _P, _I64)),
}


def _path() -> Path | None:
    """The built extension next to this file (an installed package or an editable checkout), if any."""
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (here / f"_sampling{suffix}").is_file():
            return here / f"_sampling{suffix}"
    return None


def _load():
    if os.environ.get("FASTLLM_NATIVE", "1") == "0":
        return None
    path = _path()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    for name, (result, arguments) in _SIGNATURES.items():
        function = getattr(lib, name, None)
        if function is None:  # a stale build from an older source: not used
            return None
        function.restype, function.argtypes = result, arguments
    return lib


lib = _load()  # the loaded library, or None


def description() -> str:
    """What the sampler runs on, for `fastllm info` and bench reports."""
    if lib is None:
        return "numpy + ONNX Runtime (the C sampling kernels are not built or FASTLLM_NATIVE=0)"
    return f"C kernels ({('scalar', 'AVX2 + FMA', 'AVX-512')[lib.fl_vectorised()]})"
