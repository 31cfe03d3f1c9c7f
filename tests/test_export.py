import json
import pickle

import pytest
import timm
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file

from picstream.checkpoint import save_checkpoint
from picstream.config import load_config
from picstream.export import backbone_state_dict, detectron2_name, main
from picstream.model import PICNet


def saved_run(directory, *overrides: str):
    """A checkpoint (with its config, as the trainer writes it) of a PICNet whose weights are random
    (not its initialisation, so a round trip that loses a tensor shows), and the net."""
    config = load_config(None, ["data.train=unused", "model.head_hidden=64", "model.feature_dim=16", *overrides])
    torch.manual_seed(0)
    net = PICNet(config.model)
    with torch.no_grad():
        for tensor in net.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor) * 0.1 + (1 if tensor.ndim == 1 else 0))
    path = save_checkpoint(directory, 5, {"model": net.state_dict(), "config": config.to_yaml()})
    return path, net


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return saved_run(tmp_path_factory.mktemp("ck"), "model.arch=resnet50")


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


TIMM_ARCHS = {
    "vit": ("test_vit", ["model.arch=timm/test_vit", "model.arch_kwargs={img_size: 64, dynamic_img_size: false}",
                         "data.image_size=64"]),
    "convnext": ("test_convnext", ["model.arch=timm/test_convnext", "model.arch_kwargs={ls_init_value: 0.5}",
                                   "data.image_size=64"]),
    "resnet18 (torchvision)": ("resnet18", ["model.arch=resnet18", "data.image_size=64"]),
}


@pytest.mark.parametrize("name, overrides", TIMM_ARCHS.values(), ids=list(TIMM_ARCHS))
def test_timm_export_loads_by_name_offline_strict(name, overrides, tmp_path, monkeypatch):
    """The exported file goes into timm.create_model(name, pretrained=True, file overlay, num_classes=N)
    offline: every backbone tensor equal to the checkpoint's, only the new classifier missing, the same
    features; and into a fresh num_classes=0 model with load_state_dict(strict=True)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, net = saved_run(tmp_path, *overrides)
    out = tmp_path / "backbone.safetensors"
    assert main([str(path), "--format", "timm", "-o", str(out)]) == 0
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["architecture"] == name and sidecar["num_classes"] == 0
    assert sidecar["pretrained_cfg"]["input_size"] == [3, 64, 64]
    assert sidecar["num_features"] == net.head[0].in_features
    with safe_open(str(out), "pt") as fh:
        assert fh.metadata()["architecture"] == name
    trained = backbone_state_dict(torch.load(path, weights_only=True))
    kwargs = sidecar["model_args"]

    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(out)), num_classes=7,
                              **kwargs)
    loaded = model.state_dict()
    assert set(loaded) - set(trained) == {f"{model.pretrained_cfg['classifier']}.{p}" for p in ("weight", "bias")}
    for key, tensor in trained.items():
        assert torch.equal(loaded[key], tensor), key

    fresh = timm.create_model(name, num_classes=0, **kwargs)
    fresh.load_state_dict(load_file(str(out)), strict=True)
    x = torch.randn(2, 3, 64, 64)
    net.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), net.backbone(x), rtol=1e-4, atol=1e-5)


def test_timm_export_to_a_folder_loads_with_local_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, _ = saved_run(tmp_path, *TIMM_ARCHS["vit"][1])
    assert main([str(path), "--format", "timm", "-o", str(tmp_path / "export")]) == 0
    model = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True, num_classes=3)
    trained = backbone_state_dict(torch.load(path, weights_only=True))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())


@pytest.mark.parametrize("overrides, fmt, message", [
    (["model.arch=timm/test_vit", "data.image_size=32"], "torchvision",
     "timm/test_vit is a timm model: export it with --format timm"),
    (["model.arch=timm/test_convnext", "data.image_size=32"], "detectron2", "--format detectron2 takes ResNets"),
    (["model.arch=resnet18", "model.cifar_stem=true", "data.image_size=32"], "timm",
     "resnet18 with the CIFAR stem has no timm counterpart: export it with --format torchvision"),
    (["model.arch=resnet18", "model.norm=group", "data.image_size=32"], "timm",
     "the backbone's tensors are not those of timm's resnet18"),
])
def test_exports_without_a_layout_are_one_line(overrides, fmt, message, tmp_path, capsys):
    path, _ = saved_run(tmp_path, *overrides)
    assert main([str(path), "--format", fmt, "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("picstream-export: error: ") and message in err[0]
