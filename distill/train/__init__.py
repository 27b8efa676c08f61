"""Training loops on `accelerate`."""
