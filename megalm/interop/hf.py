"""`megalm import` and `megalm export` for Hugging Face Llama, Qwen2 and Mistral checkpoints (GPT-2: megalm.interop.gpt2).

Import reads config.json (megalm.interop.llama.model_fields) and the safetensors file(s) (one file, or
shards named by model.safetensors.index.json), and writes a run directory: config.yaml, a step-0
checkpoint at layout 1 x 1 x 1 (resumed by `megalm train`, or fine-tuned at any tp x pp with
`train.init_from`, which reshards on load) and tokenizer/ (the tokenizer files, with
generation_config.json and megalm_hf.json: the family and the bos/eos/pad ids of config.json) that
data.tokenizer names. It streams: each megalm tensor is made from its Hugging Face tensors (each read
through its own `safe_open`, so no file stays mapped) when the checkpoint writer reaches its bytes
(megalm.interop.stream_checkpoint), so memory holds about the largest tensor twice (read, converted),
whatever the model's size. The dtype is the safetensors headers' (one for all tensors: train.precision).

Export reads a checkpoint of any layout one full tensor at a time (memory-mapped rank files) and writes
the family it was imported from (megalm_hf.json next to data.tokenizer, which fine-tunes keep), or
--family, or the one its biases need (q/k/v biases alone: qwen2, else llama): config.json,
safetensors shards of at most --max-shard-size with model.safetensors.index.json (one file when it
fits), the tokenizer files and generation_config.json.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch

import megalm
from megalm.checkpoint.state import PieceIndex
from megalm.checkpoint.store import CheckpointStore
from megalm.checkpoint.weights import find_checkpoint
from megalm.config import Config, config_from_dict, config_to_dict, config_to_yaml
from megalm.data.hf_tokenizer import HF_TOKENIZER_FILES, HFTokenizer
from megalm.interop import InteropError
from megalm.interop.gpt2 import HF_DTYPE_NAMES, gpt2_differences
from megalm.interop.llama import ARCHITECTURES, Entry, export_family, from_hf, hf_config, megalm_shape, model_fields, \
    tensor_table, to_hf
from megalm.interop.safetensors_stream import StreamingSafetensorsWriter
from megalm.interop.stream_checkpoint import StreamedRankFile, placeholder
from megalm.model.gpt import PARAM_DTYPES

TOKENIZER_FILES = HF_TOKENIZER_FILES + ("vocab.json", "merges.txt")  # and what slow tokenizers read
HF_INFO = "megalm_hf.json"  # in the run's tokenizer/ directory: the family and token ids of the source config.json
TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_IGNORED_TENSORS = re.compile(r".*\.rotary_emb\.inv_freq$")  # a buffer some older files hold, not a weight


def source_family(directory: Path) -> Optional[str]:
    """config.json's model_type of a Hugging Face directory (None when there is none)."""
    where = Path(directory) / "config.json"
    if not Path(directory).is_dir() or not where.is_file():
        return None
    return json.loads(where.read_text()).get("model_type")


# ---- import ---------------------------------------------------------------------------------------------
class _Source:
    """The tensors of a Hugging Face directory: where each lives, its dtype and shape (headers only)."""

    def __init__(self, directory: Path) -> None:
        from safetensors import safe_open

        index = directory / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (directory / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise InteropError(f"{directory} has no model.safetensors (nor model.safetensors.index.json): save the "
                               f"model with save_pretrained(..., safe_serialization=True)")
        self.file: dict[str, Path] = {}
        self.dtype: dict[str, str] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        for name in files:
            path = directory / name
            if not path.is_file():
                raise InteropError(f"{index} names {name}, which is missing from {directory}")
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    piece = handle.get_slice(key)
                    self.file[key], self.dtype[key], self.shape[key] = path, piece.get_dtype(), tuple(piece.get_shape())

    def read(self, name: str) -> torch.Tensor:
        """One tensor, through a handle of its own (closed at once: the file's pages are not kept mapped)."""
        from safetensors import safe_open

        with safe_open(str(self.file[name]), framework="pt") as handle:
            return handle.get_tensor(name)


def _check_tensors(source: _Source, table: list[Entry], cfg, directory: Path) -> None:
    wanted = {name: shape for entry in table for name, shape in zip(entry.theirs, entry.shapes)}
    for name, shape in wanted.items():
        if name not in source.file:
            raise InteropError(f"{directory}: tensor {name} is missing from the safetensors file(s)")
        if source.shape[name] != tuple(shape):
            raise InteropError(f"{directory}: {name} has shape {source.shape[name]}, config.json says {tuple(shape)}")
    extra = sorted(name for name in source.file if name not in wanted and not _IGNORED_TENSORS.match(name))
    if cfg.tie_embeddings and "lm_head.weight" in extra:  # a tied model saved with its (equal) output layer
        if not torch.equal(source.read("lm_head.weight"), source.read("model.embed_tokens.weight")):
            raise InteropError(f"{directory}: tie_word_embeddings is true but lm_head.weight differs from "
                               f"model.embed_tokens.weight; set tie_word_embeddings false in config.json")
        extra.remove("lm_head.weight")
    if extra:
        raise InteropError(f"{directory}: tensors that megalm's model does not have: {', '.join(extra[:5])}")


def _split_dims(config: Config, table: list[Entry], directory: Path) -> dict[str, Optional[int]]:
    """Each tensor's tp split dim from megalm's own model, after checking it has the table's names and shapes."""
    from megalm.distributed import ParallelGroups
    from megalm.model.gpt import build_model

    model = build_model(config.model, ParallelGroups.single(), config.train.seed, materialize=False)
    params = {getattr(p, "init_name", n): p for n, p in model.named_parameters()}
    ours = {entry.name: megalm_shape(entry, config.model) for entry in table}
    theirs = {name: tuple(p.shape) for name, p in params.items()}
    if ours != theirs:
        differing = sorted(set(ours) ^ set(theirs)) or sorted(n for n in ours if ours[n] != theirs[n])
        raise InteropError(f"{directory}: megalm's model for this config has other tensors than the conversion "
                           f"table ({', '.join(differing[:5])}): a megalm version mismatch")
    return {name: getattr(param, "tp_split_dim", None) for name, param in params.items()}


def _copy_tokenizer(directory: Path, hf: dict[str, Any], out: Path) -> Optional[Path]:
    """The tokenizer files (and generation_config.json) into out/tokenizer; None when there is no tokenizer.json."""
    target = out / "tokenizer"
    target.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (directory / name).is_file():
            shutil.copyfile(directory / name, target / name)
    tokens = {key: hf.get(key) for key in TOKEN_KEYS}
    if not (target / "generation_config.json").is_file():
        (target / "generation_config.json").write_text(json.dumps(tokens, indent=2) + "\n")
    (target / HF_INFO).write_text(json.dumps({"model_type": hf["model_type"], **tokens}, indent=2) + "\n")
    return target.resolve() if (target / "tokenizer.json").is_file() else None


def _rng_state(config: Config, groups) -> dict:
    from megalm.parallel.random import ParallelRNG

    saved = torch.get_rng_state()
    rng = ParallelRNG(config.train.seed, groups)
    rng.seed_replicated()
    state = rng.state_dict()
    torch.set_rng_state(saved)
    return state


def import_llama(directory: str | Path, out: str | Path, family: Optional[str] = None,
                 seq_length: Optional[int] = None) -> dict[str, Any]:
    """A megalm run directory `out` (step-0 checkpoint, config.yaml, tokenizer/) from a Hugging Face
    Llama / Qwen2 / Mistral directory, tensor by tensor. `family`: lm or prefixlm (default lm)."""
    from megalm.checkpoint import checkpoint_layout
    from megalm.distributed import ParallelGroups

    directory, out = Path(directory), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InteropError(f"import output {out} exists and is not an empty directory: name a new run directory")
    where = directory / "config.json"
    hf = json.loads(where.read_text())
    base = config_to_dict(Config())
    base["model"].update(model_fields(hf, str(where), seq_length))
    if family is not None:
        base["model"]["family"] = family
    config = config_from_dict(base, source=str(where))
    cfg = config.model
    source = _Source(directory)
    table = tensor_table(cfg)
    _check_tensors(source, table, cfg, directory)
    dtypes = sorted({source.dtype[name] for entry in table for name in entry.theirs})
    if len(dtypes) != 1 or dtypes[0] not in _ST_DTYPES:
        raise InteropError(f"{directory}: tensors of dtype {', '.join(dtypes)}; megalm needs them all F32, BF16 or F16")
    dtype = _ST_DTYPES[dtypes[0]]
    config.train.precision = {value: key for key, value in PARAM_DTYPES.items()}[dtype]
    config.train.run_dir, config.train.init_from = str(out), None
    split_dims = _split_dims(config, table, directory)
    out.mkdir(parents=True, exist_ok=True)
    config.data.tokenizer = str(tokenizer) if (tokenizer := _copy_tokenizer(directory, hf, out)) else None

    pieces, producers = [], {}
    for entry in table:
        shape = megalm_shape(entry, cfg)
        tensor = placeholder((math.prod(shape),), dtype)

        def produce(entry: Entry = entry) -> torch.Tensor:
            return from_hf(entry, [source.read(name) for name in entry.theirs], cfg).reshape(-1)

        producers[id(tensor)] = produce
        pieces.append({"name": entry.name, "kind": "param", "full_shape": list(shape),
                       "split_dim": split_dims[entry.name], "tp_rank": 0, "tp_size": 1, "lo": 0,
                       "hi": math.prod(shape), "tensor": tensor})
    groups = ParallelGroups.single()
    layout = checkpoint_layout(groups.topology, config.parallel)
    metadata = {
        "megalm_version": megalm.__version__, "config": config_to_dict(config), "layout": layout, "world_size": 1,
        "consumed_samples": 0, "optimizer_steps": 0,
        "optimizer_scalars": {"class": "torch.optim.adamw.AdamW", "param": {}, "group": {}},
        "loss_scaler": None, "tokenizer_hash": HFTokenizer.load(tokenizer).hash if tokenizer else None,
        "imported_from": str(directory.resolve()),
        "hf_model_type": hf["model_type"], "hf_tokens": {key: hf.get(key) for key in TOKEN_KEYS},
    }
    payload = {"rank": 0, "layout": layout, "pieces": pieces, "rng": _rng_state(config, groups)}
    store = CheckpointStore(out / "checkpoints", rank=0, writer=StreamedRankFile(producers))
    checkpoint = store.save(0, payload, metadata, file_info={"params": sorted(p["name"] for p in pieces)})
    (out / "config.yaml").write_text(config_to_yaml(config))
    return {"checkpoint": checkpoint, "config": out / "config.yaml", "tensors": len(pieces),
            "parameters": sum(p["hi"] for p in pieces), "family": cfg.family, "hf_family": hf["model_type"],
            "tokenizer": config.data.tokenizer, "precision": config.train.precision}


def import_model(source: str | Path, out: str | Path, family: Optional[str] = None,
                 seq_length: Optional[int] = None) -> dict[str, Any]:
    """`megalm import`: a Hugging Face directory of any supported model_type, or a `megalm convert` file."""
    from megalm.interop import gpt2

    model_type = source_family(Path(source))
    if model_type in ARCHITECTURES:
        return import_llama(source, out, family, seq_length)
    if model_type not in (None, "gpt2"):
        raise InteropError(f"{Path(source) / 'config.json'}: model_type {model_type!r} is not one megalm imports "
                           f"(gpt2, {', '.join(ARCHITECTURES)})")
    return gpt2.import_model(source, out, family=family)


# ---- export ---------------------------------------------------------------------------------------------
def parse_size(text: str) -> int:
    """Bytes of a size such as 5GB, 500MB, 2GiB or 1000000."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not match:
        raise InteropError(f"--max-shard-size {text!r}: give bytes or a size such as 500MB or 5GB")
    number, unit, binary = float(match.group(1)), match.group(2).upper(), match.group(3)
    scale = (1024 if binary else 1000) ** "_KMGT".index(unit or "_")
    return max(1, int(number * scale))


def _tokenizer_directory(config: Config, given: Optional[str]) -> Optional[Path]:
    """The Hugging Face tokenizer directory of a run (data.tokenizer, or `given`), or None."""
    candidate = given or config.data.tokenizer
    if candidate is None:
        return None
    path = Path(candidate)
    if path.is_file() and path.name == "tokenizer.json":
        path = path.parent
    return path if path.is_dir() and (path / "tokenizer.json").is_file() else None


def _import_record(config: Config, metadata: dict[str, Any]) -> dict[str, Any]:
    """The metadata of the import a checkpoint descends from: its own, else that of its train.init_from
    chain (a fine-tune of an import), else {}."""
    for _ in range(16):
        if metadata.get("hf_model_type"):
            return metadata
        source = config.train.init_from
        if source is None or not Path(source).exists():
            return {}
        try:
            path = find_checkpoint(source)
            metadata = json.loads((path / "metadata.json").read_text())
            config = config_from_dict(metadata["config"], source=str(path))
        except Exception:  # noqa: BLE001 - a source that moved or changed: no record, the defaults apply
            return {}
    return {}


def _recorded_family(config: Config, metadata: dict[str, Any]) -> Optional[str]:
    """The family a checkpoint was imported from: megalm_hf.json beside its tokenizer, else its import's metadata."""
    directory = _tokenizer_directory(config, None)
    if directory is not None and (directory / HF_INFO).is_file():
        return json.loads((directory / HF_INFO).read_text()).get("model_type")
    return _import_record(config, metadata).get("hf_model_type")


def _shards(names: list[tuple[str, tuple[int, ...]]], element_size: int, limit: int) -> list[list[str]]:
    """Consecutive groups of tensors of at most `limit` bytes each (a larger tensor alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in names:
        nbytes = math.prod(shape) * element_size
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_tokenizer(config: Config, metadata: dict[str, Any], given: Optional[str], out: Path, path: Path,
                     log: Callable[[str], None]) -> tuple[list[str], dict[str, Any]]:
    """The tokenizer files in `out` and the bos/eos/pad ids for config.json."""
    directory = _tokenizer_directory(config, given)
    if directory is not None:
        files = [name for name in TOKENIZER_FILES if (directory / name).is_file()]
        for name in files:
            shutil.copyfile(directory / name, out / name)
        info = directory / HF_INFO
        source = info if info.is_file() else directory / "generation_config.json"
        tokens = json.loads(source.read_text()) if source.is_file() else {}
        return files, {key: tokens.get(key) for key in TOKEN_KEYS}
    from megalm.interop.gpt2 import _checkpoint_tokenizer
    from megalm.interop.hf_tokenizer import write_hf_tokenizer

    candidate = given or config.data.tokenizer
    tokenizer = _checkpoint_tokenizer(metadata, given, path) if candidate and Path(candidate).is_file() else None
    if tokenizer is None:
        log("no tokenizer: the checkpoint has none; the directory holds the model alone")
        return [], dict(_import_record(config, metadata).get("hf_tokens") or {})
    return (write_hf_tokenizer(tokenizer, out, config.model.max_positions()),
            {"bos_token_id": None, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id})


def export_llama(checkpoint: str | Path, out: str | Path, family: Optional[str] = None, dtype: Optional[str] = None,
                 max_shard_size: int = 5 * 10**9, tokenizer: Optional[str] = None, with_tokenizer: bool = True,
                 log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Write a transformers Llama / Qwen2 / Mistral directory for a checkpoint of any layout, one tensor at a time."""
    path = find_checkpoint(checkpoint, what="checkpoint")
    metadata = CheckpointStore(path.parent, rank=0).verify(path)
    config = config_from_dict(metadata["config"], source=str(path))
    cfg = config.model
    family = export_family(cfg, family or _recorded_family(config, metadata), str(path))
    target = PARAM_DTYPES[dtype or config.train.precision]
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InteropError(f"export output {out} exists and is not an empty directory: name a new directory")
    out.mkdir(parents=True, exist_ok=True)
    table = tensor_table(cfg)
    names = [(name, shape) for entry in table for name, shape in zip(entry.theirs, entry.shapes)]
    element = torch.empty((), dtype=target).element_size()
    shards = _shards(names, element, max_shard_size)
    files = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    shapes = dict(names)
    weight_map = {name: file for file, shard in zip(files, shards) for name in shard}
    writer: Optional[StreamingSafetensorsWriter] = None
    shard = -1
    try:
        for entry in table:
            # The rank files holding this tensor, memory-mapped for it alone: once it is written their
            # pages are unmapped, so the process does not keep the whole checkpoint resident.
            index = PieceIndex(path, metadata["files"], names={entry.name})
            full = index.full(entry.name, index.value_kind(entry.name))
            del index
            for name, value in zip(entry.theirs, to_hf(entry, full, cfg)):
                if writer is None or writer.position == len(writer.entries):
                    if writer is not None:
                        writer.close()
                    shard += 1
                    writer = StreamingSafetensorsWriter(out / files[shard], [(n, shapes[n], target) for n in shards[shard]])
                writer.write(name, value.to(target, memory_format=torch.contiguous_format))
            del full
        assert writer is not None
        writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    total = sum(math.prod(shape) for _, shape in names) * element
    if len(files) > 1:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        files = files + ["model.safetensors.index.json"]
    tokenizer_files, tokens = (_write_tokenizer(config, metadata, tokenizer, out, path, log) if with_tokenizer
                               else ([], {}))
    has_tokenizer = "tokenizer.json" in tokenizer_files
    if "generation_config.json" not in tokenizer_files:
        (out / "generation_config.json").write_text(json.dumps(tokens, indent=2) + "\n")
        tokenizer_files.append("generation_config.json")
    megalm_model = config_to_dict(config)["model"]
    (out / "config.json").write_text(json.dumps(hf_config(cfg, family, HF_DTYPE_NAMES[target], tokens, megalm_model),
                                                indent=2) + "\n")
    return {"checkpoint": path, "step": metadata["step"], "family": family, "files": files + tokenizer_files + ["config.json"],
            "tensors": len(names), "parameters": sum(math.prod(shape) for _, shape in names), "bytes": total,
            "dtype": HF_DTYPE_NAMES[target], "shards": len(shards), "tokenizer": has_tokenizer}


def gpt2_shaped(cfg) -> bool:
    """Whether a model is GPT-2's architecture (what --format hf exports as GPT-2)."""
    return not gpt2_differences(cfg)


def export_model(checkpoint: str | Path, out: str | Path, format: str = "hf", family: Optional[str] = None,
                 **options: Any) -> dict[str, Any]:
    """`megalm export`: GPT-2 for a GPT-2-shaped model (or --format gpt2), else the Llama family."""
    from megalm.interop.gpt2 import export_gpt2

    path = find_checkpoint(checkpoint, what="checkpoint")
    config = config_from_dict(json.loads((path / "metadata.json").read_text())["config"], source=str(path))
    if format == "gpt2" or (format == "hf" and family is None and gpt2_shaped(config.model)):
        options.pop("max_shard_size", None)
        return export_gpt2(path, out, **options) | {"family": "gpt2"}
    return export_llama(path, out, family=family, **options)
