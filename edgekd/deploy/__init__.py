"""Export and packaging of students for edge runtimes (never imports flwr)."""
