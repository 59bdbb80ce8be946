"""dfpipe.registry: one name -> factory registry for experts, face detectors, landmark models and editing
methods, and the config choices that come from it."""

import sys

import pytest

from dfpipe import config
from dfpipe.errors import ConfigError, UnknownNameError
from dfpipe.registry import EDITING_METHODS, EXPERTS, FACE_DETECTORS, LANDMARKERS, Registry


def test_register_as_decorator_and_call_get_names_and_unknown_names():
    reg = Registry("widget")

    @reg.register("round")
    class Round:
        pass

    assert reg.register("square", dict) is dict  # a call returns what it registered
    assert reg.names() == ["round", "square"] and list(reg) == ["round", "square"] and len(reg) == 2
    assert reg.get("round") is Round and reg["square"] is dict and "round" in reg and "oval" not in reg
    assert reg.items() == [("round", Round), ("square", dict)]
    with pytest.raises(KeyError, match="widget 'round' is already registered"):
        reg.register("round", list)
    with pytest.raises(UnknownNameError, match=r"unknown widget 'rund'; choose one of \['round', 'square'\] "
                                               r"\(did you mean 'round'\?\)"):
        reg.get("rund")
    with pytest.raises(UnknownNameError) as exc:  # nothing close: no suggestion
        reg.get("zzzz")
    assert "did you mean" not in str(exc.value)
    reg.unregister("round")
    assert reg.names() == ["square"]


def test_build_calls_the_factory_once_per_process_and_retries_after_a_failure():
    reg = Registry("widget")
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise ConfigError("package not installed")
        return object()

    reg.register("w", flaky)
    with pytest.raises(ConfigError, match="not installed"):
        reg.build("w")
    first = reg.build("w")
    assert reg.build("w") is first and len(calls) == 2  # a failure is not cached, a success is
    reg.clear_cache()
    assert reg.build("w") is not first and len(calls) == 3


def test_the_source_module_is_imported_on_first_read(tmp_path, monkeypatch):
    """A registry declared apart from its entries loads them when first read, so config can import the
    registries without importing the (heavy) modules that fill them."""
    (tmp_path / "reg_holder_x.py").write_text(
        "from dfpipe.registry import Registry\nREG = Registry('thing', source='reg_plugin_x')\n")
    (tmp_path / "reg_plugin_x.py").write_text("from reg_holder_x import REG\nREG.register('alpha', dict)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("reg_holder_x", "reg_plugin_x"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import reg_holder_x

    assert "reg_plugin_x" not in sys.modules
    assert reg_holder_x.REG.names() == ["alpha"] and "reg_plugin_x" in sys.modules
    broken = Registry("thing", source="no_such_module_x")
    for _ in range(2):  # a failed import is not remembered as done
        with pytest.raises(ModuleNotFoundError):
            broken.names()


def test_the_package_registries_hold_the_built_in_entries():
    assert EXPERTS.names() == ["npr", "timm"]
    assert FACE_DETECTORS.names() == ["haar"]
    assert LANDMARKERS.names() == ["mediapipe"]
    assert EDITING_METHODS.names() == ["copy_move", "inpaint", "jpeg_double", "self_blend", "splice", "upsample"]


# each config setting whose choices come from a registry: (registry, config class, params -> the setting)
CHOICES = {
    "face detector": (FACE_DETECTORS, config.PrepareConfig, lambda n: {"face_crop": n}),
    "landmarks": (LANDMARKERS, config.AugmentConfig, lambda n: {"landmarks": n}),
    "editing method": (EDITING_METHODS, config.AugmentConfig, lambda n: {"methods": {n: 1.0, "splice": 0.5}}),
    "expert": (EXPERTS, config.ExpertConfig, lambda n: {"arch": n}),
}


@pytest.mark.parametrize("kind", CHOICES)
def test_registering_makes_a_name_selectable_in_params(kind):
    reg, cls, params = CHOICES[kind]
    reg.register("dummy_x", object)
    try:
        cfg = config.from_dict(cls, params("dummy_x"), "params.yaml:s")
        assert "dummy_x" in str(cfg)
    finally:
        reg.unregister("dummy_x")
    with pytest.raises(ConfigError, match=r"params\.yaml:s\.\w+: 'dummy_x' is not allowed; choose one of \[.*\]"):
        config.from_dict(cls, params("dummy_x"), "params.yaml:s")
    first = reg.names()[0]
    with pytest.raises(ConfigError, match=rf"'{first[:-1]}' is not allowed.*\(did you mean '{first}'\?\)"):
        config.from_dict(cls, params(first[:-1]), "params.yaml:s")
