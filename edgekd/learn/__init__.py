"""The torch learning layer: models, KD losses, training loops and the compression
recipes (pruning, low-rank, quantization). Nothing here imports flwr."""
