import pytest

from dfpipe.config import ConfigError, ExpertConfig, TrainConfig, from_dict, load_section


def test_repo_params_load_for_every_stage():
    from dfpipe import config

    for cls, section in ((config.PrepareConfig, "prepare"), (config.AugmentConfig, "augment"),
                         (config.SplitConfig, "split"), (config.TrainConfig, "train"),
                         (config.PredictConfig, "predict")):
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
                         (config.PredictConfig, "predict")):
        gaps += missing(cls, params[section], section)
        for key, sub in hints.items():
            if key in params[section]:
                gaps += missing(sub, params[section][key], f"{section}.{key}")
    for name, expert in params["train"]["experts"].items():
        gaps += missing(config.ExpertConfig, expert, f"train.experts.{name}")
        gaps += missing(config.LossWeights, expert["loss"], f"train.experts.{name}.loss")
    assert gaps == []


def test_params_list_every_editing_method():
    import yaml

    from dfpipe.augment.editing import METHODS

    methods = yaml.safe_load(open("params.yaml"))["augment"]["methods"]
    assert set(methods) == set(METHODS)
