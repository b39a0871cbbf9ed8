"""voxlm.rlhf."""
