"""Generation: sampling on the device, the single-token decode step, batched generate/stream,
and RNN-state files."""
