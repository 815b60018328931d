import torch
from torch import nn

from ironlm import kernels
from ironlm.layers.module import Module


class RMSNorm(Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Accumulates in fp32 and rounds where Hugging Face does, so bf16 runs match it (kernels.reference_rms_norm).
        return kernels.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Adds x into the residual stream and returns (normed, residual), both in place: the normed values
        overwrite x, a sublayer's output that is dead once added (one allocation fewer a call)."""
        return kernels.add_rms_norm(x, residual, self.weight, self.eps, in_place=True), residual
