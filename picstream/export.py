"""`picstream-export`: the pre-trained backbone in torchvision, timm or Detectron2 layout.

- torchvision / timm: the keys of `torchvision.models.resnetXX()` without `fc` (timm's ResNet uses the
  same names). Load with `model.fc = torch.nn.Identity(); model.load_state_dict(sd, strict=True)`.
- detectron2: a pickle `{"model": {name: ndarray}, "__author__": "picstream",
  "matching_heuristics": True}` with Detectron2's ResNet names (`stem.conv1`, `res2..res5`,
  `convK.norm`, `shortcut`, `shortcut.norm`). picstream backbones put the stride in the 3×3 conv and
  expect RGB input: set `MODEL.RESNETS.STRIDE_IN_1X1: False`, `INPUT.FORMAT: "RGB"` and the ImageNet
  pixel mean/std (×255) in the Detectron2 config.
"""
from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path
from typing import Optional

import torch

from .checkpoint import load_checkpoint

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


def write_export(state: dict[str, torch.Tensor], fmt: str, output: Path, safetensors: bool) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in convert(state, fmt).items()}
    if safetensors:
        from safetensors.torch import save_file

        save_file(tensors, str(output), metadata={"format": fmt, "producer": "picstream"})
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
    parser.add_argument("--safetensors", action="store_true", help="write a .safetensors file")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        checkpoint = load_checkpoint(args.checkpoint)
    except (ValueError, FileNotFoundError) as err:
        print(f"picstream-export: error: {err}", file=sys.stderr)
        return 2
    state = backbone_state_dict(checkpoint)
    write_export(state, args.format, args.output, args.safetensors)
    print(f"picstream-export: wrote {len(state)} tensors ({args.format}) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
