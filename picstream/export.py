"""`picstream-export`: the pre-trained backbone in torchvision, timm or Detectron2 layout.

- torchvision (torchvision archs): the keys of `torchvision.models.<arch>()` without `fc`. Load with
  `model.fc = torch.nn.Identity(); model.load_state_dict(sd, strict=True)`.
- timm (timm archs, and torchvision ResNets, whose keys timm's ResNets share): a safetensors file with
  the keys of `timm.create_model(<name>, num_classes=0)`, and timm's `config.json` for it (architecture,
  model_args = model.arch_kwargs, pretrained_cfg with picstream's input size and normalisation):
  `-o x.safetensors` writes `x.safetensors` + `x.json`; `-o FOLDER` writes `FOLDER/model.safetensors` +
  `FOLDER/config.json` (timm's local layout). Load, offline, with a new classifier of N classes:
  `timm.create_model(<name>, pretrained=True, pretrained_cfg_overlay=dict(file="x.safetensors"),
  num_classes=N, **model_args)` or `timm.create_model("local-dir:FOLDER", pretrained=True, num_classes=N)`.
- detectron2: a pickle `{"model": {name: ndarray}, "__author__": "picstream",
  "matching_heuristics": True}` with Detectron2's ResNet names (`stem.conv1`, `res2..res5`,
  `convK.norm`, `shortcut`, `shortcut.norm`). picstream backbones put the stride in the 3×3 conv and
  expect RGB input: set `MODEL.RESNETS.STRIDE_IN_1X1: False`, `INPUT.FORMAT: "RGB"` and the ImageNet
  pixel mean/std (×255) in the Detectron2 config.
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path
from typing import Optional

import torch

import yaml

from .backbones import RESNET_FAMILIES, build_off_device, import_timm, is_timm, timm_name
from .checkpoint import load_checkpoint
from .config import Config, ConfigError, ModelConfig, config_from_dict
from .loader import IMAGENET_MEAN, IMAGENET_STD

FORMATS = ("torchvision", "timm", "detectron2")


def backbone_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The backbone's weights from a training checkpoint (head and classifier dropped)."""
    prefix = "backbone."
    return {k[len(prefix):]: v for k, v in checkpoint["model"].items() if k.startswith(prefix)}


def detectron2_name(key: str) -> str:
    """torchvision ResNet key → Detectron2 ResNet key."""
    if not key.startswith("layer"):
        key = "stem." + key
    for stage in (1, 2, 3, 4):
        key = key.replace(f"layer{stage}", f"res{stage + 1}")
    for index in (1, 2, 3):
        key = key.replace(f"bn{index}", f"conv{index}.norm")
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def convert(state: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "detectron2":
        return {detectron2_name(k): v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    return dict(state)


def check_format(model: ModelConfig, fmt: str) -> None:
    """One line (`ValueError`) when the backbone ``model`` names has no ``fmt`` layout."""
    if fmt == "torchvision" and is_timm(model.arch):
        raise ValueError(f"{model.arch} is a timm model: export it with --format timm")
    if fmt == "detectron2" and not model.arch.startswith(RESNET_FAMILIES):
        raise ValueError(f"--format detectron2 takes ResNets; export {model.arch} with --format "
                         f"{'timm' if is_timm(model.arch) else 'torchvision'}")


def timm_config(config: Config, state: dict[str, torch.Tensor]) -> dict:
    """timm's ``config.json`` of the exported backbone, after checking that ``state`` has exactly the
    keys and shapes of ``timm.create_model(<name>, num_classes=0, **model.arch_kwargs)`` (so it loads
    strictly); one line (`ValueError`) when it does not or the arch has no timm counterpart."""
    model = config.model
    name = timm_name(model.arch) if is_timm(model.arch) else model.arch
    timm = import_timm(model.arch)
    if (not is_timm(model.arch) and (model.cifar_stem or not model.arch.startswith(RESNET_FAMILIES))
            or not timm.is_model(name)):
        raise ValueError(f"{model.arch}{' with the CIFAR stem' if model.cifar_stem else ''} has no timm "
                         "counterpart: export it with --format torchvision")
    reference, width = build_off_device(ModelConfig(arch=f"timm/{name}", arch_kwargs=model.arch_kwargs))
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        differ = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
        raise ValueError(f"the backbone's tensors are not those of timm's {name} ({len(differ)} differ, e.g. "
                         f"{', '.join(differ[:3])}): export it with --format torchvision")
    size = config.data.image_size
    pretrained_cfg = {k: v for k, v in reference.pretrained_cfg.items()
                      if k not in ("url", "hf_hub_id", "file", "source", "state_dict", "license")}
    pretrained_cfg.update(architecture=name, tag="picstream", num_classes=0, input_size=[3, size, size],
                          mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    return {"architecture": name, "num_classes": 0, "num_features": width, "model_args": model.arch_kwargs,
            "pretrained_cfg": pretrained_cfg}


def timm_paths(output: Path) -> tuple[Path, Path]:
    """``(weights, config)``: ``x.safetensors`` + ``x.json``, or timm's folder layout."""
    if output.suffix == ".safetensors":
        return output, output.with_suffix(".json")
    return output / "model.safetensors", output / "config.json"


def write_export(state: dict[str, torch.Tensor], fmt: str, output: Path, safetensors: bool,
                 metadata: Optional[dict[str, str]] = None) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in convert(state, fmt).items()}
    if safetensors:
        from safetensors.torch import save_file

        save_file(tensors, str(output), metadata={"format": fmt, "producer": "picstream", **(metadata or {})})
    elif fmt == "detectron2":
        payload = {"model": {k: v.numpy() for k, v in tensors.items()}, "__author__": "picstream",
                   "matching_heuristics": True}
        with open(output, "wb") as fh:
            pickle.dump(payload, fh)
    else:
        torch.save(tensors, output)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="picstream-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a picstream training checkpoint (ckpt-*.pt)")
    parser.add_argument("--format", choices=FORMATS, default="torchvision")
    parser.add_argument("--safetensors", action="store_true",
                        help="write a .safetensors file (always, with --format timm)")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        checkpoint = load_checkpoint(args.checkpoint)
        if "config" not in checkpoint:
            raise ValueError(f"{args.checkpoint} has no config: not a training checkpoint")
        config = config_from_dict(yaml.safe_load(checkpoint["config"]))
        check_format(config.model, args.format)
        state = backbone_state_dict(checkpoint)
        output = args.output
        if args.format == "timm":
            timm_cfg = timm_config(config, state)
            output, cfg_path = timm_paths(args.output)
            write_export(state, "timm", output, True, {"architecture": timm_cfg["architecture"],
                                                       "model_args": json.dumps(timm_cfg["model_args"])})
            cfg_path.write_text(json.dumps(timm_cfg, indent=2) + "\n")
        else:
            write_export(state, args.format, output, args.safetensors)
    except (ValueError, FileNotFoundError, ConfigError) as err:
        print(f"picstream-export: error: {err}", file=sys.stderr)
        return 2
    print(f"picstream-export: wrote {len(state)} tensors ({args.format}) to {output}")
    if args.format == "timm":
        model_args = "".join(f", {k}={v!r}" for k, v in timm_cfg["model_args"].items())
        print(f"load with: timm.create_model({timm_cfg['architecture']!r}, pretrained=True, "
              f"pretrained_cfg_overlay=dict(file={str(output)!r}), num_classes=N{model_args})")
    return 0

if __name__ == "__main__":
    sys.exit(main())
