"""functuner.core."""
