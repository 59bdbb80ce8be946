import pytest

from dfpipe.config import ConfigError, ExpertConfig, TrainConfig, from_dict, load_section


def test_repo_params_load_for_every_stage():
    from dfpipe import config

    for cls, section in ((config.PrepareConfig, "prepare"), (config.AugmentConfig, "augment"),
                         (config.SplitConfig, "split"), (config.TrainConfig, "train"),
                         (config.PredictConfig, "predict"), (config.EvaluateConfig, "evaluate")):
        load_section(cls, section, "params.yaml")
    train = load_section(TrainConfig, "train", "params.yaml")
    assert len(train.experts) >= 2 and all(isinstance(e, ExpertConfig) for e in train.experts.values())


def test_unknown_key_is_rejected_with_its_name():
    with pytest.raises(ConfigError, match="lerning_rate"):
        from_dict(ExpertConfig, {"lerning_rate": 1.0}, "train.experts.a")


def test_nested_type_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"x\.loss\.ce"):
        from_dict(ExpertConfig, {"loss": {"ce": "big"}}, "x")


def test_int_accepted_for_float_and_bool_not_for_int():
    e = from_dict(ExpertConfig, {"lr": 1, "epochs": 2}, "x")
    assert e.lr == 1.0 and isinstance(e.lr, float)
    with pytest.raises(ConfigError):
        from_dict(ExpertConfig, {"epochs": True}, "x")


def test_missing_section(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("prepare: {}\n")
    with pytest.raises(ConfigError, match="no section 'train'"):
        load_section(TrainConfig, "train", p)


def test_every_setting_is_written_in_params_yaml():
    """`dvc exp run -S key=value` can only override keys present in params.yaml: list them all."""
    import dataclasses

    import yaml

    from dfpipe import config

    params = yaml.safe_load(open("params.yaml"))

    def missing(cls, data, where):
        out = []
        for f in dataclasses.fields(cls):
            if f.name not in data:
                out.append(f"{where}.{f.name}")
            elif dataclasses.is_dataclass(f.type if isinstance(f.type, type) else None):
                out += missing(f.type, data[f.name], f"{where}.{f.name}")
        return out

    hints = {"diffusion": config.DiffusionConfig, "loss": config.LossWeights}
    gaps = []
    for cls, section in ((config.PrepareConfig, "prepare"), (config.AugmentConfig, "augment"),
                         (config.SplitConfig, "split"), (config.TrainConfig, "train"),
                         (config.PredictConfig, "predict"), (config.EvaluateConfig, "evaluate")):
        gaps += missing(cls, params[section], section)
        for key, sub in hints.items():
            if key in params[section]:
                gaps += missing(sub, params[section][key], f"{section}.{key}")
    for name, expert in params["train"]["experts"].items():
        gaps += missing(config.ExpertConfig, expert, f"train.experts.{name}")
        gaps += missing(config.LossWeights, expert["loss"], f"train.experts.{name}.loss")
    for i, eval_set in enumerate(params["evaluate"]["sets"]):
        gaps += missing(config.EvalSetConfig, eval_set, f"evaluate.sets[{i}]")
    assert gaps == []


def test_params_list_every_editing_method():
    import yaml

    from dfpipe.augment_sd.editing import METHODS

    methods = yaml.safe_load(open("params.yaml"))["augment"]["methods"]
    assert set(methods) == set(METHODS)


def test_unknown_key_suggests_the_closest_one():
    from dfpipe.config import PrepareConfig

    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['max_sides'\] \(did you mean 'max_side'\?\)"):
        from_dict(PrepareConfig, {"max_sides": 64}, "params.yaml:prepare")
    with pytest.raises(ConfigError, match=r"'lerning_rate'.*did you mean 'lr'|'epoch': did you mean 'epochs'"):
        from_dict(ExpertConfig, {"epoch": 1, "lerning_rate": 1.0}, "train.experts.a")
    with pytest.raises(ConfigError) as exc:  # nothing close: no suggestion, the allowed keys still listed
        from_dict(ExpertConfig, {"zzzzzz": 1}, "x")
    assert "did you mean" not in str(exc.value) and "allowed:" in str(exc.value)


@pytest.mark.parametrize("cls_name, key, value, allowed, suggestion", [
    ("PrepareConfig", "face_crop", "har", "['none', 'haar']", "haar"),
    ("PrepareConfig", "face_policy", "larges", "['whole', 'largest', 'skip']", "largest"),
    ("SplitConfig", "kmeans_backend", "sklern", "['auto', 'sklearn', 'torch']", "sklearn"),
    ("SplitConfig", "embedder", "fine_tune", "['pretrained', 'finetune']", "finetune"),
    ("ExpertConfig", "augment", "strng", "'strong'", "strong"),
    ("PredictConfig", "combine", "mean_logits", "'mean_logit'", "mean_logit"),
    ("DiffusionConfig", "mode", "inpainting", "['img2img', 'inpaint']", "inpaint"),
    ("DiffusionConfig", "dtype", "fp16", "'float16'", None),
])
def test_choices_are_checked_when_params_load(cls_name, key, value, allowed, suggestion):
    from dfpipe import config

    with pytest.raises(ConfigError) as exc:
        from_dict(getattr(config, cls_name), {key: value}, "params.yaml:s")
    msg = str(exc.value)
    assert f"params.yaml:s.{key}: {value!r} is not allowed" in msg and allowed in msg
    if suggestion:
        assert f"did you mean {suggestion!r}?" in msg
    assert from_dict(config.AugmentConfig, {"diffusion": {"mode": "inpaint"}}, "a").diffusion.mode == "inpaint"
    with pytest.raises(ConfigError, match=r"a\.diffusion\.dtype: 'half' is not allowed"):
        from_dict(config.AugmentConfig, {"diffusion": {"dtype": "half"}}, "a")


def test_module_choices_come_from_the_config_literals():
    import typing

    from dfpipe import config
    from dfpipe.augment_sd import diffusion
    from dfpipe.data import faces, transforms
    from dfpipe.ensemble_predict import COMBINE
    from dfpipe.cluster_split import kmeans
    from dfpipe.cluster_split import pipeline as split_pipeline

    assert transforms.PRESETS == typing.get_args(config.AugmentPreset)
    assert COMBINE == typing.get_args(config.Combine)
    assert kmeans.BACKENDS == typing.get_args(config.KMeansBackend)
    assert split_pipeline.EMBEDDERS == typing.get_args(config.Embedder)
    assert faces.FACE_POLICIES == typing.get_args(config.FacePolicy)
    assert diffusion.MODES == typing.get_args(config.DiffusionMode)
    assert {"auto", *diffusion.DTYPES} == set(typing.get_args(config.DiffusionDtype))


def test_dataclass_defaults_equal_params_yaml():
    """One source of defaults: a config built without params (tests, notebooks) runs what dvc repro runs."""
    import dataclasses

    import yaml

    from dfpipe import config

    params = yaml.safe_load(open("params.yaml"))

    def diff(cls, data, where):
        out = []
        built = from_dict(cls, data, where)  # params values, coerced to the field types
        for f in dataclasses.fields(cls):
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                continue  # required: no default to compare
            if f.name not in data or (cls is config.TrainConfig and f.name == "experts"):
                continue  # a gap is test_every_setting_is_written_in_params_yaml's; experts: see below
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            value = getattr(built, f.name)
            if dataclasses.is_dataclass(default):
                out += diff(type(default), data[f.name], f"{where}.{f.name}")
            elif default != value:
                out.append(f"{where}.{f.name}: dataclass {default!r} != params.yaml {value!r}")
        return out

    mismatches = []
    for cls, section in ((config.PrepareConfig, "prepare"), (config.AugmentConfig, "augment"),
                         (config.SplitConfig, "split"), (config.TrainConfig, "train"),
                         (config.PredictConfig, "predict"), (config.EvaluateConfig, "evaluate")):
        mismatches += diff(cls, params[section], section)
    # train.experts is a dict of experts: ExpertConfig's (and LossWeights') defaults are lite0_a's
    mismatches += diff(config.ExpertConfig, params["train"]["experts"]["lite0_a"], "train.experts.lite0_a")
    assert mismatches == [], "\n".join(mismatches)
