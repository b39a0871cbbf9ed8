"""voxlm.codec."""
