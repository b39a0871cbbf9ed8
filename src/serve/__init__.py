"""voxlm.serve."""
