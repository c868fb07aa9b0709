"""Register the twelve networks with timm the moment timm is imported, without importing timm or torch ourselves.

``import allconv_cli`` must stay cheap (``allconv --help`` loads no torch), yet ``import allconv_cli; import timm;
timm.create_model("allconv_c_allcnn")`` must work in either import order, and timm has no plugin entry points to
find models by. So: if timm is already imported, register now; otherwise a one-shot finder first on ``sys.meta_path``
finds timm through the other finders and wraps its loader's ``exec_module`` to register right after timm's
``__init__`` has run. Nothing is imported until the user imports timm.
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


class _TimmFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object = None, target: object = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("timm")  # a fresh spec and loader, found by the finders after us
        if spec is not None and spec.loader is not None:
            exec_timm = spec.loader.exec_module

            def exec_module(module: types.ModuleType) -> None:
                exec_timm(module)
                _register()

            spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Register now if timm is loaded, else arrange registration for when it is."""
    if "timm" in sys.modules:
        _register()
    elif not any(isinstance(finder, _TimmFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TimmFinder())
