"""hydra/sweeper=study: the sweeper of lora-lightning's studies (see lora_lightning.app.sweep.study)."""
