"""FineViT-VL: a fine-grained, native-resolution vision encoder plugged into any causal LLM.

Importing the package registers FineViT and FineViT-VL with the transformers Auto classes, so
`AutoModelForImageTextToText.from_pretrained(dir)` and `AutoProcessor.from_pretrained(dir)` work on saved checkpoints.

The import itself is light (no torch), so `finevit-vl --help` is instant: the model classes below are imported on
first use (PEP 562), and the registration happens as soon as transformers is loaded, whether that was before
``import finevit_vl`` or after it.
"""

import importlib
import importlib.abc
import importlib.util
import sys
from importlib.metadata import PackageNotFoundError, version


try:
    __version__ = version("finevit-vl")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0.0.0+unknown"

# What `finevit_vl.models` exports (the same list as its __all__), imported on first use.
_MODEL_NAMES = (
    "FINEVIT_PRESETS",
    "FineViTConfig",
    "FineViTContrastiveConfig",
    "FineViTContrastiveModel",
    "FineViTContrastiveProcessor",
    "FineViTForMaskedImageModeling",
    "FineViTImageProcessor",
    "FineViTMaskedImageModelingConfig",
    "FineViTModel",
    "FineViTPreTrainedModel",
    "FineViTVLConfig",
    "FineViTVLForConditionalGeneration",
    "FineViTVLModel",
    "FineViTVLPreTrainedModel",
    "FineViTVLProcessor",
    "FineViTVLProjector",
)
_REGISTRATION_NAMES = ("AutoModelForVision2Seq", "register_auto_classes")
# public name -> the submodule that defines it
_LAZY_NAMES: dict[str, str] = {**dict.fromkeys(_MODEL_NAMES, ".models"), **dict.fromkeys(_REGISTRATION_NAMES, ".registration")}


def __getattr__(name: str):
    if name not in _LAZY_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _register()
    from . import models, registration

    value = getattr(models if _LAZY_NAMES[name] == ".models" else registration, name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_NAMES})


_registered = False


def _register() -> None:
    global _registered
    import transformers  # noqa: F401  (first, so that the hook below never runs inside our own imports)

    from .registration import register_auto_classes

    register_auto_classes()
    _registered = True
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _RegisterOnLoad)]


def _importing(name: str) -> bool:
    """Whether the module's body is still running (it is in `sys.modules` from the start of its import)."""
    module = sys.modules.get(name)
    return module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False)


class _RegisterOnLoad(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Registers the Auto classes once transformers and (when being imported) ``finevit_vl.models`` have finished
    loading, whichever finishes last; registering earlier would import a half-initialised module."""

    WATCHED = ("transformers", f"{__name__}.models", f"{__name__}.registration")

    def __init__(self) -> None:
        self._loaders: dict[str, importlib.abc.Loader] = {}

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.WATCHED or fullname in self._loaders:
            return None
        self._loaders[fullname] = None  # find_spec below must not come back here
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            del self._loaders[fullname]
        if spec is None or spec.loader is None:
            return spec
        self._loaders[fullname], spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self._loaders[spec.name].create_module(spec)

    def exec_module(self, module) -> None:
        name = module.__spec__.name
        loader = self._loaders.pop(name)
        module.__spec__.loader = module.__loader__ = loader  # hand the module its own loader back
        loader.exec_module(module)
        busy = [other for other in self.WATCHED if other != name and _importing(other)]
        if not _registered and "transformers" in sys.modules and not busy:
            _register()


if "transformers" in sys.modules:  # already paid for: register now
    _register()
elif not any(isinstance(finder, _RegisterOnLoad) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterOnLoad())


__all__ = ["__version__", *_MODEL_NAMES, *_REGISTRATION_NAMES]  # noqa: PLE0604  (all strings)
