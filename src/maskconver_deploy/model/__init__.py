"""The PyTorch reference MaskConver (torch is imported only under this package, training/ and export.py)."""
