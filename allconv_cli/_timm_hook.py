"""Register the twelve networks with timm the moment timm is imported, without importing it ourselves.

``import allconv_cli`` must stay cheap (``allconv --help`` under 1.5 s), yet
``import allconv_cli; import timm; timm.create_model("allconv_c_allcnn")`` must work in either import order.
If timm is already imported we register at once; otherwise a one-shot meta-path finder wraps timm's loader so
registration runs right after timm's ``__init__`` finishes. Nothing is imported until the user imports timm.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types


def _register() -> None:
    from allconv_cli.models import register_timm

    register_timm()


class _RegisteringLoader(importlib.abc.Loader):
    """Delegates to timm's own loader, then registers our models."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._inner.exec_module(module)
        _register()

    def __getattr__(self, name: str) -> object:  # get_resource_reader, is_package, ... as timm's loader has them
        return getattr(self._inner, name)


class _TimmFinder(importlib.abc.MetaPathFinder):
    """Finds timm through the other finders once, and hands back its spec with a registering loader."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("timm")
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


def install() -> None:
    """Register now if timm is loaded, else arrange registration for when it is."""
    if "timm" in sys.modules:
        _register()
    elif not any(isinstance(finder, _TimmFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TimmFinder())
