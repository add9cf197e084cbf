"""nlpkit: fine-tuning recipes for Hugging Face models behind one CLI."""

import logging

# bitsandbytes tries to fetch CPU kernels from a model hub at import and logs a harmless failure (docs/stack-notes.md trap 3).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# 8-bit matmuls on CPU log "inputs will be cast ... to float16" once per call: thousands of lines per eval.
logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)

__version__ = "0.1.0"
