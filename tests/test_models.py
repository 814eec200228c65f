"""Model shapes and the article's exact architecture."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from cnnlab import CnnlabError
from cnnlab.config import schema as schemas
from cnnlab.models import article as reference
from cnnlab.models.networks import MLP, ConvNet, ModelConfigError, TorchvisionNet


def test_convnet_is_the_articles_network():
    ours, theirs = ConvNet(), reference.ArticleConvNet()
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
        (k, v.shape) for k, v in theirs.state_dict().items()
    ]
    assert ours.layers[5].in_features == 24 * 24 * 5
    torch.manual_seed(0)
    ours = ConvNet()
    torch.manual_seed(0)
    theirs = reference.ArticleConvNet()
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(ours(x), theirs(x))  # same seed, same initial weights, same outputs


@pytest.mark.parametrize("model", [ConvNet(), MLP(), MLP(hidden=[]), ConvNet(hidden=[128])])
def test_models_map_images_to_logits(model):
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_models_follow_the_datas_shape_and_classes():
    assert ConvNet(in_shape=(3, 32, 32), num_classes=100)(torch.rand(2, 3, 32, 32)).shape == (
        2,
        100,
    )
    assert MLP(in_shape=(3, 32, 32), num_classes=7)(torch.rand(2, 3, 32, 32)).shape == (2, 7)


def test_a_convnet_that_shrinks_the_image_away_is_a_clear_error():
    with pytest.raises(CnnlabError, match="shrinks a 28x28 image to nothing"):
        ConvNet(conv_channels=[8, 8, 8], kernel_size=11)


def test_a_torchvision_model_takes_the_datas_channels_and_classes():
    net = TorchvisionNet("resnet18", in_shape=(1, 28, 28), num_classes=7)
    assert net.net.conv1.in_channels == 1 and net.net.conv1.stride == (2, 2)
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 7)
    small = TorchvisionNet("resnet18", in_shape=(3, 32, 32), num_classes=10, small_images=True)
    assert (small.net.conv1.kernel_size, small.net.conv1.stride) == ((3, 3), (1, 1))
    assert isinstance(small.net.maxpool, torch.nn.Identity)
    # Not a ResNet: the first Conv2d wherever it is (MobileNet's features[0][0]).
    mobile = TorchvisionNet("mobilenet_v3_small", in_shape=(1, 28, 28), num_classes=3)
    assert mobile.net.features[0][0].in_channels == 1
    assert mobile(torch.rand(2, 1, 28, 28)).shape == (2, 3)


@pytest.mark.parametrize(
    "arguments,message",
    [
        ({"name": "resnet81"}, r"^model.name=resnet81 is not a torchvision classification "
         r"model; did you mean resnet18\? list them with: python -c .*list_models"),
        ({"name": "vgg11", "small_images": True}, "^model.small_images=true needs a ResNet-style "
         "stem .* vgg11 has not; set model.small_images=false$"),
        ({"name": "resnet18", "kwargs": {"weights": "DEFAULT"}},
         "^model.kwargs.weights: it is built untrained; remove the key$"),
    ],
)  # fmt: skip
def test_a_torchvision_model_that_cannot_be_built_is_one_line(arguments, message):
    with pytest.raises(CnnlabError, match=message):
        TorchvisionNet(in_shape=(3, 32, 32), num_classes=10, **arguments)


def test_a_torchvision_builders_unknown_keyword_is_one_config_error():
    with pytest.raises(ModelConfigError, match="^model.kwargs for resnet18: .*'dropout'"):
        TorchvisionNet("resnet18", (1, 28, 28), 10, kwargs={"dropout": 0.1})


@pytest.mark.parametrize(
    ("model", "schema"),
    [
        (ConvNet, "ConvNetConf"),
        (MLP, "MLPConf"),
        (TorchvisionNet, "TorchvisionConf"),
    ],
)
def test_schema_defaults_are_the_constructors(model, schema):
    # The schema writes the defaults out (composing must not import torch); a model built from
    # a config must still be the one its class builds by default.
    conf = getattr(schemas, schema)()
    signature = inspect.signature(model).parameters
    for f in dataclasses.fields(conf):
        if f.name.startswith("_") or f.name not in signature:
            continue
        default = signature[f.name].default
        if default in (inspect.Parameter.empty, None):  # None: the schema's empty dict
            continue
        if isinstance(default, tuple):
            default = list(default)
        assert getattr(conf, f.name) == default, f.name
