"""Build (on first use) and load the C++ block kernels, or say why the torch path is used.

The extension is compiled by ``torch.utils.cpp_extension.load`` (JIT, ninja) into
``llmsh_home()/kernels/<torch version>-<python>`` (as inductor keeps its cache), so a later process loads
the built library in milliseconds. It registers ``torch.ops.llmsh_kernels.{mm, dequantize,
quantize, set_isa}``. The instruction set is chosen at run time from the CPU's features
(AVX-512 VNNI, else AVX-VNNI, else AVX2 + FMA); ``LLMSH_KERNELS_ISA=avx2|avxvnni|avx512vnni``
forces one (tests use it to run the AVX2 path on an AVX-512 machine). ``LLMSH_KERNELS=torch``
skips the extension. Any failure to build or load (no C++ compiler, no AVX2) leaves
:func:`kernels` returning None, with one :class:`RuntimeWarning` naming the reason.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from pathlib import Path

ISAS = ("avx2", "avxvnni", "avx512vnni")      # ids 1, 2, 3 of ops.cpp's set_isa
_SOURCES = ("ops.cpp", "isa_avx2.cpp", "isa_avxvnni.cpp", "isa_avx512vnni.cpp")
_lock = threading.Lock()
_state: dict = {}


def build_dir() -> Path:
    """Where the built extension is cached: ``llmsh_home()/kernels/torch-<version>-py<X.Y>``."""
    import torch

    from llmsh.hub import llmsh_home

    tag = f"torch-{torch.__version__}-py{sys.version_info[0]}.{sys.version_info[1]}".replace("+", "_")
    return llmsh_home() / "kernels" / tag


def _build():
    """Compile (or reuse) and load the extension; returns ``torch.ops.llmsh_kernels``."""
    import torch
    from torch.utils import cpp_extension

    src = Path(__file__).parent / "csrc"
    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="llmsh_kernels", sources=[str(src / s) for s in _SOURCES], build_directory=str(out),
        # -fopenmp: at::parallel_for is an inline OpenMP region; the GOMP symbols resolve to the
        # libgomp that torch has already loaded globally (no second OpenMP runtime is linked).
        extra_cflags=["-O3", "-fopenmp"], extra_include_paths=[str(src)], is_python_module=False, verbose=False)
    return torch.ops.llmsh_kernels


def _select_isa(ops) -> str:
    want = os.environ.get("LLMSH_KERNELS_ISA", "").strip().lower()
    if want and want not in ISAS:
        raise RuntimeError(f"LLMSH_KERNELS_ISA={want!r} is not one of {', '.join(ISAS)}")
    got = ops.set_isa(ISAS.index(want) + 1 if want else 0)
    if got == 0:
        raise RuntimeError(f"this CPU lacks {want or 'AVX2 and FMA'}")
    return ISAS[got - 1]


def kernels():
    """``torch.ops.llmsh_kernels`` once built and loaded, or None for the torch path (warned once).

    The choice is made on the first call in a process (and after :func:`reset`)."""
    if "ops" not in _state:
        with _lock:
            if "ops" not in _state:
                _state["ops"], _state["isa"], _state["reason"] = None, None, None
                if os.environ.get("LLMSH_KERNELS", "").strip().lower() == "torch":
                    _state["reason"] = "LLMSH_KERNELS=torch"
                else:
                    try:
                        ops = _build()
                        _state["isa"] = _select_isa(ops)
                        _state["ops"] = ops
                    except Exception as e:   # any build/load failure: the torch path, never an error
                        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                        _state["reason"] = f"the C++ kernels are unavailable ({first[:200]})"
                if _state["ops"] is None:
                    warnings.warn(f"llmsh: GGUF blocks use the torch path: {_state['reason']}",
                                  RuntimeWarning, stacklevel=2)
    return _state["ops"]


def backend() -> str:
    """'cpp-<isa>' (e.g. 'cpp-avx512vnni') or 'torch'."""
    return f"cpp-{_state['isa']}" if kernels() is not None else "torch"


def reset() -> None:
    """Forget the choice so the next :func:`kernels` call decides again (tests, env changes).
    A library already loaded stays loaded; the ISA is chosen again."""
    with _lock:
        _state.clear()
