"""Vision-language training and inference: Flamingo and BLIP-2 bridges on frozen encoders and LMs."""
