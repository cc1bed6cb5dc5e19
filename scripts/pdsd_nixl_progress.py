"""Optionally turn off NIXL's progress thread in every process of a vLLM venv.

``scripts/setup-vllm-cpu`` copies this module into the vLLM virtual
environment's site-packages with a ``.pth`` line that imports it at every
interpreter start. It does nothing unless ``PDSD_NIXL_PROGRESS_THREAD=0`` is
in the environment, so the venv behaves exactly as installed otherwise.

Why: vLLM's NixlConnector creates its NIXL agent with the library's default
configuration, which starts a progress thread that polls with zero delay and
so keeps one core busy per agent. On a 2-core host a prefill and a decode
instance then starve each other (decode requests time out, the prefiller
frees the blocks unread after its lease). Without the thread, the UCX backend
makes progress whenever vLLM polls transfer and notification state, which it
does on every engine step. vLLM offers no setting for this, hence the hook.

How: a meta-path finder wraps the loader of NIXL's ``_api`` module (whatever
CUDA-variant package provides it) and, once the module has run, makes
``nixl_agent_config`` always leave the progress thread off. Nothing is
imported early, and a process that never imports NIXL is untouched.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

ENV = "PDSD_NIXL_PROGRESS_THREAD"

#: Packages that provide ``nixl._api`` (the ``nixl`` meta package re-exports).
_API_MODULES = frozenset(
    f"{package}._api" for package in ("nixl_cu12", "nixl_cu13", "nixl_rocm")
)


class _PatchingLoader(importlib.abc.Loader):
    """Run the real loader, then patch the module it produced."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        _disable_progress_thread(module)


class _Finder(importlib.abc.MetaPathFinder):
    """Find NIXL's ``_api`` modules through the normal path finder, wrapped."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _API_MODULES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader)
        return spec


def _disable_progress_thread(module: ModuleType) -> None:
    config_cls = getattr(module, "nixl_agent_config", None)
    if config_cls is None:
        print(
            f"pdsd_nixl_progress: {module.__name__} has no nixl_agent_config; "
            "progress thread left on",
            file=sys.stderr,
        )
        return
    original = config_cls.__init__

    @functools.wraps(original)
    def init_without_progress_thread(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.enable_pthread = False

    config_cls.__init__ = init_without_progress_thread
    print(
        f"pdsd_nixl_progress: NIXL progress thread disabled ({ENV}=0, "
        f"pid {os.getpid()})",
        file=sys.stderr,
    )


def install() -> None:
    """Install the finder when ``PDSD_NIXL_PROGRESS_THREAD=0``; else nothing."""
    if os.environ.get(ENV) == "0" and not any(
        isinstance(f, _Finder) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _Finder())


install()
