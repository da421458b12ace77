"""Package data: images."""
