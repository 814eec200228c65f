"""cnnlab's defaults reproduce the article's script: same batches, same losses."""

from __future__ import annotations

import torch

from cnnlab.models.article import article_training
from cnnlab.train import train


def test_default_config_logs_the_articles_losses(compose_cfg, tiny_data, tiny_overrides):
    root, _ = tiny_data
    # The article's script (torchvision MNIST + ToTensor, shuffled DataLoader with one worker,
    # seed 42, Adam 1e-4, batch 10) for 2 epochs of the 600 synthetic images.
    expected, _ = article_training(root, batches=2 * 60, log_every=20, device=torch.device("cpu"))

    cfg = compose_cfg([*tiny_overrides, "train.epochs=2", "tracking.log_model=false"])
    assert (cfg.train.batch_size, cfg.train.seed, cfg.optimizer.lr) == (10, 42, 1e-4)
    train(cfg)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.tracking.uri)
    run = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])[0]
    logged = [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert len(logged) == len(expected) == 2 * 600 // 10 // 20
    for ours, theirs in zip(logged, expected, strict=True):
        assert ours == theirs, (logged, expected)  # bit for bit
    assert expected[-1] < expected[0]  # the synthetic task is learnable: losses really moved
