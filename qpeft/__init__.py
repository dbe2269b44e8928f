"""qpeft: quantization-aware parameter-efficient fine-tuning (QLoRA, LQ-LoRA, QWHA)."""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes, on CPUs with AVX512-BF16, tries at import to fetch a gemm kernel from
# the Hugging Face hub and warns when it cannot; qpeft never calls that kernel (the
# frozen base goes through qpeft's or bitsandbytes' own dequantizer), so the warning
# is noise on every run.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
