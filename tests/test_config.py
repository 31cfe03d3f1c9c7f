import pytest

from picstream.config import ConfigError, load_config, parse_overrides

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_shipped_configs_load_and_in1k_has_paper_defaults():
    for name in ("demo", "cifar10", "in1k", "in11k", "in1k-multicrop"):
        load_config(REPO / "configs" / f"{name}.yaml")
    c = load_config(REPO / "configs" / "in1k.yaml")
    assert (c.model.arch, c.optim.batch_size, c.optim.base_lr, c.optim.weight_decay) == ("resnet50", 512, 0.06, 1e-4)
    assert (c.optim.momentum, c.classifier.temperature, c.optim.epochs, c.optim.warmup_epochs) == (0.9, 0.2, 200, 5)
    assert (c.schedule.window, c.schedule.stride, c.classifier.recent_k) == (2**17, 2**14, 2**16)


def test_unknown_key_names_key_and_allowed(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lr'.*base_lr"):
        load_config(write(tmp_path, "data: {train: x}\noptim: {lr: 0.1}\n"))


def test_wrong_type_and_bad_choice(tmp_path):
    with pytest.raises(ConfigError, match=r"'optim.batch_size': got 'big', expected int"):
        load_config(write(tmp_path, "data: {train: x}\noptim: {batch_size: big}\n"))
    with pytest.raises(ConfigError, match=r"'classifier.loss'.*'cosine' \| 'plain'"):
        load_config(write(tmp_path, "data: {train: x}\nclassifier: {loss: arcface}\n"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path, "data: 3\n"))


def test_overrides_parse_yaml_scalars_and_win(tmp_path):
    path = write(tmp_path, "data: {train: x}\noptim: {epochs: 3}\n")
    c = load_config(path, ["optim.epochs=7", "classifier.store=s3://b/rows", "data.crop_scale=[0.3, 1]"])
    assert c.optim.epochs == 7.0 and c.classifier.store == "s3://b/rows" and c.data.crop_scale == [0.3, 1.0]
    assert parse_overrides(["a.b.c=1"]) == {"a": {"b": {"c": 1}}}
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(path, ["optim.epochs"])


def test_cross_field_checks(tmp_path):
    with pytest.raises(ConfigError, match="data.train"):
        load_config(None)
    with pytest.raises(ConfigError, match="stride"):
        load_config(None, ["data.train=x", "schedule.window=8", "schedule.stride=16"])
    with pytest.raises(ConfigError, match="recent_k"):
        load_config(None, ["data.train=x", "classifier.recent_k=8", "optim.batch_size=16"])


def test_config_round_trips_through_yaml(tmp_path):
    c = load_config(REPO / "configs" / "demo.yaml")
    again = load_config(write(tmp_path, c.to_yaml()))
    assert again == c


def test_exponent_floats_without_a_dot_are_floats(tmp_path):
    """YAML 1.1 (PyYAML) reads `1e-3` as a string; a float key takes it as the number it means."""
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  weight_decay: 1e-5\n")
    config = load_config(path, ["optim.base_lr=3e-2", "data.train=x"])
    assert config.optim.weight_decay == 1e-5 and config.optim.base_lr == 0.03
    with pytest.raises(ConfigError, match="expected float"):
        load_config(path, ["optim.base_lr=1e-3x", "data.train=x"])
