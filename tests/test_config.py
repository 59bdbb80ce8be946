import pytest

from dfpipe.config import ConfigError, ExpertConfig, TrainConfig, from_dict, load_section


def test_repo_params_load_for_every_stage():
    from dfpipe import config

    for cls, section in ((config.PrepareConfig, "prepare_data"), (config.AugmentConfig, "augment_sd"),
                         (config.SplitConfig, "cluster_split"), (config.TrainConfig, "train_experts"),
                         (config.PredictConfig, "ensemble_predict"), (config.EvaluateConfig, "evaluate")):
        assert isinstance(load_section(cls, section, "params.yaml"), cls)
    train = load_section(TrainConfig, "train_experts", "params.yaml")
    assert len(train.experts) >= 2 and all(isinstance(e, ExpertConfig) for e in train.experts.values())


def test_unknown_key_is_rejected_with_its_name():
    with pytest.raises(ConfigError, match="lerning_rate"):
        from_dict(ExpertConfig, {"lerning_rate": 1.0}, "train_experts.experts.a")


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
    p.write_text("prepare_data: {}\n")
    with pytest.raises(ConfigError, match="no section 'train_experts'"):
        load_section(TrainConfig, "train_experts", p)


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
    for cls, section in ((config.PrepareConfig, "prepare_data"), (config.AugmentConfig, "augment_sd"),
                         (config.SplitConfig, "cluster_split"), (config.TrainConfig, "train_experts"),
                         (config.PredictConfig, "ensemble_predict"), (config.EvaluateConfig, "evaluate")):
        gaps += missing(cls, params[section], section)
        for key, sub in hints.items():
            if key in params[section]:
                gaps += missing(sub, params[section][key], f"{section}.{key}")
    for name, expert in params["train_experts"]["experts"].items():
        gaps += missing(config.ExpertConfig, expert, f"train_experts.experts.{name}")
        gaps += missing(config.LossWeights, expert["loss"], f"train_experts.experts.{name}.loss")
    for i, eval_set in enumerate(params["evaluate"]["sets"]):
        gaps += missing(config.EvalSetConfig, eval_set, f"evaluate.sets[{i}]")
    assert gaps == []


def test_params_list_every_editing_method():
    import yaml

    from dfpipe.augment_sd.editing import METHODS

    methods = yaml.safe_load(open("params.yaml"))["augment_sd"]["methods"]
    assert set(methods) == set(METHODS)


def test_unknown_key_suggests_the_closest_one():
    from dfpipe.config import PrepareConfig

    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['max_sides'\] \(did you mean 'max_side'\?\)"):
        from_dict(PrepareConfig, {"max_sides": 64}, "params.yaml:prepare_data")
    with pytest.raises(ConfigError, match=r"'lerning_rate'.*did you mean 'lr'|'epoch': did you mean 'epochs'"):
        from_dict(ExpertConfig, {"epoch": 1, "lerning_rate": 1.0}, "train_experts.experts.a")
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
    for cls, section in ((config.PrepareConfig, "prepare_data"), (config.AugmentConfig, "augment_sd"),
                         (config.SplitConfig, "cluster_split"), (config.TrainConfig, "train_experts"),
                         (config.PredictConfig, "ensemble_predict"), (config.EvaluateConfig, "evaluate")):
        mismatches += diff(cls, params[section], section)
    # train_experts.experts is a dict of experts: ExpertConfig's (and LossWeights') defaults are lite0_a's
    mismatches += diff(config.ExpertConfig, params["train_experts"]["experts"]["lite0_a"],
                       "train_experts.experts.lite0_a")
    assert mismatches == [], "\n".join(mismatches)


# --------------------------------------------------------------------------- the catalog and the stage names
def test_stage_configs_name_every_stage_section_of_params_yaml():
    """One name per stage: the sections of params.yaml (besides the catalog) are exactly STAGE_CONFIGS, each
    read into its class, and the stages are the catalog's own list, in DAG order."""
    from dfpipe import config
    from dfpipe.config import STAGE_CONFIGS, read_params
    from dfpipe.layout import STAGES

    assert STAGE_CONFIGS == {"prepare_data": config.PrepareConfig, "augment_sd": config.AugmentConfig,
                             "cluster_split": config.SplitConfig, "train_experts": config.TrainConfig,
                             "ensemble_predict": config.PredictConfig, "evaluate": config.EvaluateConfig}
    assert tuple(STAGE_CONFIGS) == STAGES
    assert set(read_params("params.yaml")) == {"paths", *STAGE_CONFIGS}
    for name, cls in STAGE_CONFIGS.items():
        assert isinstance(load_section(cls, name, "params.yaml"), cls)


def test_params_paths_section_is_the_layout_defaults():
    """params.yaml's ``paths:`` is the catalog: every Layout entry written (so ``-S paths.x=...`` can set it),
    no other key, and the values equal Layout()'s defaults (what tests, the CLI and the API use)."""
    import dataclasses

    from dfpipe.config import read_params
    from dfpipe.layout import Layout

    written = read_params("params.yaml")["paths"]
    assert set(written) == {f.name for f in dataclasses.fields(Layout)}
    assert Layout.load("params.yaml") == Layout()
    assert Layout.entries() == [f.name for f in dataclasses.fields(Layout)]


def test_layout_rejects_an_unknown_or_mistyped_entry(tmp_path):
    from dfpipe.layout import Layout

    p = tmp_path / "params.yaml"
    p.write_text("paths:\n  prepard: elsewhere\n")
    with pytest.raises(ConfigError, match=r"paths: unknown key\(s\) \['prepard'\].*did you mean 'prepared'"):
        Layout.load(p)
    p.write_text("paths:\n  data_root: [a, b]\n")
    with pytest.raises(ConfigError, match=r"paths\.data_root: expected str"):
        Layout.load(p)
    p.write_text("paths:\n  data_root: /mnt/d\n")  # a partial catalog: the rest at its defaults
    assert Layout.load(p) == Layout(data_root="/mnt/d")
    p.write_text("other: {}\n")  # no catalog at all: the defaults
    assert Layout.load(p) == Layout()
    p.write_text("prepare_data: {}\n")  # no catalog at all: the defaults
    assert Layout.load(p) == Layout()


def _path_like(value: str) -> bool:
    return "/" in value or value.endswith((".csv", ".json", ".txt", ".png", ".npy"))


def test_no_stage_section_holds_a_path():
    """Paths live in the catalog only: a stage section holds no path-like value (dataset lists excepted: their
    folders are relative to paths.data_root)."""
    from dfpipe.config import STAGE_CONFIGS, read_params

    params = read_params("params.yaml")

    def paths_in(node, where):
        if isinstance(node, dict):
            return [p for k, v in node.items() if k not in ("datasets", "sets") for p in paths_in(v, f"{where}.{k}")]
        if isinstance(node, list):
            return [p for i, v in enumerate(node) for p in paths_in(v, f"{where}[{i}]")]
        return [f"{where}: {node!r}"] if isinstance(node, str) and _path_like(node) else []

    assert [_path_like(v) for v in ("data/x", "a.csv", "r.json", "l.txt", "p.png", "f.npy", "lite0", "")] == \
        [True] * 6 + [False] * 2  # the check itself finds what it looks for
    assert paths_in({"a": {"b": ["x", "models/m.pt"]}, "datasets": [{"images": "a/b"}]}, "s") == \
        ["s.a.b[1]: 'models/m.pt'"]
    found = [p for name in STAGE_CONFIGS for p in paths_in(params[name], name)]
    assert found == [], found


def test_each_path_is_written_once_in_params_yaml():
    """`grep -c data/prepared params.yaml` is 1: the catalog names the store, no stage section or comment
    repeats it."""
    from pathlib import Path

    assert Path("params.yaml").read_text(encoding="utf-8").count("data/prepared") == 1
