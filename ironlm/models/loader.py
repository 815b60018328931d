"""Build a model from a Checkpoint: fuse projections by the packing map, keep unfused weights zero-copy."""
import torch
from torch import nn

from ironlm.errors import ModelLoadError
from ironlm.formats.checkpoint import Checkpoint
from ironlm.models import get_model_class
from ironlm.models.llama import LlamaForCausalLM, ModelArgs

# Tensors some checkpoints carry that are not parameters of ours.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_model(checkpoint: Checkpoint, dtype: torch.dtype, max_model_len: int | None = None) -> LlamaForCausalLM:
    model_cls = get_model_class(checkpoint.config)
    args = ModelArgs.from_hf(checkpoint.config)
    if max_model_len is not None:
        args.max_position_embeddings = max_model_len  # the rotary table need not exceed what we serve
    freq_factors = checkpoint.tensors["rope_freqs"].tensor(torch.float32) if "rope_freqs" in checkpoint.tensors else None
    with torch.device("meta"):
        model = model_cls(args, freq_factors)
    _load_weights(model, checkpoint, dtype)
    model.eval()
    return model


def _load_weights(model: LlamaForCausalLM, checkpoint: Checkpoint, dtype: torch.dtype) -> None:
    shards: dict[str, dict[int, torch.Tensor]] = {}
    for name, source in checkpoint.tensors.items():
        if name == "rope_freqs" or name.endswith(IGNORED_SUFFIXES):
            continue
        target, shard = _target_name(model, name)
        tensor = source.tensor(dtype)
        if shard is None:
            _set_parameter(model, target, tensor, checkpoint)
        else:
            shards.setdefault(target, {})[shard] = tensor
    for target, pieces in shards.items():
        expected = 3 if ".qkv_proj." in target else 2
        if sorted(pieces) != list(range(expected)):
            raise ModelLoadError(f"{checkpoint.path}: {target} is missing some of its parts (have shards {sorted(pieces)})")
        _set_parameter(model, target, torch.cat([pieces[i] for i in range(expected)], dim=0), checkpoint)
    if model.args.tie_word_embeddings and model.lm_head.weight.is_meta:
        model.lm_head.weight = model.model.embed_tokens.weight
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ModelLoadError(
            f"{checkpoint.path}: the checkpoint lacks {len(missing)} weight(s) the model needs, e.g. {missing[0]}"
        )


def _target_name(model: LlamaForCausalLM, name: str) -> tuple[str, int | None]:
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] in model.packed_modules_mapping:
        fused, shard = model.packed_modules_mapping[parts[-2]]
        return ".".join(parts[:-2] + [fused, parts[-1]]), shard
    return name, None


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor, checkpoint: Checkpoint) -> None:
    module_name, _, param_name = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise ModelLoadError(f"{checkpoint.path}: unexpected tensor {name!r}; is this the right model_type?") from None
    current = getattr(module, param_name, None)
    if not isinstance(current, nn.Parameter):
        raise ModelLoadError(f"{checkpoint.path}: unexpected tensor {name!r}; is this the right model_type?")
    if tuple(current.shape) != tuple(tensor.shape):
        raise ModelLoadError(
            f"{checkpoint.path}: tensor {name!r} has shape {tuple(tensor.shape)}, the config implies {tuple(current.shape)}"
        )
    setattr(module, param_name, nn.Parameter(tensor, requires_grad=False))
