"""Hugging Face `transformers` GPT-2 export and import of megalm checkpoints.

megalm's GPT (learned positions, pre-LayerNorm, tanh GeLU, tied output layer, biases everywhere) is
GPT-2's architecture. What differs is the weights' layout:

- megalm's fused QKV weight is [3h, h] with rows ordered (head, q|k|v, head_dim) so that a tp split
  hands each rank whole heads; GPT-2's c_attn is a Conv1D whose weight is [h, 3h] (in, out), its
  output columns ordered (q|k|v, head, head_dim). The bias follows its columns.
- every other linear (attention output, MLP in and out) is transposed: Conv1D weights are [in, out].
- megalm pads its embedding to a multiple of make_vocab_size_divisible_by x tp rows; GPT-2 has the
  tokenizer's vocabulary. Export drops the padded rows, import adds them back (zeros: no token id
  reaches them, and the loss masks their logits).
- rotary position embeddings have no GPT-2 equivalent: such a checkpoint is refused.

`export_gpt2` streams: it reads one full tensor at a time from the sharded checkpoint (its tp
shards and dp pieces put together from memory-mapped rank files), converts it and writes it into
model.safetensors at offsets announced up front (megalm.interop.safetensors_stream), so its memory
is two to three times the largest tensor (the tensor, its reordered copy, the contiguous bytes
written) whatever the model's size. `import_gpt2` writes a megalm run
directory with a checkpoint at step 0 (layout 1 x 1 x 1, no optimizer state) that `megalm train`
resumes, or that `train.init_from` fine-tunes, at any layout; it holds the whole model in memory.
It reads a transformers GPT-2 directory, or the file `megalm convert` writes.

PrefixLM: the weights are the same model; GPT-2 in transformers is causal unless it is given a
[b, 1, s, s] boolean attention_mask, True where query i may see key j. megalm's PrefixLM mask is
`j <= i or j < prefix_length` (megalm.model.gpt.prefix_attention_mask builds it); passed as
attention_mask, transformers' GPT-2 gives megalm's PrefixLM logits. config.json records the family
under "megalm".
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch

import megalm
from megalm.checkpoint.state import PieceIndex
from megalm.checkpoint.store import CheckpointStore
from megalm.checkpoint.weights import find_checkpoint
from megalm.config import Config, ModelConfig, config_from_dict, config_to_dict, config_to_yaml
from megalm.interop import InteropError
from megalm.interop.hf_tokenizer import MEGALM_TOKENIZER, write_hf_tokenizer
from megalm.interop.safetensors_stream import StreamingSafetensorsWriter
from megalm.model.gpt import PARAM_DTYPES, build_model

WEIGHTS_FILE = "model.safetensors"
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# ---- the name and layout mapping ------------------------------------------------------------------------
def tensor_plan(cfg: ModelConfig) -> list[tuple[str, str, str, tuple[int, ...]]]:
    """(GPT-2 name, megalm name, conversion, GPT-2 shape) of every tensor, in file order."""
    h, ffn = cfg.hidden_size, cfg.ffn_size()
    plan = [("transformer.wte.weight", "embedding.word.weight", "vocab", (cfg.vocab_size, h)),
            ("transformer.wpe.weight", "embedding.position", "copy", (cfg.max_positions(), h))]
    for i in range(cfg.num_layers):
        ours, theirs = f"layers.{i}.", f"transformer.h.{i}."
        plan += [(f"{theirs}ln_1.weight", f"{ours}ln1.weight", "copy", (h,)),
                 (f"{theirs}ln_1.bias", f"{ours}ln1.bias", "copy", (h,)),
                 (f"{theirs}attn.c_attn.weight", f"{ours}attn.qkv.weight", "qkv", (h, 3 * h)),
                 (f"{theirs}attn.c_attn.bias", f"{ours}attn.qkv.bias", "qkv", (3 * h,)),
                 (f"{theirs}attn.c_proj.weight", f"{ours}attn.proj.weight", "transpose", (h, h)),
                 (f"{theirs}attn.c_proj.bias", f"{ours}attn.proj.bias", "copy", (h,)),
                 (f"{theirs}ln_2.weight", f"{ours}ln2.weight", "copy", (h,)),
                 (f"{theirs}ln_2.bias", f"{ours}ln2.bias", "copy", (h,)),
                 (f"{theirs}mlp.c_fc.weight", f"{ours}mlp.fc1.weight", "transpose", (h, ffn)),
                 (f"{theirs}mlp.c_fc.bias", f"{ours}mlp.fc1.bias", "copy", (ffn,)),
                 (f"{theirs}mlp.c_proj.weight", f"{ours}mlp.fc2.weight", "transpose", (ffn, h)),
                 (f"{theirs}mlp.c_proj.bias", f"{ours}mlp.fc2.bias", "copy", (h,))]
    plan += [("transformer.ln_f.weight", "final_norm.weight", "copy", (h,)),
             ("transformer.ln_f.bias", "final_norm.bias", "copy", (h,))]
    return plan


def to_gpt2(conversion: str, tensor: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """A full megalm tensor in GPT-2's layout (see the module docstring)."""
    if conversion == "vocab":
        return tensor[: cfg.vocab_size]
    if conversion == "transpose":
        return tensor.t()
    if conversion == "qkv":  # rows (head, q|k|v, d) -> (q|k|v, head, d); the weight then as [in, out]
        heads, head_dim = cfg.num_heads, cfg.head_size()
        grouped = tensor.view(heads, 3, head_dim, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape)
        return grouped.t() if tensor.dim() == 2 else grouped
    return tensor


def from_gpt2(conversion: str, tensor: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """The inverse of `to_gpt2`: a GPT-2 tensor as megalm's full tensor (vocabulary padded at tp 1)."""
    if conversion == "vocab":
        padded = torch.zeros((cfg.padded_vocab_size(1), *tensor.shape[1:]), dtype=tensor.dtype)
        padded[: tensor.shape[0]] = tensor
        return padded
    if conversion == "transpose":
        return tensor.t().contiguous()
    if conversion == "qkv":
        heads, head_dim = cfg.num_heads, cfg.head_size()
        rows = tensor.t() if tensor.dim() == 2 else tensor  # [3h, h] or [3h], rows (q|k|v, head, d)
        return rows.reshape(3, heads, head_dim, *rows.shape[1:]).transpose(0, 1).reshape(rows.shape).contiguous()
    return tensor.contiguous()


def gpt2_differences(cfg: ModelConfig) -> list[str]:
    """What of this model transformers' GPT-2 cannot hold, one phrase each (empty: GPT-2's architecture)."""
    checks = [
        (cfg.position_embedding == "learned", f"model.position_embedding={cfg.position_embedding}: a rotary model "
         f"cannot be exported to transformers' GPT-2 (learned absolute positions only)"),
        (cfg.norm == "layernorm", f"model.norm={cfg.norm} (GPT-2 has LayerNorm)"),
        (cfg.mlp == "gelu", f"model.mlp={cfg.mlp} (GPT-2's MLP is GeLU)"),
        (not cfg.grouped_attention(), f"model.num_kv_heads={cfg.kv_heads()} (GPT-2 has as many key/value heads as "
         f"query heads)"),
        (cfg.head_size() * cfg.num_heads == cfg.hidden_size, f"model.head_dim={cfg.head_dim} (GPT-2's is "
         f"hidden_size / num_heads)"),
        (cfg.bias and cfg.has_qkv_bias(), f"model.bias={cfg.bias}, qkv_bias={cfg.qkv_bias} (GPT-2 has biases on "
         f"every linear layer)"),
        (cfg.tie_embeddings, "model.tie_embeddings=false (GPT-2's output layer is its token embedding)"),
    ]
    return [why for holds, why in checks if not holds]


def check_exportable(cfg: ModelConfig, where: str) -> None:
    """InteropError naming every field GPT-2 cannot hold (see gpt2_differences)."""
    differences = gpt2_differences(cfg)
    if differences:
        raise InteropError(f"{where} is not GPT-2's architecture: {'; '.join(differences)}. A rotary RMSNorm/SwiGLU "
                           f"model exports with --format hf as Llama, Qwen2 or Mistral")


def gpt2_config(config: Config, dtype: torch.dtype, eos_id: Optional[int], pad_id: Optional[int]) -> dict[str, Any]:
    """config.json of transformers' GPT2LMHeadModel for megalm's model (and megalm's own config under "megalm")."""
    cfg = config.model
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.max_positions(), "n_embd": cfg.hidden_size,
        "n_layer": cfg.num_layers, "n_head": cfg.num_heads, "n_inner": cfg.ffn_size(),
        "activation_function": "gelu_new",  # GeLU's tanh approximation, as megalm's MLP
        "layer_norm_epsilon": cfg.norm_eps, "initializer_range": cfg.init_std,
        "resid_pdrop": cfg.hidden_dropout, "embd_pdrop": cfg.hidden_dropout, "attn_pdrop": cfg.attention_dropout,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": None, "eos_token_id": eos_id, "pad_token_id": pad_id,
        "dtype": HF_DTYPE_NAMES[dtype],
        "megalm": {
            "family": cfg.family,
            "attention": ("causal" if cfg.family == "lm" else
                          "prefixlm: pass attention_mask [b, 1, s, s] bool, True where key j <= query i or j < the "
                          "sample's prefix length (megalm.model.gpt.prefix_attention_mask); without it GPT-2 is causal"),
            "model": config_to_dict(config)["model"],  # megalm's own fields, which `megalm import` restores
        },
    }


# ---- export ---------------------------------------------------------------------------------------------
def _checkpoint_tokenizer(metadata: dict[str, Any], given: Optional[str], path: Path):
    """The megalm Tokenizer of the checkpoint (its data.tokenizer, or `given`), checked against its
    hash; None when the checkpoint was trained without one and none is given."""
    from megalm.data.tokenizer import Tokenizer

    saved_hash = metadata.get("tokenizer_hash")
    candidate = given or metadata["config"]["data"].get("tokenizer")
    if candidate is None:
        return None
    if given is None and not Path(candidate).is_file():
        raise InteropError(
            f"{path} was trained with the tokenizer {candidate}, which is not there: pass --tokenizer PATH.model "
            f"(the same sentencepiece model), or --no-tokenizer to export the weights alone"
        )
    tokenizer = Tokenizer.load(candidate)
    if saved_hash and tokenizer.hash != saved_hash:
        raise InteropError(
            f"tokenizer {tokenizer.path} (hash {tokenizer.hash[:12]}) is not the one {path} was trained with "
            f"(hash {saved_hash[:12]}): pass that model with --tokenizer"
        )
    return tokenizer


def export_gpt2(checkpoint: str | Path, out: str | Path, dtype: Optional[str] = None, tokenizer: Optional[str] = None,
                with_tokenizer: bool = True, log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Write a transformers GPT-2 directory for the checkpoint `checkpoint` names (a checkpoint or run
    directory, any layout), tensor by tensor. `dtype`: fp32/bf16/fp16, default the run's precision
    (values from the fp32 masters where the checkpoint has them). Returns a summary."""
    path = find_checkpoint(checkpoint, what="checkpoint")
    metadata = CheckpointStore(path.parent, rank=0).verify(path)
    config = config_from_dict(metadata["config"], source=str(path))
    cfg = config.model
    check_exportable(cfg, str(path))
    target = PARAM_DTYPES[dtype or config.train.precision]
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InteropError(f"export output {out} exists and is not an empty directory: name a new directory")
    source_tokenizer = _checkpoint_tokenizer(metadata, tokenizer, path) if with_tokenizer else None
    if source_tokenizer is not None:
        _require("tokenizers", "writing the tokenizer (tokenizer.json)", "or pass --no-tokenizer to export the weights alone")
    out.mkdir(parents=True, exist_ok=True)
    index = PieceIndex(path, metadata["files"])  # memory-mapped: pieces are read when a tensor is built
    plan = tensor_plan(cfg)
    writer = StreamingSafetensorsWriter(out / WEIGHTS_FILE, [(name, shape, target) for name, _, _, shape in plan])
    try:
        for hf_name, name, conversion, shape in plan:
            # the full tensor lives as long as its view; one contiguous copy is written (the cast's, else the writer's)
            value = to_gpt2(conversion, index.full(name, index.value_kind(name)), cfg)
            if tuple(value.shape) != shape:
                raise InteropError(f"{path}: {name} is {tuple(value.shape)} as GPT-2's {hf_name}, the model config "
                                   f"says {shape}")
            writer.write(hf_name, value.to(target, memory_format=torch.contiguous_format))
            del value
        writer.close()
    except BaseException:
        writer.abort()
        raise
    del index
    eos = pad = None
    files = [WEIGHTS_FILE, "config.json"]
    if source_tokenizer is not None:
        eos, pad = source_tokenizer.eos_id, source_tokenizer.pad_id
        if source_tokenizer.vocab_size != cfg.vocab_size:
            log(f"note: the tokenizer has {source_tokenizer.vocab_size} pieces, the model {cfg.vocab_size} rows")
        files += write_hf_tokenizer(source_tokenizer, out, cfg.max_positions())
    (out / "config.json").write_text(json.dumps(gpt2_config(config, target, eos, pad), indent=2) + "\n")
    return {"checkpoint": path, "step": metadata["step"], "files": files, "tensors": len(plan),
            "parameters": sum(math.prod(shape) for *_, shape in plan), "bytes": (out / WEIGHTS_FILE).stat().st_size,
            "dtype": HF_DTYPE_NAMES[target], "tokenizer": source_tokenizer is not None}


# ---- import ---------------------------------------------------------------------------------------------
_GPT2_REQUIREMENTS = {
    "scale_attn_weights": (True, "attention scores scaled by 1/sqrt(head_dim)"),
    "scale_attn_by_inverse_layer_idx": (False, "no per-layer attention scaling"),
    "add_cross_attention": (False, "no cross-attention"),
    "tie_word_embeddings": (True, "the output layer tied to the token embedding"),
}
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _gpt2_model_config(hf: dict[str, Any], where: Path) -> dict[str, Any]:
    """megalm's model fields from a GPT-2 config.json; InteropError for what megalm's GPT cannot be."""
    if hf.get("model_type") != "gpt2":
        raise InteropError(f"{where}: model_type is {hf.get('model_type')!r}; megalm imports GPT-2 models only")
    if hf.get("activation_function", "gelu_new") not in _TANH_GELU:
        raise InteropError(f"{where}: activation_function {hf.get('activation_function')!r}; megalm's MLP is GeLU "
                           f"with the tanh approximation ({', '.join(_TANH_GELU)})")
    for key, (wanted, meaning) in _GPT2_REQUIREMENTS.items():
        if hf.get(key, wanted) != wanted:
            raise InteropError(f"{where}: {key}={hf[key]}, but megalm's GPT has {meaning} ({key}={wanted})")
    hidden = hf.get("n_embd", 768)
    return {
        "num_layers": hf.get("n_layer", 12), "hidden_size": hidden, "num_heads": hf.get("n_head", 12),
        "ffn_hidden_size": hf.get("n_inner") or 4 * hidden, "vocab_size": hf["vocab_size"],
        "max_position_embeddings": hf.get("n_positions", 1024), "position_embedding": "learned",
        "norm_eps": hf.get("layer_norm_epsilon", 1e-5), "init_std": hf.get("initializer_range", 0.02),
        "hidden_dropout": hf.get("resid_pdrop", 0.1), "attention_dropout": hf.get("attn_pdrop", 0.1),
    }


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / name for name in names]
    if (directory / WEIGHTS_FILE).is_file():
        return [directory / WEIGHTS_FILE]
    raise InteropError(f"{directory} has no {WEIGHTS_FILE} (nor a sharded index): save the model with "
                       f"save_pretrained(..., safe_serialization=True)")


def _require(package: str, purpose: str, alternative: str = "") -> None:
    """InteropError unless the optional `package` (the hf extra) is installed."""
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise InteropError(f"{purpose} needs the {package} package, which is not installed: pip install 'megalm[hf]'"
                           + (f" {alternative}" if alternative else ""))


def _read_gpt2(directory: Path) -> tuple[Config, dict[str, torch.Tensor], Optional[Path]]:
    """(megalm config, megalm-named full tensors, megalm tokenizer file or None) of a GPT-2 directory."""
    _require("safetensors", f"reading {directory}")
    from safetensors import safe_open

    where = directory / "config.json"
    if not where.is_file():
        raise InteropError(f"{directory} has no config.json: give a transformers GPT-2 directory (save_pretrained)")
    hf = json.loads(where.read_text())
    model = _gpt2_model_config(hf, where)
    base = config_to_dict(Config())
    saved = (hf.get("megalm") or {}).get("model")
    if saved:  # exported by megalm: its own model fields, which must agree with GPT-2's
        base["model"].update(saved)
        cfg = config_from_dict(base, source=str(where)).model
        mine = {key: getattr(cfg, key) for key in model} | {"ffn_hidden_size": cfg.ffn_size(),
                                                             "max_position_embeddings": cfg.max_positions()}
        differing = [f"{key}: {mine[key]!r} under 'megalm', {model[key]!r} in GPT-2's fields"
                     for key in model if mine[key] != model[key]]
        if differing:
            raise InteropError(f"{where} contradicts itself ({'; '.join(differing)}): fix or remove its 'megalm' entry")
    else:
        base["model"].update(model, seq_length=model["max_position_embeddings"])
    config = config_from_dict(base, source=str(where))
    tensors: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(directory):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                tensors[key.removeprefix("transformer.")] = handle.get_tensor(key)
    out: dict[str, torch.Tensor] = {}
    for hf_name, name, conversion, shape in tensor_plan(config.model):
        key = hf_name.removeprefix("transformer.")
        if key not in tensors:
            raise InteropError(f"{directory}: tensor {hf_name} is missing from the safetensors file(s)")
        if tuple(tensors[key].shape) != shape:
            raise InteropError(f"{directory}: {hf_name} has shape {tuple(tensors[key].shape)}, config.json says {shape}")
        out[name] = from_gpt2(conversion, tensors.pop(key), config.model)
    head = tensors.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, out["embedding.word.weight"][: config.model.vocab_size]):
        raise InteropError(f"{directory}: lm_head.weight differs from the token embedding; megalm ties them")
    # Older GPT-2 files also hold each layer's causal-mask buffers (attn.bias, attn.masked_bias): not weights.
    unknown = sorted(key for key in tensors if not key.endswith((".attn.bias", ".attn.masked_bias")))
    if unknown:
        raise InteropError(f"{directory}: tensors that megalm's GPT does not have: {', '.join(unknown[:5])}")
    tokenizer = directory / MEGALM_TOKENIZER
    return config, out, tokenizer if tokenizer.is_file() else None


def _read_convert_file(file: Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """(config, megalm-named full tensors, vocabulary padded at tp 1) of a `megalm convert` file."""
    try:
        saved = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - anything unreadable is the same user error
        raise InteropError(f"{file} is not a file written by `megalm convert`: {str(error).splitlines()[0][:200]}")
    if not isinstance(saved, dict) or not {"config", "state_dict"} <= set(saved):
        raise InteropError(f"{file} is not a file written by `megalm convert` (no config and state_dict)")
    config = config_from_dict(saved["config"], source=str(file))
    state = dict(saved["state_dict"])
    word = state["embedding.word.weight"]
    state["embedding.word.weight"] = from_gpt2("vocab", word, config.model)
    return config, state


def import_model(source: str | Path, out: str | Path, family: Optional[str] = None) -> dict[str, Any]:
    """A megalm run directory `out` holding a step-0 checkpoint of `source`: a transformers GPT-2
    directory or a `megalm convert` file. `family` overrides the model family (lm / prefixlm)."""
    from megalm.checkpoint import checkpoint_layout
    from megalm.data.tokenizer import Tokenizer
    from megalm.distributed import ParallelGroups
    from megalm.parallel.random import ParallelRNG

    source, out = Path(source), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InteropError(f"import output {out} exists and is not an empty directory: name a new run directory")
    tokenizer_file = None
    if source.is_dir():
        config, state, tokenizer_file = _read_gpt2(source)
    elif source.is_file():
        config, state = _read_convert_file(source)
    else:
        raise InteropError(f"{source} does not exist: give a transformers GPT-2 directory or a `megalm convert` file")
    if family is not None:
        config.model.family = family
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_hash = None
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, out / "tokenizer.model")
        config.data.tokenizer = str((out / "tokenizer.model").resolve())
        tokenizer_hash = Tokenizer.load(out / "tokenizer.model").hash
    elif config.data.tokenizer is not None and Path(config.data.tokenizer).is_file():
        tokenizer_hash = Tokenizer.load(config.data.tokenizer).hash
    dtypes = {tensor.dtype for tensor in state.values()}
    precisions = {dtype: name for name, dtype in PARAM_DTYPES.items()}
    precision = precisions.get(next(iter(dtypes))) if len(dtypes) == 1 else None
    if precision is None:
        names = sorted(str(dtype).removeprefix("torch.") for dtype in dtypes)
        raise InteropError(f"{source}: tensors of dtype {', '.join(names)}; megalm needs them all fp32, bf16 or fp16")
    config.train.precision = precision
    config.train.run_dir = str(out)
    config.train.init_from = None
    groups = ParallelGroups.single()
    model = build_model(config.model, groups, config.train.seed, materialize=False)  # names and tp splits only
    pieces = []
    for name, param in model.named_parameters():
        name = getattr(param, "init_name", name)
        if name not in state:
            raise InteropError(f"{source}: tensor {name} is missing")
        tensor = state.pop(name)
        if tuple(tensor.shape) != tuple(param.shape):
            raise InteropError(f"{source}: {name} has shape {tuple(tensor.shape)}, the model {tuple(param.shape)}")
        pieces.append({"name": name, "kind": "param", "full_shape": list(tensor.shape),
                       "split_dim": getattr(param, "tp_split_dim", None), "tp_rank": 0, "tp_size": 1,
                       "lo": 0, "hi": tensor.numel(), "tensor": tensor.reshape(-1).clone()})
    if state:
        raise InteropError(f"{source}: tensors megalm's GPT does not have: {', '.join(sorted(state)[:5])}")
    saved_rng = torch.get_rng_state()
    rng = ParallelRNG(config.train.seed, groups)
    rng.seed_replicated()
    rng_state = rng.state_dict()
    torch.set_rng_state(saved_rng)
    layout = checkpoint_layout(groups.topology, config.parallel)
    metadata = {
        "megalm_version": megalm.__version__, "config": config_to_dict(config), "layout": layout, "world_size": 1,
        "consumed_samples": 0, "optimizer_steps": 0,
        "optimizer_scalars": {"class": "torch.optim.adamw.AdamW", "param": {}, "group": {}},
        "loss_scaler": None, "tokenizer_hash": tokenizer_hash, "imported_from": str(source.resolve()),
    }
    payload = {"rank": 0, "layout": layout, "pieces": pieces, "rng": rng_state}
    store = CheckpointStore(out / "checkpoints", rank=0)
    checkpoint = store.save(0, payload, metadata, file_info={"params": sorted(p["name"] for p in pieces)})
    (out / "config.yaml").write_text(config_to_yaml(config))
    return {"checkpoint": checkpoint, "config": out / "config.yaml", "tensors": len(pieces),
            "parameters": sum(p["hi"] for p in pieces), "family": config.model.family,
            "tokenizer": config.data.tokenizer if tokenizer_hash else None}
