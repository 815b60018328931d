import torch
from torch import nn

from ironlm import kernels


class SiluAndMul(nn.Module):
    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        return kernels.silu_mul(gate_up)  # (T, 2I) -> (T, I)
