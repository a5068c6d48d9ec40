"""Makes ``import tfdpfair`` enough for ``keras.models.load_model`` of any tfdpfair object.

Keras finds a custom class of a ``.keras`` file only in its registry
(``keras.saving.get_custom_objects()``); it never imports a non-Keras module named in the file.
Our classes register themselves when their modules are imported, but those modules import
TensorFlow, and ``import tfdpfair`` must not (``tfdpfair.fairness`` is numpy-only).

So, once Keras is imported, this module puts a small stand-in class under each registered name
(``"tfdpfair>DPModel"``, ...). Keras only calls ``from_config`` on what the registry returns; the
stand-in's imports the real module (whose decorator then replaces the stand-in in the registry)
and returns ``RealClass.from_config(config)``. The stand-ins are installed

* at ``import tfdpfair``, if Keras is already imported; otherwise
* by a ``sys.meta_path`` finder, right after the module ``keras`` finishes executing. The
  finder returns the spec the other finders give for ``keras`` with its loader wrapped; the
  wrapper removes the finder when Keras starts executing and restores the module's real loader
  when it is done.

Why stand-ins rather than importing our modules from the hook: ``keras`` finishes importing
*inside* ``import tensorflow`` (tensorflow/__init__.py imports keras.src.optimizers near its
end), and often inside the import of one of our own modules (``make_private`` -> dp_model ->
``import keras``); importing TensorFlow-using modules at that moment would run them against a
half-initialised ``tensorflow`` or re-enter a half-initialised tfdpfair module. The stand-ins
need nothing but the public ``keras.saving.get_custom_objects`` dict, and the real modules load
at ``load_model`` time, when every import has finished. The hook never raises (a failure is a
warning, and ``import keras`` proceeds). Names are listed in ``REGISTERED_CLASSES``; a test
checks the table against the modules' own registrations.
"""

from __future__ import annotations

import importlib
import importlib.abc
import inspect
import sys
import warnings
from typing import Any

REGISTERED_CLASSES = {  # registered name -> module that defines and registers the class
    "tfdpfair>DPModel": "tfdpfair.training.dp_model",
    "tfdpfair>DPState": "tfdpfair.training.dp_state",
    "tfdpfair>ParameterAverages": "tfdpfair.training.averaging",
    "tfdpfair>NFBlock": "tfdpfair.models.nfnet",
    "tfdpfair>WideResNetBlock": "tfdpfair.models.wide_resnet",
    "tfdpfair>ScaledActivation": "tfdpfair.models.layers",
    "tfdpfair>WSConv2D": "tfdpfair.models.layers",
    "tfdpfair>SqueezeExcite": "tfdpfair.models.layers",
    "tfdpfair>StochasticDepth": "tfdpfair.models.layers",
    "tfdpfair>PerExampleDropout": "tfdpfair.models.layers",
    "tfdpfair>CanarySlots": "tfdpfair.models.canary_slots",
}


class _NotImportedYet:
    """Registry stand-in for a tfdpfair class whose module has not been imported."""

    registered_name = ""
    module_name = ""

    @classmethod
    def from_config(cls, config: dict, custom_objects: Any = None) -> Any:
        real = _import_registered(cls.registered_name, cls.module_name)
        if custom_objects is not None and "custom_objects" in inspect.signature(
                real.from_config).parameters:
            return real.from_config(config, custom_objects=custom_objects)
        return real.from_config(config)


def _import_registered(name: str, module_name: str) -> type:
    importlib.import_module(module_name)  # its decorator replaces the stand-in
    registry = sys.modules["keras"].saving.get_custom_objects()
    real = registry.get(name)
    if real is None or (isinstance(real, type) and issubclass(real, _NotImportedYet)):
        raise TypeError(f"importing {module_name} did not register {name!r}; "
                        "tfdpfair/_keras_registration.py lists a class that no longer exists.")
    return real


def register_stand_ins() -> None:
    """Adds a stand-in for every class of REGISTERED_CLASSES not registered yet."""
    registry = sys.modules["keras"].saving.get_custom_objects()
    for name, module_name in REGISTERED_CLASSES.items():
        if name not in registry:
            registry[name] = type(name.split(">")[1], (_NotImportedYet,), {
                "registered_name": name, "module_name": module_name,
                "__module__": __name__, "__doc__": _NotImportedYet.__doc__})


def _register_quietly() -> None:
    try:
        register_stand_ins()
    except Exception as error:  # never break `import keras`
        warnings.warn(f"tfdpfair could not register its Keras classes ({error!r}); import "
                      "tfdpfair.training.dp_model and tfdpfair.models before "
                      "keras.models.load_model.", RuntimeWarning, stacklevel=2)


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the real loader of ``keras``, then registers the stand-ins."""

    def __init__(self, loader: Any):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        uninstall()
        try:
            self._loader.exec_module(module)
        finally:
            module.__loader__ = self._loader
            if getattr(module, "__spec__", None) is not None:
                module.__spec__.loader = self._loader
        _register_quietly()

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, ...
        return getattr(self._loader, name)


class _KerasImportHook(importlib.abc.MetaPathFinder):
    """Gives the other finders' spec of ``keras`` with its loader wrapped (until Keras runs).

    It stays installed until ``keras`` is executed, not merely looked up: TensorFlow calls
    ``importlib.util.find_spec("keras")`` (module_util.get_parent_dir_for_name) before it
    imports it.
    """

    _searching = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "keras" or self._searching:
            return None
        self._searching = True  # a finder below us may look "keras" up again
        try:
            for finder in list(sys.meta_path):
                find_spec = getattr(finder, "find_spec", None)
                if isinstance(finder, _KerasImportHook) or find_spec is None:
                    continue
                spec = find_spec(fullname, path, target)
                if spec is not None:
                    if hasattr(spec.loader, "exec_module"):
                        spec.loader = _RegisteringLoader(spec.loader)
                    return spec
            return None
        finally:
            self._searching = False


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _KerasImportHook)]


def install() -> None:
    """Registers now if Keras is imported, else once it is (called by ``import tfdpfair``)."""
    keras = sys.modules.get("keras")
    if keras is not None and hasattr(keras, "saving"):
        _register_quietly()
    elif keras is None and not any(isinstance(f, _KerasImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _KerasImportHook())
    # else Keras is half-imported (tfdpfair imported from inside Keras's own import): its
    # finder has already run, so nothing is registered; import tfdpfair after Keras instead.
