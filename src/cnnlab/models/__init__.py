"""The networks a config names, and the article's own script (cnnlab.models.article).

A config's `model._target_` names them here, as cnnlab.models.ConvNet, cnnlab.models.MLP and
cnnlab.models.TorchvisionNet: logged runs keep those names, so they stay importable from here.
"""

from cnnlab.models.networks import MLP, ConvNet, TorchvisionNet

__all__ = ["MLP", "ConvNet", "TorchvisionNet"]
