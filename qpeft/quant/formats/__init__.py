"""The registered quantization formats, and reading config and grid names.

A format is one module here defining a `QuantConfig` subclass (see
`qpeft.quant.config`); listing it in `FORMATS` registers it everywhere a config is
read: the CLI, manifests, grids, GPTQ and the cost table.
"""

from __future__ import annotations

from qpeft.errors import QpeftError
from qpeft.quant.config import QuantConfig
from qpeft.quant.formats.ggml import GGMLConfig, GGUFBlockConfig, IQ4NLConfig
from qpeft.quant.formats.integer import IntConfig
from qpeft.quant.formats.kquants import KQuantConfig
from qpeft.quant.formats.normalfloat import NFConfig

FORMATS: tuple[type[QuantConfig], ...] = (NFConfig, IntConfig, GGMLConfig, IQ4NLConfig, KQuantConfig)

PRESETS: dict[str, QuantConfig] = {name: config for fmt in FORMATS for name, config in fmt.presets.items()}
GRIDS: dict[str, list[QuantConfig]] = {name: grid for fmt in FORMATS for name, grid in fmt.grids.items()}
# every GGUF block format; a matrix takes those whose block its rows divide into
GRIDS["gguf"] = [fmt.of_kind(kind) for fmt in FORMATS if issubclass(fmt, GGUFBlockConfig) for kind in fmt.kinds]


def parse_config(text: str) -> QuantConfig:
    """A preset name or a format's full name (the inverse of `QuantConfig.name`)."""
    key = text.strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    for fmt in FORMATS:
        config = fmt.parse(key)
        if config is not None:
            return config
    forms = " or ".join(fmt.syntax for fmt in FORMATS)
    raise QpeftError(f"unknown quantization config {text!r}: use a preset ({', '.join(PRESETS)}) or the form {forms}")


def parse_grid(text: str) -> list[QuantConfig]:
    """Candidate configs for the ILP: comma-separated grid names ('lqlora', 'nf', ...)
    and config names, in any mix of formats."""
    configs: list[QuantConfig] = []
    for part in (p.strip() for p in text.strip().lower().split(",")):
        if part:
            configs.extend(GRIDS[part] if part in GRIDS else [parse_config(part)])
    if not configs:
        raise QpeftError(f"empty config grid {text!r}: name a grid ({', '.join(GRIDS)}) or list configs")
    names = [c.name for c in configs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise QpeftError(f"the config grid lists {duplicates[0]} twice")
    return configs
