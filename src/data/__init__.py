"""voxlm.data."""
