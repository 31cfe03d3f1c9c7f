"""Typed training configuration: YAML in, validated dataclasses out, `key.sub=value` overrides."""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


GROUPS = 32  # GroupNorm's groups under model.norm = group


class ConfigError(ValueError):
    """A configuration problem, phrased for the user (names the key and what is allowed)."""


@dataclass
class RunConfig:
    name: str = "picstream"
    output_dir: str = "runs/picstream"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass
class DataConfig:
    train: str = ""
    image_size: int = 224
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    workers: int = 4
    cache_dir: Optional[str] = None
    cache_gb: float = 20.0
    # a shard (or index) the verified manifest lists but the storage lacks: stop the run with one line
    # naming it (fail), or count its samples as skipped and refill their slots (skip)
    on_missing: Literal["fail", "skip"] = "fail"
    # multi-crop: extra views beside the main one, items [size, count] or [size, count, scale_lo,
    # scale_hi] (picstream.multicrop); empty = one view per image
    multi_crop: list[list[float]] = field(default_factory=list)
    # where the JPEGs are decoded: in the loader's CPU workers, or batched on the CUDA device by
    # nvImageCodec (the workers pass bytes and crop boxes; the nvimgcodec extra)
    decode: Literal["cpu", "gpu"] = "cpu"
    # the CPU workers' JPEG decoder (picstream.loader.decode): auto (the fastest full decoder, DCT-domain
    # downscaling for crops >= 2x their output), roi (only each sample's crop window, through nvImageCodec:
    # the same pixels as the full decoders, faster; the nvimgcodec extra), or one full decoder by name
    decoder: Literal["auto", "roi", "simplejpeg", "torchcodec", "pil"] = "auto"


@dataclass
class AugmentConfig:
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.5
    solarize_p: float = 0.0


@dataclass
class ModelConfig:
    # a torchvision ResNet/ResNeXt/Wide-ResNet/RegNet name, or "timm/<name>" for any timm model
    # (created with num_classes=0: pooled features; picstream.backbones), or "resnet18_quarter"
    # (ResNet-18 at 1/4 width with a 3x3 stride-2 stem, for 32 px: picstream.narrow_resnet)
    arch: str = "resnet50"
    # keyword arguments of the model's constructor, e.g. {drop_path_rate: 0.1, dynamic_img_size: true}
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    cifar_stem: bool = False
    head: Literal["mlp", "linear"] = "mlp"   # 2-layer MLP (the paper's) or one linear layer (Table 1)
    head_hidden: int = 2048
    feature_dim: int = 128
    # BatchNorm (the paper's: per GPU, statistics of each rank's block of the batch) or GroupNorm(32)
    # (per sample: a run's result does not depend on how the batch is split over ranks)
    norm: Literal["batch", "group"] = "batch"
    sync_bn: bool = False  # BatchNorm statistics over the global batch in a distributed run


@dataclass
class ClassifierConfig:
    sampling: Literal["recent", "full"] = "recent"
    recent_k: int = 65536
    loss: Literal["cosine", "plain"] = "cosine"
    temperature: float = 0.2
    correction: Literal["exact", "paper", "none"] = "exact"
    store: Optional[str] = None
    chunk_rows: int = 4096
    # which views' gradients reach the rows under multi-crop: the main view only (the authors'
    # detached classifier for the extra crops) or every view (summed)
    multi_crop_rows: Literal["main", "all"] = "main"
    # the store write of evicted rows deferred by one admission (bit-identical to off, the synchronous
    # path); auto: on once a self-check on the device has matched off (YAML's true/false: on/off)
    overlap: Union[Literal["auto", "on", "off"], bool] = "auto"
    # a row's first visit: its random initial value, or its instance's L2-normalised feature (of the
    # main view, detached) with momentum 0 (Liu et al., "Train a One-Million-Way Instance Classifier")
    row_init: Literal["random", "feature"] = "random"


@dataclass
class ScheduleConfig:
    scheduler: Literal["sliding", "epoch"] = "sliding"
    window: int = 131072
    stride: int = 16384


@dataclass
class OptimConfig:
    batch_size: int = 512
    base_lr: float = 0.06
    base_batch_size: int = 512
    momentum: float = 0.9
    weight_decay: float = 1e-4
    epochs: float = 200.0
    warmup_epochs: float = 5.0
    # The backbone's (and head's) optimizer. base_lr, momentum and weight_decay above are the SGD of
    # the classifier rows, always (their lazy correction is SGD's closed form), and of the backbone
    # when name = sgd; adamw and lars take their own backbone_lr and backbone_weight_decay.
    name: Literal["sgd", "adamw", "lars"] = "sgd"
    backbone_lr: Optional[float] = None            # at base_batch_size, linearly scaled; None: base_lr
    backbone_weight_decay: Optional[float] = None  # None: weight_decay
    backbone_weight_decay_end: Optional[float] = None  # cosine schedule to this value (DINO); None: constant
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw
    lars_trust: float = 0.001                      # lars: the trust coefficient
    clip_grad: Optional[float] = None              # max gradient L2 norm of the backbone + head
    clip_mode: Literal["norm", "per_tensor"] = "norm"  # all gradients as one vector, or each tensor (DINO)


@dataclass
class TrainConfig:
    amp: Literal["auto", "bf16", "off"] = "auto"
    # float64: model, features and classifier rows in double precision (no autocast), for
    # numerical checks such as a distributed run against a 1-process one
    precision: Literal["float32", "float64"] = "float32"
    channels_last: bool = True
    compile: bool = False
    log_every: int = 10
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    max_steps: Optional[int] = None
    durability: Literal["process", "power"] = "process"
    # a distributed run: how long a collective waits for a rank that stopped answering
    dist_timeout_s: float = 1800.0


@dataclass
class MonitorConfig:
    knn_train: Optional[str] = None
    knn_val: Optional[str] = None
    every_steps: int = 0
    k: int = 200
    temperature: float = 0.07


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping of names to values"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


_EXPONENT_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
    elif origin is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (item,) = typing.get_args(tp)
            return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    elif tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _EXPONENT_FLOAT.match(value):  # YAML 1.1 reads 1e-3 as a string
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"config key '{key}': got {value!r}, expected {_type_name(tp)}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{path}'; allowed here: {', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, path)
        else:
            kwargs[key] = _coerce(value, tp, path)
    return cls(**kwargs)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[leaf] = value


def parse_overrides(items: list[str]) -> dict:
    """`["optim.epochs=5", "data.train=x"]` → nested dict (values parsed as YAML scalars)."""
    tree: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), yaml.safe_load(raw) if raw != "" else None)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def config_from_dict(data: dict) -> Config:
    """Validate a nested dict (unknown keys and wrong types raise `ConfigError`)."""
    config = _build(Config, data or {}, "")
    validate(config)
    return config


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load a YAML file (or start from defaults when `path` is None) and apply overrides."""
    data: dict = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (IsADirectoryError, PermissionError, UnicodeDecodeError) as err:
            raise ConfigError(f"cannot read config file {path}: {err}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must be a mapping of sections "
                              f"({', '.join(f.name for f in dataclasses.fields(Config))}), "
                              f"got a {type(data).__name__}")
    return config_from_dict(_merge(data, parse_overrides(list(overrides))))


# Keys a resumed run may change: they do not alter the training trajectory.
RESUME_SAFE_KEYS = ("run.name", "run.output_dir", "data.workers", "data.cache_dir", "data.cache_gb",
                    "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                    "train.durability", "train.compile", "train.dist_timeout_s", "classifier.overlap",
                    "monitor.")


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(old: Config, new: Config) -> tuple[list[str], list[str]]:
    """``(trajectory changes, harmless changes)`` from ``old`` to ``new``, as ``key: a -> b`` lines."""
    before, after = _flatten(old.to_dict()), _flatten(new.to_dict())
    refused, accepted = [], []
    for key in dict.fromkeys([*after, *before]):  # a key of a mapping (model.arch_kwargs) may go away
        if before.get(key) != after.get(key):
            line = f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
            (accepted if key.startswith(RESUME_SAFE_KEYS) else refused).append(line)
    return refused, accepted


def validate(config: Config) -> None:
    """Value and cross-field checks that types alone cannot express."""
    for section in dataclasses.fields(config):
        for f in dataclasses.fields(getattr(config, section.name)):
            value = getattr(getattr(config, section.name), f.name)
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, float) and not math.isfinite(v):
                    raise ConfigError(f"config key '{section.name}.{f.name}' must be a finite number, "
                                      f"got {v}")
    positive = {
        "optim.batch_size": config.optim.batch_size,
        "optim.base_lr": config.optim.base_lr,
        "optim.epochs": config.optim.epochs,
        "schedule.window": config.schedule.window,
        "schedule.stride": config.schedule.stride,
        "classifier.recent_k": config.classifier.recent_k,
        "classifier.temperature": config.classifier.temperature,
        "classifier.chunk_rows": config.classifier.chunk_rows,
        "data.image_size": config.data.image_size,
        "model.feature_dim": config.model.feature_dim,
        "train.checkpoint_every": config.train.checkpoint_every,
        "train.keep_checkpoints": config.train.keep_checkpoints,
        "train.log_every": config.train.log_every,
        "train.max_steps": 1 if config.train.max_steps is None else config.train.max_steps,
        "model.head_hidden": config.model.head_hidden,
        "optim.base_batch_size": config.optim.base_batch_size,
        "data.cache_gb": config.data.cache_gb,
        "monitor.k": config.monitor.k,
        "monitor.temperature": config.monitor.temperature,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {value}")
    non_negative = {
        "data.workers": config.data.workers,
        "optim.warmup_epochs": config.optim.warmup_epochs,
        "optim.momentum": config.optim.momentum,
        "optim.weight_decay": config.optim.weight_decay,
        "monitor.every_steps": config.monitor.every_steps,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {value}")
    for f in dataclasses.fields(AugmentConfig):
        value = getattr(config.augment, f.name)
        if f.name.endswith("_p") and not 0 <= value <= 1:
            raise ConfigError(f"config key 'augment.{f.name}' must be in [0, 1], got {value}")
    if config.model.norm == "group" and config.model.head_hidden % GROUPS:
        raise ConfigError(f"config key 'model.head_hidden' must be a multiple of {GROUPS} with "
                          f"model.norm = group (GroupNorm's {GROUPS} groups), got {config.model.head_hidden}")
    if config.model.arch == "resnet18_quarter" and (config.model.norm == "group" or config.model.cifar_stem
                                                    or config.model.arch_kwargs):
        raise ConfigError("model.arch 'resnet18_quarter' has its own 32 px stem and 16-channel stages: "
                          "it takes neither model.cifar_stem=true, model.norm=group nor model.arch_kwargs")
    if config.schedule.stride > config.schedule.window:
        raise ConfigError("config key 'schedule.stride' must be <= 'schedule.window'")
    if config.classifier.sampling == "recent" and config.classifier.recent_k < config.optim.batch_size:
        raise ConfigError("config key 'classifier.recent_k' must be >= 'optim.batch_size'")
    if isinstance(config.classifier.overlap, bool):  # YAML 1.1 reads a bare on/off as a boolean
        config.classifier.overlap = "on" if config.classifier.overlap else "off"
    for key, folder, why in (("run.output_dir", config.run.output_dir, "the run lock and the checkpoints' renames"),
                             ("data.cache_dir", config.data.cache_dir, "the verified entries' renames")):
        if folder and "://" in folder:
            raise ConfigError(f"config key '{key}' must be a local or shared POSIX folder, not a URL ({folder}): "
                              f"{why} need one")
    if not config.data.train:
        raise ConfigError("config key 'data.train' must name a shard manifest (path or URL) or a .beton")
    if len(config.data.crop_scale) != 2 or not 0 < config.data.crop_scale[0] <= config.data.crop_scale[1] <= 1:
        raise ConfigError("config key 'data.crop_scale' must be [low, high] with 0 < low <= high <= 1")
    for i, item in enumerate(config.data.multi_crop):
        scale = item[2:]
        if not (len(item) in (2, 4) and all(v == int(v) and v >= 1 for v in item[:2])
                and (not scale or 0 < scale[0] <= scale[1] <= 1)):
            raise ConfigError(f"config key 'data.multi_crop[{i}]' must be [size, count] or [size, count, "
                              f"scale_low, scale_high] with whole size, count >= 1 and 0 < low <= high "
                              f"<= 1, got {item}")
    validate_optim(config.optim)
    from .backbones import check_backbone  # imports torch and the model zoos: only once a config is sound

    check_backbone(config.model, [config.data.image_size] + [int(item[0]) for item in config.data.multi_crop])


def validate_optim(optim: OptimConfig) -> None:
    """The backbone optimizer's settings; the rows' SGD (base_lr, momentum, weight_decay) is checked above."""
    if optim.name != "sgd" and (optim.backbone_lr is None or optim.backbone_weight_decay is None):
        raise ConfigError(f"optim.name = {optim.name} needs optim.backbone_lr and optim.backbone_weight_decay: "
                          "optim.base_lr, momentum and weight_decay are the classifier rows' SGD (their lazy "
                          f"correction is SGD's), not {optim.name}'s settings")
    for key in ("backbone_lr", "clip_grad", "lars_trust"):
        value = getattr(optim, key)
        if value is not None and value <= 0:
            raise ConfigError(f"config key 'optim.{key}' must be > 0, got {value}")
    for key in ("backbone_weight_decay", "backbone_weight_decay_end"):
        value = getattr(optim, key)
        if value is not None and value < 0:
            raise ConfigError(f"config key 'optim.{key}' must be >= 0, got {value}")
    if len(optim.betas) != 2 or not all(0 <= b < 1 for b in optim.betas):
        raise ConfigError(f"config key 'optim.betas' must be [beta1, beta2] in [0, 1), got {optim.betas}")
