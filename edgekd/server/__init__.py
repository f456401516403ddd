"""Server side: the ServerApp, the distillation strategy, teacher service, evaluation."""
