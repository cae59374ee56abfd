"""Run a function right after a given module has been imported, without importing it early.

Registrations into verl's registries and the few run-time adaptations of verl live in modules
that are expensive to import (engine workers, FSDP engine, reward loop). Importing them at
``import verl`` would add seconds to every one of the ~dozen Ray processes of a run; a
post-import hook applies the change only in the processes that really load the module.
"""

import importlib.abc
import logging
import sys
from collections.abc import Callable
from types import ModuleType

logger = logging.getLogger(__name__)

_pending: dict[str, list[Callable[[ModuleType], None]]] = {}


def when_imported(module_name: str, hook: Callable[[ModuleType], None]) -> None:
    """Call ``hook(module)`` once ``module_name`` is imported (at once if it already is)."""
    module = sys.modules.get(module_name)
    if module is not None:
        _run(module_name, hook, module)
        return
    _pending.setdefault(module_name, []).append(hook)
    if not any(isinstance(finder, _PostImportFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder())


def _run(module_name: str, hook: Callable[[ModuleType], None], module: ModuleType) -> None:
    try:
        hook(module)
    except Exception:
        # verl swallows plugin errors at DEBUG level; ours must be seen.
        logger.error("verl-distill: hook %s on %s failed", getattr(hook, "__qualname__", hook), module_name, exc_info=True)
        raise


class _HookedLoader(importlib.abc.Loader):
    def __init__(self, wrapped: importlib.abc.Loader, module_name: str):
        self._wrapped = wrapped
        self._module_name = module_name

    def create_module(self, spec):
        return self._wrapped.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._wrapped.exec_module(module)
        for hook in _pending.pop(self._module_name, []):
            _run(self._module_name, hook, module)

    def __getattr__(self, name):
        # inspect/linecache/pickle ask the loader for source, code, is_package ...
        return getattr(self._wrapped, name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _HookedLoader(spec.loader, fullname)
                return spec
        return None
