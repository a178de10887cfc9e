"""Hugging Face interop: `gpt2` (GPT-2 export and import), `llama` (the Llama, Qwen2 and Mistral config
and tensor maps), `hf` (their import and export), `hf_tokenizer` (a sentencepiece tokenizer as a
tokenizer.json with the same ids), `safetensors_stream` (a safetensors writer, one tensor at a time)
and `stream_checkpoint` (a checkpoint rank file written one tensor at a time)."""

from megalm.checkpoint.store import CheckpointError


class InteropError(CheckpointError):
    """A model or directory that cannot be exported or imported; the message says why and what to do."""
