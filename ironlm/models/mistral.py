"""Mistral: Llama with an optional sliding attention window."""
from ironlm.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, ModelArgs


class MistralAttention(LlamaAttention):
    @staticmethod
    def sliding_window(args: ModelArgs) -> int | None:
        return args.sliding_window


class MistralDecoderLayer(LlamaDecoderLayer):
    attention_cls = MistralAttention


class MistralForCausalLM(LlamaForCausalLM):
    layer_cls = MistralDecoderLayer
