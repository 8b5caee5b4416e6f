"""``python -m lora_lightning``: the same Hydra app as the ``lora-lightning`` command."""

from lora_lightning.app.cli import main

if __name__ == "__main__":
    main()
