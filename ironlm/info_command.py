"""`ironlm info [-m MODEL]`: what this machine offers, what ironlm will use, and (with a model) what the model is."""
import argparse
import json
import os
from collections import Counter

from rich.console import Console
from rich.table import Table

from ironlm.errors import IronlmError

# (feature key from ironlm._kernels.cpu_features(), label)
FEATURE_LABELS = [
    ("avx2", "AVX2 + FMA"),
    ("f16c", "F16C"),
    ("avx512f", "AVX-512 F"),
    ("avx512bw", "AVX-512 BW"),
    ("avx512vl", "AVX-512 VL"),
    ("avx512dq", "AVX-512 DQ"),
    ("avx512_vnni", "AVX512-VNNI"),
    ("avx512_bf16", "AVX512-BF16"),
    ("avx_vnni", "AVX-VNNI"),
    ("amx_tile", "AMX tile"),
    ("amx_int8", "AMX int8"),
    ("amx_bf16", "AMX bf16"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", help="model to describe: HF directory or .gguf (default: the embedded model)")
    parser.add_argument("--no-model", action="store_true", help="describe the machine only")
    parser.add_argument("--json", action="store_true", help="print the facts as JSON")


def decode_prefetch() -> str:
    """Where the memory-bound kernels (decode GEMMs, decode attention) prefetch, and why."""
    from ironlm import _kernels

    l2 = _kernels.prefetch_into_l2()
    if os.environ.get("IRONLM_PREFETCH") in ("l1", "l2"):
        why = "set by IRONLM_PREFETCH"
    else:
        why = "the default on AMD CPUs" if l2 else "the default on CPUs other than AMD's"
    if not l2:
        where = "into L1"
    elif _kernels.active_isa()[0] in ("scalar", "avx2", "avx_vnni"):
        where = "into L2 for decode attention; this level's GEMMs keep L1"  # gemm_avx2.cpp: L2 measured slower
    else:
        where = "into L2"
    return f"{where} ({why}; IRONLM_PREFETCH=l1|l2 to change)"


def machine_facts() -> dict:
    """Everything `ironlm info` reports about the machine, JSON-ready; absent facts are None."""
    from ironlm.config import kv_cache_dtype_for
    from ironlm.hardware import available_cores, cpu_info, default_dtype, default_threads
    from ironlm.quant import kernel_report

    info = cpu_info()
    amx = {k: info.features.get(k) for k in ("amx_tile", "amx_int8", "amx_bf16")}
    return {
        "cpu_model": info.model_name,
        "physical_cores": info.physical_cores,
        "logical_cpus": info.logical_cpus,
        "machine_logical_cpus": info.total_logical_cpus,
        "cpu_quota_cpus": info.cpu_quota,
        "usable_cores": available_cores(info),
        "features": {key: bool(info.features.get(key)) for key, _ in FEATURE_LABELS},
        "amx_os_enabled": info.features.get("amx_os_enabled") if any(amx.values()) else None,
        "amx_permitted": info.features.get("amx_permitted") if any(amx.values()) else None,
        "memory_bytes": info.memory_bytes,
        "numa_nodes": info.numa_nodes,
        "numa_nodes_spanned": info.numa_nodes_spanned,
        "active_isa": info.active_isa,
        "isa_reason": info.isa_reason,
        "gemm_kernels": kernel_report(),  # weight format -> the instructions its GEMM uses here
        "decode_prefetch": decode_prefetch(),
        "default_threads": default_threads(),
        "default_dtype": default_dtype(info),
        "default_kv_cache_dtype": kv_cache_dtype_for("auto", None),
    }


def model_facts(path: str | None) -> dict:
    """Architecture, sizes and storage of a checkpoint (read from its header; weights are not materialised)."""
    import torch

    from ironlm.engine.kv_cache import kv_bytes_per_block
    from ironlm.formats import default_model_path, load_checkpoint
    from ironlm.hardware import default_kv_cache_bytes
    from ironlm.models.llama import ModelArgs
    kv_dtypes = (("bfloat16", torch.bfloat16), ("int8", torch.int8))

    ckpt = load_checkpoint(path if path else default_model_path())
    c = ckpt.config
    heads = c.get("num_attention_heads")
    tensors = {n: t for n, t in ckpt.tensors.items() if n != "rope_freqs"}
    params = 0
    for t in tensors.values():
        n = 1
        for d in t.shape:
            n *= d
        params += n
    by_dtype = Counter(t.dtype for t in tensors.values())
    bytes_by_dtype = Counter()
    for t in tensors.values():
        bytes_by_dtype[t.dtype] += t.nbytes
    weight_bytes = sum(bytes_by_dtype.values())
    try:
        args = ModelArgs.from_hf(c)
    except IronlmError:  # a config the engine would refuse too: no K/V figures
        args = None
    return {
        "name": ckpt.name,
        "path": str(ckpt.path),
        "format": ckpt.format,
        "model_type": c.get("model_type"),
        "num_hidden_layers": c.get("num_hidden_layers"),
        "hidden_size": c.get("hidden_size"),
        "intermediate_size": c.get("intermediate_size"),
        "num_attention_heads": heads,
        "num_key_value_heads": c.get("num_key_value_heads") or heads,
        "head_dim": c.get("head_dim") or (c["hidden_size"] // heads if heads and c.get("hidden_size") else None),
        "max_position_embeddings": c.get("max_position_embeddings"),
        "vocab_size": c.get("vocab_size"),
        "tie_word_embeddings": bool(c.get("tie_word_embeddings", False)),
        "num_params": params,
        "num_tensors": len(tensors),
        "tensors_by_dtype": dict(by_dtype.most_common()),
        "bytes_by_dtype": dict(bytes_by_dtype.most_common()),
        "weight_bytes": weight_bytes,
        "file_bytes": ckpt.path.stat().st_size if ckpt.path.is_file() else None,
        # What a token's K and V rows take in every layer, as bf16 and as int8 rows with their scales.
        "kv_bytes_per_token": None if args is None else {
            name: kv_bytes_per_block(args, 1, dtype) for name, dtype in kv_dtypes},
        "default_kv_cache_bytes": default_kv_cache_bytes(weight_bytes),
        "chat_template": ckpt.tokenizer.chat_template is not None,
        "tools": _tool_support(ckpt.tokenizer),
    }


def _tool_support(tokenizer) -> str | None:
    from ironlm.tools import template_tools

    if tokenizer.chat_template is None:
        return None
    native, style = template_tools(tokenizer)
    return (f"the chat template renders them; calls in the {style} shape" if native
            else f"ironlm's tool prompt; calls in the {style} shape")


def _gib(n: int | None) -> str:
    return "not detected" if n is None else f"{n / 2**30:.1f} GiB"


def _yes(v: bool | None) -> str:
    return "[green]yes[/green]" if v else "no"


def _numa(machine: dict) -> str:
    nodes, spanned = machine["numa_nodes"], machine.get("numa_nodes_spanned")
    if not nodes:
        return "not detected"
    if not spanned or spanned < 2:
        return str(nodes)
    # Threads of one process on several nodes read weights across the sockets' link; one process a node reads
    # local memory (README: "Servers with several sockets").
    return (f"{nodes}; this process's CPUs span {spanned}: for bulk jobs run one process per node, e.g. "
            f"numactl --cpunodebind=K --membind=K ironlm batch IN --shard K/{spanned} -o OUT.K")


def print_facts(machine: dict, model: dict | None, console: Console | None = None) -> None:
    console = console or Console()
    t = Table(title="Machine", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("CPU", machine["cpu_model"] or "not detected")
    cores = f"{machine['physical_cores']} physical / {machine['logical_cpus']} logical (available to this process)"
    if machine["machine_logical_cpus"] and machine["machine_logical_cpus"] != machine["logical_cpus"]:
        cores += f"; {machine['machine_logical_cpus']} logical in the machine"
    if machine["cpu_quota_cpus"] is not None:
        cores += f"; cgroup quota {machine['cpu_quota_cpus']:g} CPUs"
    t.add_row("Cores", cores)
    for key, label in FEATURE_LABELS:
        t.add_row(label, _yes(machine["features"][key]))
    if machine["amx_permitted"] is not None:
        t.add_row("AMX enabled by the OS", _yes(machine["amx_os_enabled"] and machine["amx_permitted"]))
    t.add_row("Memory", _gib(machine["memory_bytes"]))
    t.add_row("NUMA nodes", _numa(machine))
    t.add_row("Kernel ISA", f"{machine['active_isa'] or 'none'} ({machine['isa_reason']})")
    kernels = machine["gemm_kernels"]
    t.add_row("GEMM, bf16 weights", kernels["bf16"])
    t.add_row("GEMM, int8/int4", kernels["int4"])
    t.add_row("Decode prefetch", machine["decode_prefetch"])
    t.add_row("Default threads", f"{machine['default_threads']} (IRONLM_THREADS or --threads to change)")
    t.add_row("Default dtype", machine["default_dtype"])
    t.add_row("Default KV cache", f"{machine['default_kv_cache_dtype']} (float32 with --dtype float32)")
    console.print(t)
    if model is None:
        return
    t = Table(title=f"Model: {model['name']}", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("Path", f"{model['path']} ({model['format']})")
    t.add_row("Architecture", str(model["model_type"]))
    t.add_row("Layers / hidden / intermediate", f"{model['num_hidden_layers']} / {model['hidden_size']} / "
                                                f"{model['intermediate_size']}")
    t.add_row("Heads / KV heads / head dim", f"{model['num_attention_heads']} / {model['num_key_value_heads']} / "
                                             f"{model['head_dim']}")
    t.add_row("Context", str(model["max_position_embeddings"]))
    t.add_row("Vocabulary", f"{model['vocab_size']} ({'tied' if model['tie_word_embeddings'] else 'untied'} embeddings)")
    t.add_row("Parameters", f"{model['num_params']:,}")
    t.add_row("Storage", ", ".join(f"{d}: {n} tensors, {model['bytes_by_dtype'][d] / 2**20:,.1f} MiB"
                                   for d, n in model["tensors_by_dtype"].items()))
    t.add_row("Weight bytes", f"{model['weight_bytes']:,} ({model['weight_bytes'] / 2**20:,.1f} MiB)")
    kv, per_token = model["default_kv_cache_bytes"], model["kv_bytes_per_token"]
    if per_token:
        t.add_row("KV cache", f"up to {_gib(kv)} by default now (half the available memory less the weights; "
                              f"--kv-cache-memory to change): {kv // per_token['bfloat16']:,} tokens in bf16, "
                              f"{kv // per_token['int8']:,} in int8")
    t.add_row("Chat template", "yes" if model["chat_template"] else
              "none: send plain prompts (/v1/completions), or give one with --chat-template")
    if model["tools"]:
        t.add_row("Tools", model["tools"])
    console.print(t)


def run(args: argparse.Namespace) -> int:
    machine = machine_facts()
    model, note = None, None
    if args.model:
        model = model_facts(args.model)  # a model the user named must load: errors go to the CLI
    elif not args.no_model:
        try:
            model = model_facts(None)
        except IronlmError as e:
            note = f"no model described: {e}"
    if args.json:
        print(json.dumps({"machine": machine, "model": model, "note": note}, indent=2))
    else:
        print_facts(machine, model)
        if note:
            Console().print(note)
    return 0
