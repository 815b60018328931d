"""`ironlm convert`: write a model with its linear weights packed for ironlm's kernels (safetensors + config).

The result is a Hugging Face-style directory: config.json (with quantization_config {"quant_method": "ironlm"}),
model.safetensors, tokenizer.json and tokenizer_config.json. Packed weights load as zero-copy views of the
memory-mapped file, so loading costs little more than reading the pages that are used.
"""
import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from ironlm.errors import IronlmError
from ironlm.formats import default_model_path, load_checkpoint
from ironlm.models.loader import PACKED_SUFFIX, load_model
from ironlm.quant import FORMATS, QuantLinear


def convert(model_path: str | None, fmt: str, out_dir: str | Path) -> Path:
    """Loads a model, packs every linear layer in `fmt` (GGUF blocks of that format are kept bit-exact), writes it."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise IronlmError(f"{out} exists and is not empty; choose a new directory")
    checkpoint = load_checkpoint(model_path if model_path is not None else default_model_path())
    model = load_model(checkpoint, torch.bfloat16, quant=fmt)
    tensors: dict[str, torch.Tensor] = {}
    exceptions: dict[str, str] = {}  # layers kept in another format (the lm_head of a 4-bit model)
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            tensors[f"{name}.{PACKED_SUFFIX}"] = module.packed
            if module.fmt != fmt:
                exceptions[name] = module.fmt
            if module.bias is not None:
                tensors[f"{name}.bias"] = module.bias
    for name, param in model.named_parameters():
        tensors.setdefault(name, param.detach())
    config = dict(checkpoint.config)
    config["tie_word_embeddings"] = False  # the lm_head is packed on its own
    config["quantization_config"] = {"quant_method": "ironlm", "format": fmt, "module_formats": exceptions,
                                     "version": 1}
    config.setdefault("torch_dtype", "bfloat16")
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt", "producer": "ironlm convert"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    checkpoint.tokenizer.save(out)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="HF directory or .gguf file (default: the embedded model)")
    parser.add_argument("--to", required=True, choices=FORMATS, help="weight format of the linear layers")
    parser.add_argument("-o", "--output", required=True, help="new directory to write")


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    out = convert(args.model, args.to, args.output)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.1f} MB, {args.to}) in {time.perf_counter() - start:.1f} s; "
          f"run it with: ironlm generate -m {out} \"Hello\"")
    return 0
