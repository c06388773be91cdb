"""marfast: masked autoregressive image generation with a per-token Diffusion Loss."""
from .accelerate import accelerate
from .diffloss import DiffLoss, SimpleMLPAdaLN
from .diffusion import GaussianDiffusion
from .mar import MAR, mar_base, mar_huge, mar_large

__all__ = ["MAR", "DiffLoss", "accelerate", "SimpleMLPAdaLN", "GaussianDiffusion", "mar_base", "mar_large", "mar_huge"]
__version__ = "0.1.0"
