"""Names shared by the two programs of the TFLite backend: the toolkit side (`maskconver_deploy.backends.tflite`)
and the builder that runs in the onnx2tf environment (`builder.py`, `tail.py`). Imports nothing."""

from __future__ import annotations

RECORD_FORMAT = "maskconver-tflite/1"
SIGNATURE = "serving_default"
POST_SCOPE = "mcv_post"  # name scope of the post-processing ops (kept float in int8)
CUT_PREFIX = "mcv_cut_"
