"""The C++ CPU ops, built on first use: the paged attention op (``csrc/paged_attention_cpu.cpp``) as
``torch.ops.fusionserve.paged_attention``, the few-row linear of ``models/packed_linear.py``
(``models/csrc/small_linear_cpu.cpp``) as ``torch.ops.fusionserve.small_linear``, and the gated MLP's GELU of
``models/gated_activation.py`` (``models/csrc/gelu_and_mul_cpu.cpp``) as ``torch.ops.fusionserve.gelu_tanh_and_mul``.

Each source is built by ``torch.utils.cpp_extension.load`` (ninja + the C++ compiler; ``-O3``, AVX2/FMA when
torch reports this CPU has them, OpenMP through ``at::parallel_for``) into a folder of torch's extension root
(``TORCH_EXTENSIONS_DIR``, else ``~/.cache/torch_extensions``) named by a hash of the source, the flags, torch's
and Python's versions; a later process that finds the library there loads it with ``torch.ops.load_library``
(no compiler, no ninja). ``make setup`` builds all three ahead (``python -m pipeline.attention.cpu_kernel``). A failed
build (no compiler, no ninja) is one logged warning and the loader returns None: the caller uses its torch path.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "paged_attention_cpu.cpp"
STEM = "fusionserve_paged_attention"
_lock = threading.Lock()


def _isa() -> str:
    capability = torch.backends.cpu.get_cpu_capability()  # "DEFAULT" | "AVX2" | "AVX512" | ...
    return "avx2" if capability.startswith(("AVX2", "AVX512")) else "generic"


def _flags(isa: str) -> list[str]:
    return ["-O3", "-fopenmp", "-DNDEBUG"] + (["-mavx2", "-mfma"] if isa == "avx2" else [])


def build_directory(source: Path = SOURCE, stem: str = STEM) -> tuple[str, Path]:
    """(library name, folder) of the build for this source, CPU, torch and Python."""
    isa = _isa()
    key = hashlib.sha256(source.read_bytes())
    for header in sorted(SOURCE.parent.glob("*.h")):  # the sources' shared headers (csrc/vec_exp.h)
        key.update(header.read_bytes())
    key.update(" ".join([*_flags(isa), torch.__version__, sys.version]).encode())
    name = f"{stem}_{isa}_{key.hexdigest()[:12]}"
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser(
        ) / "torch_extensions"
    return name, Path(root) / name


def _ninja_dir() -> str | None:
    """Where a ninja binary is when none is on PATH (the ``ninja`` package's, or beside this Python)."""
    if shutil.which("ninja"):
        return None
    try:
        import ninja

        return ninja.BIN_DIR
    except (ImportError, AttributeError):
        here = Path(sys.executable).parent
        return str(here) if (here / "ninja").exists() else None


def _build(source: Path, stem: str) -> Path:
    """The built library's path, building it first when it is not there (in a private folder, then moved into
    place: a process starting beside a build never loads a half-written file)."""
    name, folder = build_directory(source, stem)
    library = folder / f"{name}.so"
    if library.exists():
        return library
    work = folder / f"build-{os.getpid()}-{threading.get_ident()}"
    work.mkdir(parents=True, exist_ok=True)
    quiet = logging.getLogger("torch.utils.cpp_extension")  # its import notes "No CUDA runtime is found"
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    ninja_dir = _ninja_dir()
    path = os.environ.get("PATH", "")
    if ninja_dir:
        os.environ["PATH"] = ninja_dir + os.pathsep + path
    try:
        isa = _isa()
        with warnings.catch_warnings(record=True) as caught:  # torch's compiler notes: logged, not raised
            warnings.simplefilter("always")
            from torch.utils import cpp_extension

            logger.info("building %s in %s", source.name, folder)
            cpp_extension.load(name=name, sources=[str(source)], extra_cflags=_flags(isa), extra_ldflags=["-fopenmp"],
                               build_directory=str(work), is_python_module=False)  # loads it too
        for w in caught:
            logger.info("building %s: %s", source.name, w.message)
        os.replace(work / library.name, library)
    finally:
        quiet.setLevel(level)
        if ninja_dir:
            os.environ["PATH"] = path
        shutil.rmtree(work, ignore_errors=True)
    return library


_loaded: dict[str, object] = {}  # library stem: its op, or None once it failed


def load_library(source: Path, stem: str, op_name: str, register_fake, what: str, fallback: str):
    """``torch.ops.fusionserve.<op_name>`` from ``source``, built and loaded once per process, with its fake
    (shape-only) implementation registered for ``torch.compile``; None when it cannot be (tried once: the
    warning names the op, ``what``, and ``fallback``, what serves instead)."""
    with _lock:
        if stem not in _loaded:
            try:
                library = _build(source, stem)
                if not hasattr(torch.ops.fusionserve, op_name):
                    torch.ops.load_library(str(library))
                _loaded[stem] = getattr(torch.ops.fusionserve, op_name)
                register_fake()
            except Exception as exc:  # no compiler or ninja, a build error: the fallback serves instead
                _loaded[stem] = None
                text = " ".join(str(exc).split())  # a build error: its head and the compiler's last words
                reason = text if len(text) <= 400 else f"{text[:90]} ... {text[-300:]}"
                logger.warning("%s unavailable, using %s: %s", what, fallback, reason)
        return _loaded[stem]


def _register_fake() -> None:
    """The op's shape-only version, for ``torch.compile`` (``pipeline/compiled_decode.py``): it writes its
    ``out`` argument in place and returns nothing, so there is nothing to compute."""
    @torch.library.register_fake("fusionserve::paged_attention")
    def _(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, run_start, run_end, scale, sliding_window,
          out) -> None:
        return None


def load_op():
    """``torch.ops.fusionserve.paged_attention``; None when it cannot be built here."""
    return load_library(SOURCE, STEM, "paged_attention", _register_fake, "CPU paged attention op",
                        "the torch attention path")


def available() -> bool:
    return load_op() is not None


if __name__ == "__main__":  # make setup: build ahead so a first request does not pay the compile
    from pipeline.models import gated_activation, packed_linear

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for what, load, source, stem, otherwise in (
            ("paged attention", load_op, SOURCE, STEM, "the torch attention path serves on CPU"),
            ("few-row linear", packed_linear.load_small_linear, packed_linear.SOURCE, packed_linear.STEM,
             "F.linear serves 1-3 rows, oneDNN from 4"),
            ("GELU-and-multiply", gated_activation.load_op, gated_activation.SOURCE, gated_activation.STEM,
             "torch's gelu and mul serve")):
        print(f"fusionserve: CPU {what} op", f"built in {build_directory(source, stem)[1]}" if load()
              else f"not built: {otherwise}")
