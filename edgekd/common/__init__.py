"""Plain torch/numpy building blocks; nothing here imports flwr."""
