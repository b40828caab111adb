"""The run config and the training runtime shared by the entry points in jobs/ (checkpoints, teacher EMA, run lock, launcher)."""
