"""The data plane for training: tasks, methods, the Ray Train loop, checkpoints and the export."""
