"""marfast: masked autoregressive image generation with a per-token Diffusion Loss."""
from .accelerate import accelerate
from .ar import CausalAR
from .diffloss import DiffLoss, SimpleMLPAdaLN
from .diffusion import GaussianDiffusion
from .discrete import CrossEntropyMAR, DiscreteMAR
from .mar import MAR, mar_base, mar_huge, mar_large

__all__ = ["MAR", "DiffLoss", "accelerate", "SimpleMLPAdaLN", "GaussianDiffusion", "mar_base", "mar_large", "mar_huge",
           "DiscreteMAR", "CrossEntropyMAR", "CausalAR"]
__version__ = "0.1.0"
