"""Training of the reference MaskConver: targets, losses, augmentation and the loop (torch is imported here)."""
