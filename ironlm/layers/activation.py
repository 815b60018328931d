import torch

from ironlm import kernels
from ironlm.layers.module import Module


class SiluAndMul(Module):
    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        return kernels.silu_mul(gate_up)  # (T, 2I) -> (T, I)
