"""Client side: the Flower ClientApp, the local KD trainer and runtime backends."""
