"""megalm export --format hf / megalm import: transformers' GPT-2 gives megalm's logits, at any saved layout."""

from __future__ import annotations

import re

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megalm.checkpoint import Checkpointer, CheckpointError
from megalm.checkpoint.state import PieceIndex, named_params
from megalm.checkpoint.weights import find_checkpoint
from megalm.cli import main
from megalm.config import Config, ModelConfig, OptimConfig, ParallelConfig, TrainConfig
from megalm.data.tokenizer import Tokenizer
from megalm.distributed import ParallelGroups, build_parallel_groups
from megalm.interop.gpt2 import InteropError, export_gpt2, import_model
from megalm.model.gpt import prefix_attention_mask
from megalm.testing import run_distributed
from megalm.topology import Topology
from megalm.train import build_trainer

transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not installed "
                                                          "(pip install 'megalm[hf]')")
pytest.importorskip("safetensors", reason="safetensors is not installed (pip install 'megalm[hf]')")

ROOT = Path(__file__).resolve().parents[2]
STEPS = 2
SEQ = 16
TEXTS = ["Lena lives in the town by the river. She is 31 years old.", "王芳今年二十岁，她住在河边的小镇。",
         "What is four times ten? It is forty.", "李明喜欢吃面条。 Li Ming likes noodles."]


def make_config(tokenizer: Path, tp=1, pp=1, dp=1, family="lm", **model) -> Config:
    fields = dict(family=family, num_layers=2, hidden_size=32, num_heads=4, ffn_hidden_size=48,
                  vocab_size=Tokenizer.load(tokenizer).vocab_size, seq_length=SEQ)
    fields.update(model)
    config = Config(
        model=ModelConfig(**fields), parallel=ParallelConfig(tp=tp, pp=pp, dp=dp),
        optim=OptimConfig(lr=3e-2, warmup_steps=1),
        train=TrainConfig(steps=STEPS, micro_batch_size=1, global_batch_size=4, seed=5),
    )
    config.data.tokenizer = str(tokenizer)
    return config


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    from megalm.data.corpus import write_corpus
    from megalm.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tokenizer")
    write_corpus(root / "corpus.jsonl", num_bytes=100_000, seed=0)
    return train_tokenizer([root / "corpus.jsonl"], root / "tok", vocab_size=700)


def _train(config: Config, groups: ParallelGroups, run_dir: Path) -> None:
    trainer = build_trainer(config, groups, None)
    trainer.fit(steps=STEPS, checkpointer=Checkpointer(trainer, run_dir))


def _worker_222(rank: int, world_size: int, root: str, tokenizer: str) -> float:
    """Train and save the (2, 2, 2) LM; then, at (2, 2, 2) too, fine-tune from the imported GPT-2 (one step)."""
    groups = build_parallel_groups(Topology(tp=2, pp=2, dp=2), rank, torch.device("cpu"))
    _train(make_config(Path(tokenizer), tp=2, pp=2, dp=2), groups, Path(root) / "lm-222")
    config = make_config(Path(tokenizer), tp=2, pp=2, dp=2)
    config.train.init_from = str(Path(root) / "imported")
    trainer = build_trainer(config, groups, None)
    assert Checkpointer(trainer, Path(root) / "finetune").start() == 0
    return trainer.fit(steps=1, start_step=0)[0]["loss"]


@pytest.fixture(scope="module")
def runs(tokenizer: Path, tmp_path_factory) -> dict:
    """Run directories of an LM trained 2 steps at (tp, pp, dp) = (1, 1, 1) and (2, 2, 2), and of a
    PrefixLM; the (1, 1, 1) LM exported and imported back ("imported"), and the first loss of its
    fine-tune at (2, 2, 2) ("finetune_losses", one per rank). One 8-process job for all of it."""
    root = tmp_path_factory.mktemp("runs")
    _train(make_config(tokenizer), ParallelGroups.single(), root / "lm-111")
    _train(make_config(tokenizer, family="prefixlm"), ParallelGroups.single(), root / "prefixlm-111")
    export_gpt2(root / "lm-111", root / "hf-111")
    import_model(root / "hf-111", root / "imported")
    losses = run_distributed(_worker_222, 8, str(root), str(tokenizer), timeout=300)
    runs = {name: root / name for name in ("lm-111", "lm-222", "prefixlm-111", "imported")}
    return dict(runs, finetune_losses=losses)


def megalm_logits(run_dir: Path, tokenizer: Path, tokens: torch.Tensor, family: str = "lm",
                  prefix_lengths=None) -> torch.Tensor:
    """[b, s, vocab] logits of the run's checkpoint loaded at (1, 1, 1) (a resharding resume)."""
    config = make_config(tokenizer, family=family)
    trainer = build_trainer(config, ParallelGroups.single(), None)
    assert Checkpointer(trainer, run_dir).resume() == STEPS
    model = trainer.chunks[0].eval()
    with torch.no_grad():
        logits = model(tokens, prefix_lengths=prefix_lengths)  # [s, b, padded vocab]
    return logits[:, :, : config.model.vocab_size].transpose(0, 1)


def sample_tokens(vocab: int) -> torch.Tensor:
    return torch.randint(4, vocab, (3, SEQ), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("layout", ["111", "222"])
def test_transformers_gives_megalms_logits(layout: str, runs, tokenizer: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "hf"
    assert main(["export", str(runs[f"lm-{layout}"]), str(out), "--format", "hf"]) == 0
    assert f"wrote {out}: GPT-2 of step {STEPS}" in capsys.readouterr().out
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    vocab = Tokenizer.load(tokenizer).vocab_size
    assert model.config.vocab_size == vocab  # the padded rows are gone
    tokens = sample_tokens(vocab)
    with torch.no_grad():
        theirs = model(tokens).logits
    ours = megalm_logits(runs[f"lm-{layout}"], tokenizer, tokens)
    assert theirs.dtype == torch.float32 and theirs.shape == ours.shape
    assert (theirs - ours).abs().max().item() < 1e-5
    # the tokenizer comes along and gives megalm's ids
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ours_tok = Tokenizer.load(tokenizer)
    for text in TEXTS:
        assert hf_tokenizer(text)["input_ids"] == ours_tok.encode(text), text


def test_prefixlm_exports_with_its_mask(runs, tokenizer: Path, tmp_path: Path) -> None:
    """GPT-2 is causal; given megalm's [b, 1, s, s] prefix mask it gives the PrefixLM's logits."""
    export_gpt2(runs["prefixlm-111"], tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["megalm"]["family"] == "prefixlm" and "attention_mask [b, 1, s, s]" in config["megalm"]["attention"]
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()  # sdpa: a bool mask
    eager = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    tokens = sample_tokens(model.config.vocab_size)
    prefix = torch.tensor([3, 9, 1])
    ours = megalm_logits(runs["prefixlm-111"], tokenizer, tokens, "prefixlm", prefix)
    mask = prefix_attention_mask(prefix, SEQ)
    with torch.no_grad():
        theirs = model(tokens, attention_mask=mask).logits
        additive = eager(tokens, attention_mask=torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))).logits
        causal = model(tokens).logits
    assert (theirs - ours).abs().max().item() < 1e-5
    assert (additive - ours).abs().max().item() < 1e-5  # eager attention takes the additive form of the mask
    assert (causal - ours).abs().max().item() > 1e-3  # the mask matters


def test_import_then_export_is_bit_identical(runs, tmp_path: Path, capsys) -> None:
    first, imported, second = tmp_path / "first", tmp_path / "imported", tmp_path / "second"
    assert main(["export", str(runs["lm-222"]), str(first)]) == 0
    assert main(["import", str(first), str(imported)]) == 0
    assert f"train.init_from={imported}" in capsys.readouterr().out
    assert main(["export", str(imported), str(second)]) == 0
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= set(names)
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_a_transformers_gpt2_imports_and_exports_unchanged(tmp_path: Path) -> None:
    """A GPT-2 saved by transformers itself (no megalm entry, untied-looking lm_head key)."""
    config = transformers.GPT2Config(vocab_size=300, n_positions=32, n_embd=48, n_layer=2, n_head=3, n_inner=80,
                                     layer_norm_epsilon=1e-6)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(tmp_path / "gpt2")
    summary = import_model(tmp_path / "gpt2", tmp_path / "imported")
    assert summary["family"] == "lm" and summary["tokenizer"] is None
    export_gpt2(tmp_path / "imported", tmp_path / "again")
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "again" / "model.safetensors")
    original = {name: t for name, t in model.state_dict().items() if name != "lm_head.weight"}
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    # and megalm's own model computes what transformers computes with those weights
    from megalm.config import load_config

    megalm_config = load_config(tmp_path / "imported" / "config.yaml")
    trainer = build_trainer(megalm_config, ParallelGroups.single(), None)
    assert Checkpointer(trainer, tmp_path / "imported").resume() == 0
    tokens = sample_tokens(300)[:, :32]
    with torch.no_grad():
        ours = trainer.chunks[0].eval()(tokens)[:, :, :300].transpose(0, 1)
        theirs = model(tokens).logits
    assert (ours - theirs).abs().max().item() < 1e-5


def test_an_imported_model_fine_tunes_at_another_layout(runs, tokenizer: Path) -> None:
    """init_from an imported GPT-2 at (2, 2, 2): the first loss is the source checkpoint's, resumed at 1 x 1 x 1."""
    metadata = json.loads((find_checkpoint(runs["imported"]) / "metadata.json").read_text())
    assert metadata["tokenizer_hash"] == Tokenizer.load(tokenizer).hash  # the tokenizer came back too
    losses = runs["finetune_losses"]
    assert len(set(losses)) == 1
    reference = build_trainer(make_config(tokenizer), ParallelGroups.single(), None)
    assert Checkpointer(reference, runs["lm-111"]).resume() == STEPS
    from megalm.data.pipeline import build_sampler, build_sources

    config = make_config(tokenizer)
    reference.valid = build_sampler(config, build_sources(config).train, 0, 1)
    fresh = build_trainer(config, ParallelGroups.single(), None)
    fresh.valid = build_sampler(config, build_sources(config).train, 0, 1)
    expected = reference.evaluate()
    assert abs(expected - fresh.evaluate()) > 1e-2  # the trained weights are far from a fresh model's here
    assert losses[0] == pytest.approx(expected, rel=1e-5)


def test_convert_output_loads_back_through_import(runs, tokenizer: Path, tmp_path: Path) -> None:
    assert main(["convert", str(runs["lm-222"]), str(tmp_path / "model.pt")]) == 0
    import_model(tmp_path / "model.pt", tmp_path / "imported")
    config = make_config(tokenizer)
    restored = build_trainer(config, ParallelGroups.single(), None)
    assert Checkpointer(restored, tmp_path / "imported").resume() == 0
    source = find_checkpoint(runs["lm-222"])
    index = PieceIndex(source, json.loads((source / "metadata.json").read_text())["files"])
    vocab = config.model.vocab_size
    for name, param in named_params(restored.chunks):
        expected = index.full(name, "param")
        if name == "embedding.word.weight":
            assert torch.equal(param[:vocab], expected[:vocab]) and not param[vocab:].any()
        else:
            assert torch.equal(param, expected), name


def test_what_cannot_be_exported_or_imported_is_one_line(runs, tokenizer: Path, tmp_path: Path, capsys) -> None:
    rotary = make_config(tokenizer, position_embedding="rotary")
    trainer = build_trainer(rotary, ParallelGroups.single(), None)
    Checkpointer(trainer, tmp_path / "rotary").save(0)
    with pytest.raises(InteropError, match="rotary model cannot be exported to transformers' GPT-2"):
        export_gpt2(tmp_path / "rotary", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    for args, expected in [
        (["export", str(tmp_path / "missing"), str(tmp_path / "o")], "checkpoint=" + str(tmp_path / "missing") +
         " does not exist"),
        (["export", str(runs["lm-111"]), str(tmp_path / "full")], "exists and is not an empty directory"),
        (["import", str(tmp_path / "missing"), str(tmp_path / "o")], "does not exist: give a transformers GPT-2"),
        (["import", str(tmp_path / "rotary"), str(tmp_path / "o")], "has no config.json"),
    ]:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("megalm: error: ") and expected in err and len(err.strip().splitlines()) == 1, err
    trainer = build_trainer(make_config(tokenizer), ParallelGroups.single(), None)
    trainer.config.data.tokenizer = str(tmp_path / "gone.model")  # as if the tokenizer moved after training
    Checkpointer(trainer, tmp_path / "moved").save(0)
    with pytest.raises(InteropError, match="pass --tokenizer PATH.model"):
        export_gpt2(tmp_path / "moved", tmp_path / "o2")
    export_gpt2(tmp_path / "moved", tmp_path / "o2", tokenizer=str(tokenizer))
    assert (tmp_path / "o2" / "tokenizer.json").is_file()


@pytest.mark.parametrize("field, value, named", [
    ("tie_embeddings", False, "model.tie_embeddings=false"), ("norm", "rmsnorm", "model.norm=rmsnorm"),
    ("mlp", "swiglu", "model.mlp=swiglu"), ("num_kv_heads", 2, "model.num_kv_heads=2"),
    ("bias", False, "model.bias=False"), ("head_dim", 16, "model.head_dim=16"),
])
def test_a_model_gpt2_cannot_hold_is_refused_before_anything_is_written(field, value, named, tokenizer: Path,
                                                                         tmp_path: Path) -> None:
    """Not only rotary positions: an untied output layer (which GPT-2's config would silently tie), RMSNorm,
    SwiGLU, fewer key/value heads, no biases or another head width each name the field, and no directory is left."""
    config = make_config(tokenizer, **{field: value})
    Checkpointer(build_trainer(config, ParallelGroups.single(), None), tmp_path / "run").save(0)
    with pytest.raises(InteropError, match=f"not GPT-2's architecture: {re.escape(named)}"):
        export_gpt2(tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_without_the_hf_extra_export_says_what_to_install(runs, tmp_path: Path, monkeypatch) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tokenizers" else find_spec(name, *a))
    with pytest.raises(InteropError, match=r"needs the tokenizers package, which is not installed: pip install "
                                           r"'megalm\[hf\]' or pass --no-tokenizer"):
        export_gpt2(runs["lm-111"], tmp_path / "out")
    export_gpt2(runs["lm-111"], tmp_path / "weights", with_tokenizer=False)  # the weights need no extra
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == ["config.json", "model.safetensors"]


_MEASURE = """
import sys, threading, time
import torch
from megalm.interop.gpt2 import export_gpt2

def anonymous() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon:"))

torch.ones(4) + 1  # the first op's one-off allocations happen before the baseline
peak, done = [0], threading.Event()
def sample() -> None:
    while not done.is_set():
        peak[0] = max(peak[0], anonymous())
        time.sleep(0.0002)
base = anonymous()
sampler = threading.Thread(target=sample)
sampler.start()
export_gpt2(sys.argv[1], sys.argv[2], with_tokenizer=False)
done.set()
sampler.join()
print(peak[0] - base)
"""


def test_export_streams_tensor_by_tensor(tmp_path: Path) -> None:
    """A 150 MB model exports with under 40 MB of anonymous memory (about twice its largest tensor plus
    the index): full tensors are built one at a time from memory-mapped rank files, never the whole model."""
    model = ModelConfig(num_layers=12, hidden_size=512, num_heads=8, vocab_size=256, seq_length=16)
    config = Config(model=model, train=TrainConfig(steps=1, micro_batch_size=1, global_batch_size=1))
    trainer = build_trainer(config, ParallelGroups.single(), None)
    Checkpointer(trainer, tmp_path / "big").save(0)
    total = sum(p.numel() * 4 for _, p in named_params(trainer.chunks))
    del trainer
    assert total > 140 * 2**20
    result = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / "big"), str(tmp_path / "hf")],
                            capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    grew = int(result.stdout.strip().splitlines()[-1])
    assert (tmp_path / "hf" / "model.safetensors").stat().st_size > total - 2**20
    assert grew < 40 * 2**20, f"export grew anonymous memory by {grew / 2**20:.1f} MiB for a {total / 2**20:.0f} MiB model"
