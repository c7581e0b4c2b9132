"""What a training loop uses below the model: optimiser and schedule, atomic checkpoints,
data-parallel helpers."""
