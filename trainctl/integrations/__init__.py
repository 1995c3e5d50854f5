"""Callbacks that make a framework's training loop an attached trainctl run.

    from trainctl.integrations.lightning import TrainctlCallback      # PyTorch Lightning
    from trainctl.integrations.transformers import TrainctlCallback   # Hugging Face Trainer

Each is optional: importing one needs its framework installed (see docs/attach.md)."""
