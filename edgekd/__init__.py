"""edgekd: federated and continual knowledge distillation onto edge devices."""

__version__ = "0.1.0"
