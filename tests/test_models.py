"""Models: timm builds offline, head swap for LDAM, local weights, clear errors."""
import subprocess
import sys

import pytest
import torch
from pydantic import ValidationError

from trainctl.workers.engine.losses import NormedLinear
from trainctl.workers.engine.models import (ModelError, build_model, known_model,
                                            suggest_models)
from trainctl.params.model_data import ModelParams


def build(name="resnet10t", num_classes=10, in_chans=1, **kw):
    loss_name = kw.pop("loss_name", None)
    return build_model(ModelParams(name=name, **kw), num_classes=num_classes,
                       in_chans=in_chans, loss_name=loss_name)


@pytest.mark.parametrize("name, kwargs", [
    ("resnet10t", {}),
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4}),
    ("mobilenetv3_small_050", {}),
])
def test_forward_shape_one_channel_32px(name, kwargs):
    model = build(name, kwargs=kwargs).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_ldam_gets_cosine_head():
    model = build(loss_name="ldam").eval()
    assert isinstance(model.fc, NormedLinear) and model.get_classifier() is model.fc
    with torch.no_grad():
        out = model(torch.randn(3, 1, 32, 32))
    assert out.shape == (3, 10) and out.abs().max() <= 1.0 + 1e-5


def test_pretrained_without_weights_is_refused():
    msg = ("model.pretrained: true needs model.weights (a local file); "
           "trainctl never downloads weights")
    with pytest.raises(ValidationError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        ModelParams(name="resnet10t", pretrained=True)
    # build_model checks again for params that skipped validation
    with pytest.raises(ModelError) as e:
        build_model(ModelParams.model_construct(name="resnet10t", pretrained=True,
                                                weights=None, kwargs={}, num_classes=None,
                                                in_chans=None, drop_rate=0.0),
                    num_classes=10, in_chans=1)
    assert str(e.value) == msg


def test_unknown_name_suggests():
    with pytest.raises(ModelError, match=r"unknown timm model 'resnt10t'; did you mean "
                                         r"resnet10t"):
        build("resnt10t")
    assert known_model("resnet10t") and known_model("resnet10t.c3_in1k")
    assert not known_model("hf-hub:timm/resnet10t.c3_in1k") and not known_model("nope")
    assert suggest_models("vit_tiny")[0].startswith("vit_tiny")


def test_hub_names_rejected_at_validation():
    with pytest.raises(ValidationError, match="never downloads"):
        ModelParams(name="hf-hub:timm/resnet10t.c3_in1k")


def test_weights_round_trip(tmp_path):
    src = build()
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    dst = build(pretrained=True, weights=str(path))
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(),
                                                 dst.state_dict().values()))


def test_weights_from_checkpoint_other_head_and_channels(tmp_path):
    src = build(num_classes=5, in_chans=3)
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v
                                           for k, v in src.state_dict().items()}}, path)
    dst = build(num_classes=10, in_chans=1, weights=str(path))  # head fresh, conv adapted
    assert dst.fc.out_features == 10
    assert torch.equal(src.layer1[0].conv1.weight, dst.layer1[0].conv1.weight)
    conv = dst.pretrained_cfg["first_conv"] + ".weight"
    assert dst.state_dict()[conv].shape[1] == 1
    ldam = build(num_classes=5, in_chans=3, weights=str(path), loss_name="ldam")
    assert torch.equal(ldam.fc.weight, src.fc.weight)  # Linear weight loads into the cosine head


def test_weights_errors(tmp_path):
    with pytest.raises(ModelError, match="model.weights: .*missing.pt does not exist"):
        build(weights=str(tmp_path / "missing.pt"))
    other = tmp_path / "other.pt"
    torch.save(build("mobilenetv3_small_050").state_dict(), other)
    with pytest.raises(ModelError, match="model.weights"):
        build(weights=str(other))


def test_shape_and_kwargs_errors():
    with pytest.raises(ModelError, match="model.num_classes: 5, but the dataset has 10"):
        build_model(ModelParams(name="resnet10t", num_classes=5), num_classes=10, in_chans=1)
    with pytest.raises(ModelError, match="model.kwargs"):
        build(kwargs={"no_such_arg": 1})
    with pytest.raises(ValidationError, match="model.kwargs: num_classes"):
        ModelParams(name="resnet10t", kwargs={"num_classes": 3})


def test_spec_modules_do_not_import_torch():
    code = ("import sys; import trainctl.params.model_data, trainctl.workers.engine.models,"
            " trainctl.workers.engine.losses; assert 'torch' not in sys.modules, 'torch'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_stored_spec_with_defaults_written_out_revalidates():
    p = ModelParams(name="resnet10t", pretrained=True, weights="/w.pt", kwargs={"drop_path_rate": 0.1})
    assert ModelParams.model_validate(p.model_dump(mode="json")) == p
