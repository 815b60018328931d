"""Qwen2: Llama with biases on the q/k/v projections (not on o_proj)."""
from ironlm.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, ModelArgs


class Qwen2Attention(LlamaAttention):
    @staticmethod
    def qkv_bias(args: ModelArgs) -> bool:
        return True


class Qwen2DecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen2Attention


class Qwen2ForCausalLM(LlamaForCausalLM):
    layer_cls = Qwen2DecoderLayer
