"""bitsandbytes' 4-bit format: reading its quantization state as a
`QuantizedTensor` (its compiled kernels, a faster dequantize for matrices stored in
that very format, are in `qpeft.kernels.bnb`).

bitsandbytes stores NF4 codes exactly as qpeft does (flattened, blocks of 64, high
nibble first) and its double-quantized absmax as 8-bit dynamic-map codes with a
fp32 absmax per 256 codes and a fp32 mean offset; qpeft's `nf4` preset stores the
same parts with the same sizes (codes padded to whole blocks when the size does not
divide by 64).
"""

from __future__ import annotations

import torch

from qpeft.errors import QpeftError
from qpeft.quant.formats.normalfloat import NFConfig
from qpeft.quant.tensor import QuantizedTensor

BNB_CONFIG = NFConfig.presets["nf4"]  # NF4, blocks of 64, 8-bit dynamic-map scales per 256, fp32


def from_bnb(packed: torch.Tensor, quant_state) -> QuantizedTensor:
    """Wrap bitsandbytes' (packed weight, QuantState) of an NF4 tensor."""
    if quant_state.quant_type != "nf4":
        raise QpeftError(f"only NF4 bitsandbytes states can be read, got {quant_state.quant_type}")
    shape = tuple(quant_state.shape)
    state2 = quant_state.state2 if quant_state.nested else None
    if state2 is not None:
        config = NFConfig(4, quant_state.blocksize, 8, state2.blocksize, "fp32")
    else:
        config = NFConfig(4, quant_state.blocksize, None, None, "fp32")
    layout = config.layout(quant_state.shape.numel())
    # bitsandbytes stores only the codes it needs; qpeft pads them to whole blocks
    codes = packed.reshape(-1).view(torch.uint8)
    codes = torch.nn.functional.pad(codes, (0, layout.padded_numel // 2 - codes.numel()))
    if state2 is not None:
        scales = torch.nn.functional.pad(quant_state.absmax, (0, layout.padded_num_blocks - quant_state.absmax.numel()))
        offset = torch.as_tensor(quant_state.offset, dtype=torch.float32).reshape(1)
        return QuantizedTensor.from_tensors(
            config, shape, {"codes": codes, "scales": scales, "scale_scales": state2.absmax, "scale_offset": offset}
        )
    return QuantizedTensor.from_tensors(config, shape, {"codes": codes, "scales": quant_state.absmax.float()})
