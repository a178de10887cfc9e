"""Hugging Face tokenizers in megalm: encode/decode equal transformers' AutoTokenizer for Llama 3, Llama 2 /
Mistral and Qwen2 style directories (built locally, tests/data/hf_tokenizer_dirs.py); special and stop ids;
the content hash; preprocess, pairs, train samples, generate and eval on them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from megalm.cli import main  # noqa: E402
from megalm.config import load_config  # noqa: E402
from megalm.data.hf_tokenizer import HF_TOKENIZER_FILES, HFTokenizer  # noqa: E402
from megalm.data.indexed import IndexedDataset  # noqa: E402
from megalm.data.pipeline import DataError, build_sampler, build_sources  # noqa: E402
from megalm.data.preprocess import preprocess  # noqa: E402
from megalm.data.tokenizer import TokenizerError, check_model_vocab, open_tokenizer  # noqa: E402
from megalm.eval.evaluator import Evaluator  # noqa: E402
from megalm.eval.harness import MegalmLM  # noqa: E402
from megalm.generate import Sampling, encode_prompt  # noqa: E402

from tests.data.hf_tokenizer_dirs import llama2_dir, llama3_dir, qwen2_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = {
    "llama3": llama3_dir,
    "llama2": llama2_dir,
    "mistral": lambda out: llama2_dir(out, legacy=True),
    "llama2-add-eos": lambda out: llama2_dir(out, add_eos=True),  # transformers 5 ignores add_eos_token
    "qwen2": qwen2_dir,
}
TEXTS = [
    "Hello world!", "hello world", " leading space", "   three leading", "trailing spaces   ", "a  b\n\nc\t",
    "line one\nline two\n", "\r\nwindows\r\n", "", " ", "\n", "It's don't we'll I'm they're",
    "中文，测试。！？“引号”", "emoji 😀🎉👩‍👩‍👧", "café vs cafe\u0301 naïve", "ﬁ Ｈｅｌｌｏ　full width",
    "digits 1234567890 3.14159", "\u2581meta symbol", "zero\u200bwidth and\u00a0nbsp",
    "<s> hi</s> there", "x <s>y", "hi<s>", "<|begin_of_text|>x<|eot_id|> y", "<|im_start|>user\nhi<|im_end|>\n",
    "<|endoftext|>", "the <sep> text",
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {name: build(root / name) for name, build in FAMILIES.items()}


def auto(path: Path):
    return transformers.AutoTokenizer.from_pretrained(str(path))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_encode_and_decode_are_autotokenizers(family: str, dirs: dict[str, Path]) -> None:
    reference, tokenizer = auto(dirs[family]), open_tokenizer(dirs[family])
    assert isinstance(tokenizer, HFTokenizer)
    for text in TEXTS:
        ids = reference(text)["input_ids"]
        assert tokenizer.encode(text) == ids, text
        assert tokenizer.encode_batch([text, text]) == [ids, ids]
        assert tokenizer.encode(text, add_special_tokens=False) == reference(text, add_special_tokens=False)["input_ids"]
        for skip in (True, False):
            assert tokenizer.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)
    assert tokenizer.decode(tokenizer.encode("Hello world!")) == "Hello world!"
    assert tokenizer.vocab_size == len(reference)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id) == (
        reference.bos_token_id, reference.eos_token_id, reference.unk_token_id)
    assert tokenizer.pad_id == (reference.pad_token_id if reference.pad_token_id is not None else tokenizer.eos_id)
    assert tokenizer.add_bos == (reference("a")["input_ids"][0] == reference.bos_token_id)
    assert tokenizer.id_to_piece(tokenizer.eos_id) == reference.eos_token
    with pytest.raises(TokenizerError, match="out of range"):
        tokenizer.decode([tokenizer.vocab_size])


def test_special_ids_of_each_family(dirs: dict[str, Path]) -> None:
    llama3, llama2, qwen2 = (open_tokenizer(dirs[name]) for name in ("llama3", "llama2", "qwen2"))
    ids = {t: llama3.token_to_id(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")}
    assert llama3.add_bos and llama3.bos_id == ids["<|begin_of_text|>"]
    assert llama3.eos_id == ids["<|eot_id|>"]  # the tokenizer's eos: the document separator
    assert set(llama3.stop_ids) == {ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]}  # all stop
    assert llama3.stop_ids[0] == llama3.eos_id and llama3.pad_id == llama3.sep_id == llama3.eos_id
    assert llama3.encode("hi")[0] == llama3.bos_id
    assert (llama2.bos_id, llama2.eos_id, llama2.unk_id, llama2.stop_ids, llama2.add_bos) == (1, 2, 0, (2,), True)
    assert qwen2.bos_id is None and not qwen2.add_bos
    assert qwen2.eos_id == qwen2.token_to_id("<|im_end|>") and qwen2.pad_id == qwen2.token_to_id("<|endoftext|>")
    assert set(qwen2.stop_ids) == {qwen2.eos_id, qwen2.pad_id}
    assert open_tokenizer(dirs["llama2-add-eos"]).add_eos is False  # as AutoTokenizer: no eos appended


def test_loader_hash_and_files(dirs: dict[str, Path], tmp_path: Path) -> None:
    tokenizer = open_tokenizer(dirs["llama3"])
    assert open_tokenizer(dirs["llama3"] / "tokenizer.json").hash == tokenizer.hash  # the file: same config
    copy = tmp_path / "copy"
    shutil.copytree(dirs["llama3"], copy)
    assert open_tokenizer(copy).hash == tokenizer.hash  # content, not the path
    assert [p.name for p in tokenizer.files()] == [
        name for name in HF_TOKENIZER_FILES if (dirs["llama3"] / name).is_file()]
    assert {p.name for p in tokenizer.files()} == {"tokenizer.json", "tokenizer_config.json",
                                                   "special_tokens_map.json", "generation_config.json"}
    # another eos token changes the documents' separator: another hash
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|end_of_text|>"
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    (copy / "special_tokens_map.json").unlink()
    changed = open_tokenizer(copy)
    assert changed.eos_id == auto(copy).eos_token_id != tokenizer.eos_id and changed.hash != tokenizer.hash
    hashes = {name: open_tokenizer(path).hash for name, path in dirs.items()}
    assert hashes["llama2-add-eos"] == hashes["llama2"]  # the ignored add_eos_token changes no id
    assert len({hashes[name] for name in ("llama3", "llama2", "mistral", "qwen2")}) == 4  # Metaspace scheme too
    # a bare tokenizer.json elsewhere: its own pipeline, eos from generation_config.json absent -> error
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(dirs["qwen2"] / "tokenizer.json", bare / "tokenizer.json")
    with pytest.raises(TokenizerError, match="names no eos token"):
        open_tokenizer(bare)
    (bare / "generation_config.json").write_text(json.dumps({"eos_token_id": [401, 400]}))
    assert open_tokenizer(bare).stop_ids == (401, 400)
    with pytest.raises(TokenizerError, match="without tokenizer.json"):
        open_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="not found"):
        open_tokenizer(tmp_path / "missing.model")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError, match="not a Hugging Face tokenizer.json"):
        open_tokenizer(broken)


def test_model_vocab_may_exceed_a_hf_tokenizers_not_a_sentencepiece_ones(dirs: dict[str, Path]) -> None:
    tokenizer = open_tokenizer(dirs["qwen2"])
    assert check_model_vocab(tokenizer, tokenizer.vocab_size) is None
    assert check_model_vocab(tokenizer, 512) is None  # Qwen2: the embedding has more rows than the tokenizer ids
    assert "set model.vocab_size >= 403" in check_model_vocab(tokenizer, 402)
    sentencepiece = SimpleNamespace(kind="sentencepiece", vocab_size=256)
    assert check_model_vocab(sentencepiece, 256) is None and "model.vocab_size=256" in check_model_vocab(sentencepiece, 512)


DOCUMENTS = ["Hello world! It's a test.", "中文，测试。😀", "  spaces   and\ttabs  ", "<|eot_id|> special text",
             "numbers 1234567890"]


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_preprocess_writes_autotokenizers_ids_and_the_eos(family: str, dirs: dict[str, Path], tmp_path: Path) -> None:
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS), encoding="utf-8")
    reference, tokenizer = auto(dirs[family]), open_tokenizer(dirs[family])
    assert main(["preprocess", "--input", str(corpus), "--output-prefix", str(tmp_path / "one"),
                 "--tokenizer", str(dirs[family]), "--no-progress"]) == 0
    dataset = IndexedDataset(tmp_path / "one")
    assert (dataset.vocab_size, dataset.tokenizer_hash) == (tokenizer.vocab_size, tokenizer.hash)
    for index, text in enumerate(DOCUMENTS):
        assert dataset.get(index).tolist() == reference(text)["input_ids"] + [reference.eos_token_id]
    if family == "llama3":  # worker processes load the tokenizer from its path: the same bytes
        preprocess([corpus], tmp_path / "two", dirs[family], workers=2, chunk_docs=2, progress=False)
        for suffix in (".bin", ".idx"):
            assert (tmp_path / f"two{suffix}").read_bytes() == (tmp_path / f"one{suffix}").read_bytes()


def test_pairs_encode_the_prefix_with_bos_and_the_target_bare(dirs: dict[str, Path], tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.jsonl"
    lines = [{"prefix": f"{a} plus {b} is", "target": f" {a + b}"} for a in range(6) for b in range(6)]
    pairs.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    config = load_config(ROOT / "configs" / "tiny-prefixlm.yaml", [
        "model.vocab_size=512", "data.kind=pairs", f"data.paths=[{pairs}]", f"data.tokenizer={dirs['llama3']}",
        "data.split=90,10,0"])
    sources = build_sources(config)
    tokenizer = sources.tokenizer
    batch = build_sampler(config, sources.train, 0, 1).micro_batches(0)[0]
    for row in range(len(batch.tokens)):
        tokens = batch.tokens[row].tolist()
        prefix_length = int(batch.prefix_lengths[row])
        assert tokens[0] == tokenizer.bos_id and tokens.count(tokenizer.bos_id) == 1
        assert tokens[prefix_length - 1] == tokenizer.sep_id == tokenizer.eos_id
        prompt = encode_prompt(tokenizer, tokenizer.decode(tokens[:prefix_length - 1]), pairs=True)
        assert prompt == tokens[:prefix_length]  # generate encodes a prompt as training encoded the prefix
        target = batch.labels[row][batch.loss_mask[row] == 1].tolist()
        assert target[-1] == tokenizer.eos_id and tokenizer.decode(target).strip().isdigit()
    config.model.vocab_size = 100
    with pytest.raises(DataError, match="set model.vocab_size >= 407"):
        build_sources(config)


def test_eval_and_harness_keep_the_bos_in_the_context(dirs: dict[str, Path]) -> None:
    tokenizer = open_tokenizer(dirs["llama3"])
    holder = SimpleNamespace(tokenizer=tokenizer)
    context, continuation = Evaluator.encode_pair(holder, "", "Hello world")
    assert context == [tokenizer.bos_id] and continuation == tokenizer.encode("Hello world")[1:]
    context, continuation = Evaluator.encode_pair(holder, "Hello", " world")
    assert context + continuation == tokenizer.encode("Hello world") and context == tokenizer.encode("Hello")
    harness = SimpleNamespace(tokenizer=tokenizer, seq_length=4)
    text = "Hello world! It's a test."
    windows = MegalmLM.rolling_windows(harness, text)
    assert [t for _, window in windows for t in window] == tokenizer.encode(text)[1:]  # every token after the BOS
    assert windows[0][0] == [tokenizer.bos_id]
    qwen2 = open_tokenizer(dirs["qwen2"])  # no BOS: the text follows an eos, as documents do
    windows = MegalmLM.rolling_windows(SimpleNamespace(tokenizer=qwen2, seq_length=4), text)
    assert windows[0][0] == [qwen2.eos_id] and [t for _, w in windows for t in w] == qwen2.encode(text)
    assert hash(Sampling(4, stop_id=tokenizer.stop_ids))  # a tuple of stop ids keeps Sampling hashable


def test_train_samples_and_generate_with_a_hf_tokenizer(dirs: dict[str, Path], tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS * 20), encoding="utf-8")
    assert main(["preprocess", "--input", str(corpus), "--output-prefix", str(tmp_path / "docs"),
                 "--tokenizer", str(dirs["llama3"]), "--no-progress"]) == 0
    run = tmp_path / "run"
    assert main(["train", str(ROOT / "configs" / "tiny.yaml"), "model.vocab_size=416", "data.kind=indexed",
                 f"data.paths=[{tmp_path / 'docs'}]", f"data.tokenizer={dirs['llama3']}", "data.split=90,10,0",
                 "train.steps=4", "optim.warmup_steps=1", "train.global_batch_size=4", "log.sample_prompts=[Hello]", "log.sample_tokens=4",
                 "--run-dir", str(run)]) == 0
    assert "sample: 'Hello' -> " in capsys.readouterr().out
    assert main(["generate", str(run), "--prompt", "Hello", "--prompt", "中文", "--max-new-tokens", "5"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    tokenizer = open_tokenizer(dirs["llama3"])
    assert [line["prompt"] for line in lines] == ["Hello", "中文"]
    for line in lines:
        assert not set(line["ids"]) & set(tokenizer.stop_ids)
        assert line["completion"] == tokenizer.decode(line["ids"])
    other = tmp_path / "other"
    shutil.copytree(dirs["llama3"], other)
    (other / "special_tokens_map.json").unlink()
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|end_of_text|>"}))
    assert main(["generate", str(run), "--prompt", "x", "--tokenizer", str(other)]) == 2
    assert "is not the checkpoint's" in capsys.readouterr().err
    assert main(["data", "inspect", str(tmp_path / "docs"), "--tokenizer", str(dirs["llama3"])]) == 0
    report = capsys.readouterr().out
    assert "warning" not in report and any(doc.split()[-1] in report for doc in DOCUMENTS), report


VARIANTS = {  # name: (base family, tokenizer_config.json changes (None: delete the key), tokenizer.json changes)
    "split_special_tokens": ("qwen2", {"split_special_tokens": True}, {}),
    "add_bos_token_without_post_processor": ("qwen2", {"add_bos_token": True, "bos_token": "<|endoftext|>"},
                                             {"post_processor": None}),
    "llama_without_prefix_space": ("llama2", {"add_prefix_space": False}, {}),
    "gpt2_class_defaults": ("llama3", {"tokenizer_class": "GPT2Tokenizer", "bos_token": None, "eos_token": None}, {}),
    "no_tokenizer_class": ("llama3", {"tokenizer_class": None}, {}),
    "qwen2_class_defaults": ("qwen2", {"eos_token": None, "pad_token": None, "unk_token": None}, {}),
    "llama_class_defaults": ("llama2", {"bos_token": None, "eos_token": None, "unk_token": None,
                                        "added_tokens_decoder": None}, {}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_variants_follow_autotokenizer(variant: str, dirs: dict[str, Path], tmp_path: Path) -> None:
    family, config_changes, json_changes = VARIANTS[variant]
    path = tmp_path / variant
    shutil.copytree(dirs[family], path)
    (path / "special_tokens_map.json").unlink(missing_ok=True)
    for name, changes in (("tokenizer_config.json", config_changes), ("tokenizer.json", json_changes)):
        data = json.loads((path / name).read_text(encoding="utf-8"))
        data.update(changes)
        if name == "tokenizer_config.json":
            data = {key: value for key, value in data.items() if key not in changes or value is not None}
        (path / name).write_text(json.dumps(data), encoding="utf-8")
    reference, tokenizer = auto(path), open_tokenizer(path)
    for text in TEXTS:
        ids = reference(text)["input_ids"]
        assert tokenizer.encode(text) == ids, text
        assert tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (
        reference.bos_token_id, reference.eos_token_id, len(reference))


def test_generation_stops_at_any_of_the_stop_ids() -> None:
    """Sampling.stop_id as a tuple (a tokenizer's stop_ids, e.g. Llama 3 instruct's three eos): a row ends at
    the first of them it draws; an int stops as before."""
    from megalm.config import ModelConfig
    from megalm.distributed import ParallelGroups
    from megalm.generate import generate
    from megalm.model.gpt import build_model

    single = ParallelGroups.single()
    model = build_model(ModelConfig(num_layers=2, hidden_size=32, num_heads=4, vocab_size=100, seq_length=24,
                                    init_std=0.3), single, seed=3)
    prompts = [[5, 6, 7, 8, 9], [11, 12], [20, 21, 22, 23]]
    free = generate(model, single, prompts, Sampling(10))
    stops = (free[0][3], free[1][2])
    stopped = generate(model, single, prompts, Sampling(10, stop_id=stops))
    for row, ids in zip(free, stopped):
        cut = min([row.index(s) for s in stops if s in row], default=len(row))
        assert ids == row[:cut]
    assert stopped[0] != free[0] and stopped[1] != free[1]
    assert generate(model, single, prompts, Sampling(10, stop_id=stops[0])) == [
        row[:row.index(stops[0])] if stops[0] in row else row for row in free]
