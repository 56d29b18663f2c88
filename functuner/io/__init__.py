"""functuner.io."""
