"""qpeft: quantization-aware parameter-efficient fine-tuning (QLoRA, LQ-LoRA, QWHA)."""

__version__ = "0.1.0"
