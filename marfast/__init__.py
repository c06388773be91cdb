"""marfast: masked autoregressive image generation with a per-token Diffusion Loss."""
from .accelerate import accelerate
from .ar import CausalAR
from .diffloss import DiffLoss, SimpleMLPAdaLN
from .diffusion import GaussianDiffusion
from .discrete import CrossEntropyMAR, DiscreteMAR
from .demar import DenoisingHead, TransformerDiffLoss
from .mar import MAR, demar_base, demar_huge, demar_large, mar_base, mar_huge, mar_large

__all__ = ["MAR", "DiffLoss", "accelerate", "SimpleMLPAdaLN", "GaussianDiffusion", "mar_base", "mar_large", "mar_huge",
           "DiscreteMAR", "CrossEntropyMAR", "CausalAR", "TransformerDiffLoss", "DenoisingHead", "demar_base",
           "demar_large", "demar_huge"]
__version__ = "0.1.0"
