"""Parallelism: `tensor` (Megatron-style split layers), `schedules` and `pipeline` (the pipeline's
schedules and executor), `p2p` and `p2p_check` (its transport, and the NCCL-rules replay), `data`
(gradient buckets, ZeRO-1), `optimizer` (fp32 masters over the main gradients), `random` (dropout streams), `context`
(context parallelism's sequence split, attention across it and its loss rule)."""
