"""Data: tokenizer, token files and samples, the data-parallel sampler, and the built-in corpora.

`tokenizer` (sentencepiece, and `open_tokenizer` for either kind), `hf_tokenizer` (a Hugging Face
tokenizer.json), `preprocess` (text to a PREFIX.bin/.idx dataset), `indexed` (that
mmap format), `inspect` (`megalm data inspect`), `dataset` (samples over token files, blends,
JSONL pairs), `sampler` (this rank's micro-batches), `pipeline` (the samplers a config asks for),
`stats` (the start-up data report), `batch` (what the model receives), `synthetic` (a built-in
token stream) and `corpus` with `corpus_world` (a built-in Chinese/English text corpus).
"""


class TokenizerError(ValueError):
    """A tokenizer cannot be trained or loaded; the message names the file and the fix."""


def checked_ids(ids, vocab_size: int, path: object) -> list[int]:
    """`ids` as ints, each in [0, vocab_size): TokenizerError naming the tokenizer for one outside."""
    out = [int(token) for token in ids]
    for token in out:
        if not 0 <= token < vocab_size:
            raise TokenizerError(f"token id {token} is out of range for {path} (vocab_size {vocab_size})")
    return out
