"""Training: token files and windows, the jitted train step and optimizer, the device mesh,
and orbax training checkpoints."""
