"""Hugging Face interop: `gpt2` (checkpoint export and import), `hf_tokenizer` (the tokenizer as a
tokenizer.json with the same ids) and `safetensors_stream` (a safetensors writer, one tensor at a time)."""
