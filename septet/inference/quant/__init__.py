"""Weight-only quantisation for inference.

- `layers`: the layer base (`QuantLinear`) and PyTorch-kernel layers (`Int8Linear`, `Int4Linear`)
- `blocks`: layers on septet's own Q4_1 / Q8_0 block kernels (`Q4Linear`, `Q8Linear`)
- `head`: the refined output head and the block-read embedding
- `plan`: `QuantPlan` and `quantize_model`, which apply it to a model
- `on_load`: `QuantizeOnLoad`, the same plan applied while a checkpoint streams in
"""

from .blocks import Q4Linear, Q8Linear
from .head import REFINE_TOP, BlockEmbedding, RefinedHead
from .layers import MODES, Int4Linear, Int8Linear, QuantLinear, weight_mode
from .on_load import QuantizeOnLoad, malloc_trim
from .plan import QuantPlan, quantize_linear, quantize_model, septet_kernels

__all__ = ["BlockEmbedding", "Int4Linear", "Int8Linear", "MODES", "Q4Linear", "Q8Linear", "QuantLinear",
           "QuantPlan", "QuantizeOnLoad", "REFINE_TOP", "RefinedHead", "malloc_trim", "quantize_linear",
           "quantize_model", "septet_kernels", "weight_mode"]
