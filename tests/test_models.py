"""Model shapes and the article's exact architecture."""

from __future__ import annotations

import pytest
import torch

from cnnlab import CnnlabError, reference
from cnnlab.models import MLP, ConvNet


def test_convnet_is_the_articles_network():
    ours, theirs = ConvNet(), reference.ConvNet()
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
        (k, v.shape) for k, v in theirs.state_dict().items()
    ]
    assert ours.layers[5].in_features == 24 * 24 * 5
    torch.manual_seed(0)
    ours = ConvNet()
    torch.manual_seed(0)
    theirs = reference.ConvNet()
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
