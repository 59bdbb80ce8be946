"""One registry pattern for everything pluggable by name (timm's ``_registry``, DeepfakeBench's ``Registry``).

A :class:`Registry` maps a name to a factory. ``register(name)`` works as a decorator
(``@EXPERTS.register("npr")``) and as a call (``FACE_DETECTORS.register("dnn", DnnDetector)``); ``get(name)``
returns what was registered; ``build(name)`` calls it without arguments once per process and keeps the result
(detectors hold OpenCV cascades or MediaPipe graphs, which cannot be pickled and are slow to load: each worker
process builds its own, once). An unknown name is an :class:`~dfpipe.errors.UnknownNameError` that lists the
registered names and suggests the closest one.

The registries of the package are declared here, each with the module that registers its built-in entries
(``source``), imported the first time the registry is read. So :mod:`dfpipe.config` can validate a setting against
a registry (its choices come from the registry: registering a detector makes it selectable in ``params.yaml``)
while importing nothing heavier than this module. A new kind of plug-in is one line here, plus
``Annotated[str, RegistryChoice(NEW)]`` on its config field.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar, overload

from .errors import UnknownNameError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> factory (or any object: an editing method registers its function). Registering a taken name is an
    error, so two modules cannot silently replace each other's entry."""

    def __init__(self, kind: str, source: str | None = None) -> None:
        self.kind = kind  # what an entry is, for messages: "face detector"
        self.source = source  # module registering the built-in entries, imported on first read
        self._items: dict[str, T] = {}
        self._built: dict[str, Any] = {}
        self._loaded = source is None

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...
    @overload
    def register(self, name: str, obj: T) -> T: ...

    def register(self, name: str, obj: Any = None) -> Any:
        """``register(name, obj)`` registers ``obj``; ``register(name)`` returns a decorator that does."""
        if obj is None:
            return lambda fn: self.register(name, fn)
        if name in self._items:
            raise KeyError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj
        return obj

    def unregister(self, name: str) -> None:
        """Remove ``name`` and its built instance (tests, plug-ins that are unloaded)."""
        self._items.pop(name, None)
        self._built.pop(name, None)

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True  # first: the source module registers into this registry while it is imported
            try:
                importlib.import_module(self.source)
            except BaseException:
                self._loaded = False
                raise

    def get(self, name: str) -> T:
        """What was registered as ``name``; UnknownNameError (with the names and a suggestion) if nothing was."""
        self._load()
        if name not in self._items:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; choose one of {self.names()}"
                                   f"{did_you_mean(name, self._items)}")
        return self._items[name]

    def build(self, name: str) -> Any:
        """``get(name)()``, called once per process; later calls return the same object. A factory that raises
        (a missing package) is not cached: the next call tries again."""
        if name not in self._built:
            self._built[name] = self.get(name)()
        return self._built[name]

    def clear_cache(self) -> None:
        """Forget the built objects: the next :meth:`build` of each name calls its factory again."""
        self._built.clear()

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        return [(n, self._items[n]) for n in self.names()]

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


# The package's registries. Each source module registers its built-in entries at import.
EXPERTS: Registry = Registry("expert", "dfpipe.models.registry")  # Expert subclasses (dfpipe.models)
FACE_DETECTORS: Registry = Registry("face detector", "dfpipe.data.faces")  # () -> FaceDetector
LANDMARKERS: Registry = Registry("landmark detector", "dfpipe.data.landmarks")  # () -> FaceLandmarker
EDITING_METHODS: Registry = Registry("editing method", "dfpipe.augment_sd.editing")  # EditFn
# (ReconstructConfig, Context) -> [Reconstructor, ...]
RECONSTRUCTION_METHODS: Registry = Registry("reconstruction method", "dfpipe.augment_sd.reconstruct")
