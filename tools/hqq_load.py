"""Load a `qpeft export --to hf-hqq` directory the way a user would, with no qpeft
imported: transformers (4.57, the last release that loads HQQ models) + hqq, then
peft's LoRA over the HQQ layers; compare its logits on the token ids of
DIR/reference.pt with the logits stored there (qpeft's own forward).

    .venv-hf4/bin/python tools/hqq_load.py EXPORT_DIR REFERENCE.pt [--dtype fp32]

Prints one JSON line: versions, the HQQ layers found, the largest absolute and the
relative logit difference, and whether every quantized matrix dequantizes to the
reference weights stored beside the logits (bit for bit in fp32). In fp16 or bf16 it
first sets each HQQ layer's compute dtype, which transformers 4.57 leaves at fp32.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("reference", type=Path)
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    args = parser.parse_args()

    import hqq
    import peft
    import transformers
    from hqq.core.quantize import HQQLinear
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[args.dtype]
    reference = torch.load(args.reference)
    model = AutoModelForCausalLM.from_pretrained(args.export, dtype=dtype, device_map="cpu")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, HQQLinear)}
    if dtype != torch.float32:
        # transformers 4.57 builds pre-quantized HQQ layers with an fp32 compute dtype
        # whatever `dtype` is (hqq issue #170: "expected mat1 and mat2 to have the same
        # dtype"); setting it and re-placing the layer casts scale and zero to it
        for layer in layers.values():
            layer.compute_dtype = dtype
            layer.cuda(layer.device)
    weights_equal = all(
        torch.equal(layers[name].dequantize().float(), weight) for name, weight in reference["weights"].items()
    )
    adapter = args.export / "adapter"
    if adapter.is_dir():
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        logits = model(reference["ids"]).logits.float()
    diff = (logits - reference["logits"]).abs()
    print(
        json.dumps(
            {
                "transformers": transformers.__version__,
                "peft": peft.__version__,
                "hqq": hqq.__version__ if hasattr(hqq, "__version__") else "?",
                "qpeft_imported": any(m == "qpeft" or m.startswith("qpeft.") for m in sys.modules),
                "hqq_layers": len(layers),
                "weights_checked": len(reference["weights"]),
                "weights_equal": weights_equal,
                "adapter": adapter.is_dir(),
                "compute_dtype_set": dtype != torch.float32,
                "max_abs_diff": float(diff.max()),
                "rel_diff": float(diff.norm() / reference["logits"].norm()),
                "max_abs_logit": float(reference["logits"].abs().max()),
            }
        )
    )


if __name__ == "__main__":
    main()
