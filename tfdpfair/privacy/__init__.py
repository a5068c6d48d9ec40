"""tfdpfair.privacy."""
