"""TrainerCallbacks that bring pruning to any transformers Trainer (built in the CAPTrainer issue)."""
