"""The Hydra application behind the ``lora-lightning`` command.

Modules: ``main`` (entry point, config discovery, one-line errors), ``train`` (the job),
``models`` (from_pretrained loading, target roles), ``pretrain`` (tiny bases built on first use),
``data`` (text sources and token blocks), ``module`` (the LightningModule), ``tracking`` (W&B /
CSV loggers), ``report`` (summary.json and the final recap). Only this package imports hydra,
omegaconf, wandb and torchmetrics.
"""
