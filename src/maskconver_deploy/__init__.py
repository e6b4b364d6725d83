"""maskconver-deploy: MaskConver from a PyTorch reference to every runtime, with measured parity.

`maskconver_deploy.load(model_dir_or_checkpoint, backend="ort", threads=None)` opens a model for prediction;
`maskconver_deploy.api` holds the commands as functions (export, compile, parity, evaluate, bench). Both are
imported on first use, so `import maskconver_deploy` loads nothing heavy.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["load", "Predictor", "Prediction", "api", "__version__"]

_LAZY = ("load", "Predictor", "Prediction")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from maskconver_deploy import api

        return getattr(api, name)
    if name == "api":
        import importlib

        return importlib.import_module("maskconver_deploy.api")
    raise AttributeError(f"module 'maskconver_deploy' has no attribute {name!r}")
