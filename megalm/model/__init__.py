"""The GPT model, LM and PrefixLM: `gpt` (one pipeline stage), `layers`, `attention` (PrefixLM masks),
`init` (layout-independent initialization) and `compile` (per-layer torch.compile)."""
