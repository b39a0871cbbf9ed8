"""voxlm.export."""
