"""`python -m maskconver_deploy.backends.tflite build SCRATCH PRECISION`: the builder, in the onnx2tf environment."""

import sys

from maskconver_deploy.backends.tflite.builder import build_main

sys.exit(build_main(sys.argv[1:]))
