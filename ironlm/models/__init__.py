"""Model families by Hugging Face model_type."""
from ironlm.errors import ModelLoadError
from ironlm.models.llama import LlamaForCausalLM
from ironlm.models.mistral import MistralForCausalLM
from ironlm.models.qwen2 import Qwen2ForCausalLM
from ironlm.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[LlamaForCausalLM]] = {
    "llama": LlamaForCausalLM,
    "mistral": MistralForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
}


def get_model_class(config: dict) -> type[LlamaForCausalLM]:
    model_type = config.get("model_type")
    if model_type not in MODEL_REGISTRY:
        raise ModelLoadError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(MODEL_REGISTRY))}"
        )
    return MODEL_REGISTRY[model_type]
