"""voxlm.eval."""
