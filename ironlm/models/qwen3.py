"""Qwen3: Llama with RMSNorm on each query and key head before RoPE."""
import torch

from ironlm.layers.norm import RMSNorm
from ironlm.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, ModelArgs


class Qwen3Attention(LlamaAttention):
    def __init__(self, args: ModelArgs, rotary):
        super().__init__(args, rotary)
        self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
        self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps)

    def qk_norm(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_norm(q), self.k_norm(k)  # (T, H, D), (T, KVH, D)


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3ForCausalLM(LlamaForCausalLM):
    layer_cls = Qwen3DecoderLayer
