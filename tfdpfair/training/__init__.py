"""tfdpfair.training."""
