"""Llama: the model math, written once. Other families subclass and override only what differs."""
from dataclasses import dataclass

import torch
from torch import nn

from ironlm.errors import ModelLoadError
from ironlm.layers.activation import SiluAndMul
from ironlm.layers.attention import AttentionMetadata, PagedAttention
from ironlm.layers.module import Module
from ironlm.layers.norm import RMSNorm
from ironlm.layers.rotary import RotaryEmbedding
from ironlm.quant import QuantLinear


@dataclass
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    sliding_window: int | None

    @classmethod
    def from_hf(cls, config: dict) -> "ModelArgs":
        def need(key: str):
            if key not in config:
                raise ModelLoadError(f"config is missing {key!r}; the model's config.json must define it")
            return config[key]

        heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        rope_params = config.get("rope_parameters") or {}
        return cls(
            model_type=config.get("model_type", "llama"),
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(config.get("rope_theta") or rope_params.get("rope_theta") or 10000.0),
            rope_scaling=config.get("rope_scaling") or _scaling_from_parameters(rope_params),
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
            sliding_window=config.get("sliding_window") if config.get("use_sliding_window", True) else None,
        )


def _scaling_from_parameters(rope_params: dict) -> dict | None:
    # transformers 5 moved rope settings into rope_parameters; "default" means no scaling.
    if rope_params.get("rope_type", "default") == "default":
        return None
    return rope_params


class LlamaAttention(Module):
    def __init__(self, args: ModelArgs, rotary: RotaryEmbedding):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(args.hidden_size, self.q_size + 2 * self.kv_size, bias=self.qkv_bias(args))
        self.o_proj = nn.Linear(self.q_size, args.hidden_size, bias=args.attention_bias)
        self.rotary = rotary
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, self.sliding_window(args))

    @staticmethod
    def qkv_bias(args: ModelArgs) -> bool:
        return args.attention_bias

    @staticmethod
    def sliding_window(args: ModelArgs) -> int | None:
        return None

    def qk_norm(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # x: (T, hidden)
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x).view(num_tokens, -1, self.head_dim)  # (T, H + 2 KVH, D)
        # split_with_sizes, not Tensor.split: it skips split's Python wrapper, which runs every layer of every step
        q, k, v = qkv.split_with_sizes([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)  # (T, H, D), (T, KVH, D) x 2
        q, k = self.qk_norm(q, k)
        q, k = self.rotary(positions, q, k)
        out = self.attn(q, k, v, meta)  # (T, H, D)
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class LlamaMLP(Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))  # (T, hidden)


class LlamaDecoderLayer(Module):
    attention_cls = LlamaAttention

    def __init__(self, args: ModelArgs, rotary: RotaryEmbedding):
        super().__init__()
        self.self_attn = self.attention_cls(args, rotary)
        self.mlp = LlamaMLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm.add_forward(x, residual)
        x = self.self_attn(x, positions, meta)
        x, residual = self.post_attention_layernorm.add_forward(x, residual)
        return self.mlp(x), residual


class LlamaModel(Module):
    def __init__(self, args: ModelArgs, layer_cls: type[LlamaDecoderLayer], freq_factors: torch.Tensor | None):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        # One rotary table shared by every layer (not a parameter: recomputed, never loaded).
        rotary = RotaryEmbedding(args.head_dim, args.max_position_embeddings, args.rope_theta, args.rope_scaling,
                                 freq_factors)
        self.layers = nn.ModuleList(layer_cls(args, rotary) for _ in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.forward_embedded(self.embed_tokens(input_ids), positions, meta)

    def forward_embedded(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The layers and the final norm over embedded tokens x (T, hidden): what a decode graph records."""
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, meta)
        x, _ = self.norm.add_forward(x, residual)
        return x


class LlamaForCausalLM(Module):
    layer_cls = LlamaDecoderLayer
    # Checkpoint name -> (our fused module, shard index): the loader concatenates shards in this order.
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, args: ModelArgs, freq_factors: torch.Tensor | None = None):
        super().__init__()
        self.args = args
        self.model = LlamaModel(args, self.layer_cls, freq_factors)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)  # (T, hidden)

    def forward_embedded(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model.forward_embedded(x, positions, meta)  # (T, hidden)

    def embedding(self) -> torch.Tensor:
        return self.model.embed_tokens.weight  # (V, hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> (N, V) float32 logits. A packed lm_head writes float32 itself, which saves a
        conversion of the (N, 49k) result and keeps the logits unrounded."""
        if isinstance(self.lm_head, QuantLinear):
            return self.lm_head(hidden, out_dtype=torch.float32)
        return self.lm_head(hidden).float()

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]
