"""voxlm.speechlm."""
