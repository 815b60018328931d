"""Build a model from a Checkpoint: fuse projections by the packing map, keep unfused weights zero-copy, and
give every linear layer its weight format (GGUF blocks kept as they are, or quantized once here)."""
import numpy as np
import torch
from torch import nn

from ironlm.errors import ModelLoadError
from ironlm.formats.checkpoint import Checkpoint, WeightSource
from ironlm.models import get_model_class
from ironlm.models.llama import LlamaForCausalLM, ModelArgs
from ironlm.quant import FORMATS, QuantLinear, bf16_rounds_activations
from ironlm.quant.formats import GGUF_FORMATS
from ironlm.quant.kquants import KQUANT_TARGETS

# Tensors some checkpoints carry that are not parameters of ours.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
DENSE_TYPES = ("F32", "F16", "BF16")
PACKED_SUFFIX = "packed"  # a converted model's QuantLinear bytes, beside the HF names


def stored_quantization(config: dict) -> dict | None:
    """The quantization_config that `ironlm convert` writes: {"quant_method": "ironlm", "format": ...}."""
    qc = config.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == "ironlm":
        formats = [qc.get("format"), *dict(qc.get("module_formats") or {}).values()]
        if any(f not in FORMATS for f in formats):
            raise ModelLoadError(f"quantization_config formats {formats} must each be one of {', '.join(FORMATS)}; "
                                 f"convert the model again")
        return qc
    return None


def load_model(checkpoint: Checkpoint, dtype: torch.dtype, max_model_len: int | None = None,
               quant: str = "auto") -> LlamaForCausalLM:
    model_cls = get_model_class(checkpoint.config)
    args = ModelArgs.from_hf(checkpoint.config)
    if max_model_len is not None:
        args.max_position_embeddings = max_model_len  # the rotary table need not exceed what we serve
    freq_factors = checkpoint.tensors["rope_freqs"].tensor(torch.float32) if "rope_freqs" in checkpoint.tensors else None
    with torch.device("meta"):
        model = model_cls(args, freq_factors)
    stored = stored_quantization(checkpoint.config)
    if stored and quant not in ("auto", stored["format"]):
        raise ModelLoadError(f"{checkpoint.path} is already converted to {stored['format']}; load it with --quant auto, "
                             f"or convert the original model to {quant}")
    groups = _group_sources(model, checkpoint)
    linears = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    if stored:
        quant = stored["format"]
    elif quant == "auto":
        quant = _auto_quant(groups, dtype, linears)
    for target, pieces in groups.items():
        module_name, _, param_name = target.rpartition(".")
        if quant != "none" and module_name in linears and param_name in ("weight", PACKED_SUFFIX):
            continue  # built below as a QuantLinear
        _set_parameter(model, target, _dense(pieces, dtype), checkpoint)
    if quant != "none":
        if args.tie_word_embeddings and "lm_head.weight" not in groups:
            groups["lm_head.weight"] = groups.get("model.embed_tokens.weight", {})
        for module_name in sorted(linears):
            dense = model.get_submodule(module_name)
            bias = None if dense.bias is None or dense.bias.is_meta else dense.bias
            if stored:  # packed by `ironlm convert`: a zero-copy view of the file
                packed = groups.pop(f"{module_name}.{PACKED_SUFFIX}", None)
                if packed is not None:
                    fmt = stored.get("module_formats", {}).get(module_name, quant)
                    model.set_submodule(module_name, QuantLinear(packed[0].tensor(torch.uint8), fmt,
                                                                 dense.in_features, dense.out_features, bias))
                continue
            pieces = groups.get(f"{module_name}.weight")
            if pieces:
                # 4-bit logits cost far more accuracy than 4-bit layers; like llama.cpp, keep the head at 8 bits.
                fmt = "int8" if module_name == "lm_head" and quant in ("int4", "int4_sym") else quant
                model.set_submodule(module_name, _quant_linear(pieces, bias, fmt))
    elif args.tie_word_embeddings and model.lm_head.weight.is_meta:
        model.lm_head.weight = model.model.embed_tokens.weight
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ModelLoadError(
            f"{checkpoint.path}: the checkpoint lacks {len(missing)} weight(s) the model needs, e.g. {missing[0]}"
        )
    if quant != "none":
        checkpoint.release_pages()  # the linears were copied into packed tiles; only small tensors still map the file
    model.eval()
    return model


def _auto_quant(groups: dict[str, dict[int, WeightSource]], dtype: torch.dtype, linears: set[str]) -> str:
    """Quantized files keep their blocks. Dense weights run in bf16 on our kernels when the compute dtype is bf16,
    or when every matmul weight is stored in bf16 and the kernel multiplies float32 activations (widening bf16 is
    exact, and reads half the bytes of float32); otherwise on torch's float32 matmul (the exact reference path)."""
    if any(s.dtype not in DENSE_TYPES for pieces in groups.values() for s in pieces.values()):
        return "auto"
    if dtype == torch.bfloat16:
        return "bf16"
    matmul = [s for target, pieces in groups.items() if target.rpartition(".")[0] in linears for s in pieces.values()]
    if matmul and all(s.dtype == "BF16" for s in matmul) and not bf16_rounds_activations():
        return "bf16"
    return "none"


def _group_sources(model: LlamaForCausalLM, checkpoint: Checkpoint) -> dict[str, dict[int, WeightSource]]:
    """Our parameter name -> {shard index: source}; unfused parameters have the single shard 0."""
    groups: dict[str, dict[int, WeightSource]] = {}
    for name, source in checkpoint.tensors.items():
        if name == "rope_freqs" or name.endswith(IGNORED_SUFFIXES):
            continue
        target, shard = _target_name(model, name)
        groups.setdefault(target, {})[shard] = source
    for target, pieces in groups.items():
        expected = _num_shards(model, target)
        if sorted(pieces) != list(range(expected)):
            raise ModelLoadError(f"{checkpoint.path}: {target} is missing some of its parts (have {sorted(pieces)})")
    return groups


def _num_shards(model: LlamaForCausalLM, target: str) -> int:
    if target.endswith(f".{PACKED_SUFFIX}"):
        return 1  # fused and packed already
    module = target.rpartition(".")[0].rpartition(".")[2]
    return 1 + max((shard for fused, shard in model.packed_modules_mapping.values() if fused == module), default=0)


def _target_name(model: LlamaForCausalLM, name: str) -> tuple[str, int]:
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] in model.packed_modules_mapping:
        fused, shard = model.packed_modules_mapping[parts[-2]]
        return ".".join(parts[:-2] + [fused, parts[-1]]), shard
    return name, 0


def _dense(pieces: dict[int, WeightSource], dtype: torch.dtype) -> torch.Tensor:
    if len(pieces) == 1:
        return pieces[0].tensor(dtype)  # zero-copy when the file already holds this dtype
    return torch.cat([pieces[i].tensor(dtype) for i in range(len(pieces))], dim=0)


def _quant_linear(pieces: dict[int, WeightSource], bias: torch.Tensor | None, quant: str) -> QuantLinear:
    sources = [pieces[i] for i in range(len(pieces))]
    kinds = {s.dtype for s in sources}
    num_rows = sum(s.shape[0] for s in sources)
    shape = (num_rows, sources[0].shape[1])
    native = kinds <= GGUF_FORMATS.keys() or kinds <= KQUANT_TARGETS.keys()
    if len(kinds) == 1 and native and quant in ("auto", GGUF_FORMATS.get(next(iter(kinds)))):
        # Fused rows of GGML blocks are just their rows stacked: no dequantizing, no requantizing.
        raw = np.concatenate([s.raw() for s in sources], axis=0) if len(sources) > 1 else sources[0].raw()
        return QuantLinear.from_gguf(raw, next(iter(kinds)), shape, bias)
    fmt = quant if quant != "auto" else "int8"  # auto reaches here only for GGML types without a native kernel
    return QuantLinear.from_dense(_dense(pieces, torch.float32), bias, fmt)


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
