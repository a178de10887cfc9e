"""Optional training engines that run megalm's model under another framework's data parallelism.

Nothing here imports a third-party engine at import time: `megalm.engines.deepspeed_engine` loads
DeepSpeed only inside `build_deepspeed_engine`, so megalm works without the extra installed.
"""
