"""tfdpfair.data."""
