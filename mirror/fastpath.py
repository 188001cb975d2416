"""The one place that binds the compiled kernels ``mirror._fast`` or their pure-Python twins.

Each hot path is split in two: an engine module in Python, written once
(``mirror/scan.py``: the walk; ``mirror/delta.py``: signatures, deltas, patches and their
rules), and the kernels it calls, written twice with the same API
(``mirror/_fast/<name>.pyx``, compiled, and ``mirror/<name>_py.py``, the readable
specification).  An engine asks for its kernel here once, when it is imported.  Falling back
to the twin is loud: a warning once per kernel, and an error when ``MIRROR_REQUIRE_FAST=1``
(CI sets it).  ``MIRROR_FORCE_PURE=1`` selects the twins on purpose, for tests and for
debugging.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

from .errors import FastPathUnavailable

_bound: dict[str, ModuleType] = {}


def env_flag(name: str) -> bool:
    """An environment switch such as ``MIRROR_FORCE_PURE=1`` is set (not empty, 0, false, no)."""
    return os.environ.get(name, "") not in ("", "0", "false", "no")


def pure(name: str) -> ModuleType:
    """The pure-Python twin of kernel ``name`` (``scan`` or ``delta``)."""
    return importlib.import_module(f"mirror.{name}_py")


def compiled(name: str) -> ModuleType:
    """The compiled kernel; raises ImportError when it was not built."""
    module = importlib.import_module(f"mirror._fast.{name}")
    if hasattr(module, "bind_types"):
        # _fast imports nothing from mirror: hand it the shared result types instead.
        from .entry import Entry, ScanProblem

        module.bind_types(Entry, ScanProblem)
    return module


def kernel(name: str) -> ModuleType:
    """The kernel module of ``name`` this process uses (chosen on the first call)."""
    module = _bound.get(name)
    if module is not None:
        return module
    if env_flag("MIRROR_FORCE_PURE"):
        module = pure(name)
    else:
        try:
            module = compiled(name)
        except ImportError as exc:
            if env_flag("MIRROR_REQUIRE_FAST"):
                raise FastPathUnavailable(
                    f"compiled module mirror._fast.{name} is not available ({exc}); "
                    "reinstall hamirror with a C compiler and the xxHash header present"
                ) from exc
            warnings.warn(
                f"mirror._fast.{name} is not built; using the slow pure-Python twin ({exc})",
                RuntimeWarning,
                stacklevel=2,
            )
            module = pure(name)
    _bound[name] = module
    return module


def choose(name: str) -> ModuleType:
    """The engine module ``mirror.<name>`` (``scan`` or ``delta``), its kernel bound."""
    return importlib.import_module(f"mirror.{name}")


def is_fast(name: str) -> bool:
    return kernel(name).__name__.startswith("mirror._fast.")
