"""maskconver-deploy: MaskConver from a PyTorch reference to every runtime, with measured parity."""

__version__ = "0.1.0"
