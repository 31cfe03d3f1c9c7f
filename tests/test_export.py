import pickle

import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file

from picstream.checkpoint import save_checkpoint
from picstream.config import ModelConfig
from picstream.export import backbone_state_dict, detectron2_name, main
from picstream.model import PICNet


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    net = PICNet(ModelConfig(arch="resnet50", head_hidden=64, feature_dim=16))
    return save_checkpoint(tmp_path_factory.mktemp("ck"), 5, {"model": net.state_dict()}), net


def test_torchvision_export_loads_strict(checkpoint, tmp_path):
    path, net = checkpoint
    assert main([str(path), "--format", "torchvision", "-o", str(tmp_path / "b.pth")]) == 0
    state = torch.load(tmp_path / "b.pth", weights_only=True)
    model = torchvision.models.resnet50()
    model.fc = torch.nn.Identity()
    model.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 64, 64)
    net.eval(), model.eval()
    assert torch.equal(model(x), net.backbone(x))


def test_timm_export_loads_strict_safetensors(checkpoint, tmp_path):
    path, net = checkpoint
    assert main([str(path), "--format", "timm", "--safetensors", "-o", str(tmp_path / "b.safetensors")]) == 0
    model = timm.create_model("resnet50", pretrained=False, num_classes=0)
    model.load_state_dict(load_file(str(tmp_path / "b.safetensors")), strict=True)
    x = torch.randn(2, 3, 64, 64)
    net.eval(), model.eval()
    assert torch.allclose(model(x), net.backbone(x), atol=1e-5)


def test_detectron2_names(checkpoint, tmp_path):
    path, _ = checkpoint
    assert main([str(path), "--format", "detectron2", "-o", str(tmp_path / "b.pkl")]) == 0
    with open(tmp_path / "b.pkl", "rb") as fh:
        payload = pickle.load(fh)
    keys = set(payload["model"])
    assert payload["matching_heuristics"] is True
    assert {"stem.conv1.weight", "stem.conv1.norm.weight", "stem.conv1.norm.running_var",
            "res2.0.conv1.weight", "res2.0.conv3.norm.bias", "res2.0.shortcut.weight",
            "res2.0.shortcut.norm.running_mean", "res5.2.conv2.norm.weight"} <= keys
    assert not any(k.startswith(("layer", "fc", "bn1")) or "num_batches_tracked" in k for k in keys)
    assert len(keys) == len([k for k in backbone_state_dict(torch.load(path, weights_only=True))
                             if "num_batches_tracked" not in k])
    assert detectron2_name("layer3.1.downsample.1.weight") == "res4.1.shortcut.norm.weight"


def test_bad_checkpoint_is_one_clear_error(tmp_path, capsys):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main([str(bad), "-o", str(tmp_path / "o.pth")]) == 2
    assert "picstream-export: error:" in capsys.readouterr().err
