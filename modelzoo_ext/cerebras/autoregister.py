"""Register with ModelZoo the moment ModelZoo's own modules are imported, and cost nothing otherwise.

ModelZoo has no plugin mechanism: its registry, its config validation and its checkpoint
converters only know what was registered, by Python calls, in the same process before they
are used. Importing ModelZoo eagerly from `import modelzoo_ext` would make every
`sparse-lora masks ...` command pay seconds for torch + cerebras-pytorch + ModelZoo. Instead,
`install()` puts a tiny finder at the front of `sys.meta_path` that watches three ModelZoo
modules and, right after each one finishes executing, runs the registration step that needs it:

    cerebras.modelzoo.registry.registry                      -> register the model names
    cerebras.modelzoo.trainer (the package, once complete)   -> import our callback and
                                                                sparsity classes (validation
                                                                collects subclasses by name)
    cerebras.modelzoo.tools.checkpoint_converters.registry   -> add the converter entries (and,
                                                                just before it executes, stand in
                                                                for the `internal` modules that
                                                                ModelZoo 2.6-2.9 import but lack)

A module that is already imported when `install()` runs gets its step at once. Each step runs
once per process, so registration is idempotent; and because `install()` runs at import of
`modelzoo_ext` (and from the `.pth` file of `sparse-lora install-hook`), processes that ModelZoo's
autorestart spawns register again by themselves.

This module imports only `sys` (`importlib.abc` alone costs ~20 ms): the finder and loader
below follow the importlib protocols without subclassing their ABCs.
"""

from __future__ import annotations

import sys

# ModelZoo module -> name of the function in `modelzoo_ext.cerebras.registration` to run after it loads.
POST_IMPORT_STEPS = {
    "cerebras.modelzoo.registry.registry": "register_models",
    # The package, not `trainer.validate`: our classes import ModelZoo modules that need the
    # complete `cerebras.modelzoo.trainer` package, and validation only runs after it is.
    "cerebras.modelzoo.trainer": "import_trainer_classes",
    "cerebras.modelzoo.tools.checkpoint_converters.registry": "register_converters",
}

# ModelZoo module -> function in `registration` to run just BEFORE it executes (stand-ins for
# modules it imports that the installed release lacks).
PRE_EXEC_STEPS = {
    "cerebras.modelzoo.tools.checkpoint_converters.registry": "prepare_converter_registry",
}

_done: set[str] = set()


def run_step(module_name: str) -> None:
    """Run the registration step for `module_name` once in this process."""
    if module_name in _done:
        return
    _done.add(module_name)  # before running: the step imports modules that may import this one
    from modelzoo_ext.cerebras import registration

    try:
        getattr(registration, POST_IMPORT_STEPS[module_name])()
    except BaseException:
        _done.discard(module_name)  # let a later import retry, and let the error surface now
        raise


class _RunStepAfterExec:
    """Wraps a watched module's loader: execute the module, then run its registration step."""

    def __init__(self, loader, module_name: str) -> None:
        self._loader = loader
        self._module_name = module_name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        if self._module_name in PRE_EXEC_STEPS:
            from modelzoo_ext.cerebras import registration

            getattr(registration, PRE_EXEC_STEPS[self._module_name])()
        self._loader.exec_module(module)
        run_step(self._module_name)

    def __getattr__(self, name):  # get_source, get_filename, is_package, ... for tracebacks/pkgutil
        return getattr(self._loader, name)


class ModelZooImportWatcher:
    """A meta-path finder that only ever answers for the watched ModelZoo modules."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in POST_IMPORT_STEPS or fullname in _done:
            return None
        spec = self._find_with_other_finders(fullname, path, target)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _RunStepAfterExec(spec.loader, fullname)
        return spec

    def _find_with_other_finders(self, fullname, path, target):
        for finder in sys.meta_path:
            if finder is self or isinstance(finder, ModelZooImportWatcher):
                continue
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                return spec
        return None


def install() -> None:
    """Watch for ModelZoo imports (idempotent); run the steps of modules that are already imported."""
    if not any(isinstance(f, ModelZooImportWatcher) for f in sys.meta_path):
        sys.meta_path.insert(0, ModelZooImportWatcher())
    for module_name in POST_IMPORT_STEPS:
        if module_name in sys.modules:
            run_step(module_name)
