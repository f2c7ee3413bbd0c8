"""TrainerCallbacks that bring pruning to any transformers Trainer: `CAPPruningCallback(config, schedule,
calibration_batches).add_to(trainer)`."""

from trainer_plugins.pruning import CAPPruningCallback

__all__ = ["CAPPruningCallback"]
