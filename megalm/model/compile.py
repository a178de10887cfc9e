"""train.compile: torch.compile per transformer layer (regional compilation).

Each TransformerLayer is compiled in place (nn.Module.compile), so parameter names, state dicts and
checkpoints are those of the eager model. The layers share one class and one forward, and torch
traces their parameters as graph inputs, so every layer of the model (and of every pipeline chunk on
the rank) reuses the graph compiled for the first: compile time does not grow with depth. Nothing
outside the layers is compiled (embedding, loss, pipeline and optimizer stay eager).

Inside a layer the element-wise work fuses: bias + GeLU (fc1 hands its bias on, MLP.skip_bias_add),
bias + dropout + residual (megalm.model.layers.bias_dropout_add). Three things stay eager, each a
graph break (EAGER_ONLY): the tensor-parallel collectives (counted by megalm.comm, in NCCL's order;
under sequence parallel the column-parallel linears' all-gather + GEMM, one autograd function),
dropout on split activations (it swaps in the tp-distinct generator state, which a graph cannot
trace; it draws exactly eager's masks) and the attention core when it draws dropout masks (they
come from the tp-distinct stream, also at tp 1; selectively recomputed, it is torch's checkpoint with
megalm's RNG rewind). Without attention dropout the selectively recomputed core is torch's plain
checkpoint, which Dynamo traces into the layer's graph (the partitioner reruns it in backward). So at
tp = 1 without attention dropout (configs/gpt-125m.yaml) a layer is one graph with no break, whatever
the recompute mode; attention dropout adds a break (2 graphs); tp > 1 adds one per collective (at tp 2
with sequence parallel: 5 graphs, 8 with dropout). A break inside a nested call resumes tracing in that
frame (Dynamo's nested_graph_breaks, which compile_layers turns on): otherwise it would split every
enclosing frame too (9 graphs in 15 frames per layer at tp 2; 4 graphs at tp 1 with attention
dropout). tests/model/test_compile.py counts them.

Dropout on replicated activations (the residual stream without sequence parallel) runs inside the
graph from inductor's own random numbers: not eager's masks, but
seeded from torch's default generator, which is identical on every tp rank and saved in checkpoints,
so the masks agree across tp and a resumed run draws the same ones. Full recompute wraps the compiled
layer in the same checkpoint as an eager one; the rerun restores the generators, so it redraws them.

Compilation is lazy: the first forward and backward of step 1 compile (and a switch to evaluation or
a new sequence length compiles again); `compile_seconds` reads how long that took from torch.
"""

from __future__ import annotations

import sys

import torch

from megalm.model import layers
from megalm.model.gpt import GPTModel
from megalm.parallel import tensor, tp_overlap

# Functions a compiled layer calls but must not trace (see the module docstring). They are wrapped
# in torch.compiler.disable only once something compiles: importing torch._dynamo costs every
# process about a second, and eagerly the wrapped and the plain function are the same.
EAGER_ONLY = ((layers, "_distinct_dropout"), (layers, "_eager"), (tensor, "_run_conjugate"),
              (tensor, "_run_sequence_parallel_linear"), (tp_overlap, "gather_linears"),
              (tp_overlap, "linear_reduce_scatter"))

BACKENDS = ("inductor", "aot_eager", "eager")  # aot_eager / eager: tests and debugging (no code generation)
DEFAULT_BACKEND = "inductor"  # what train.compile uses


def _keep_eager() -> None:
    for module, name in EAGER_ONLY:
        function = getattr(module, name)
        if not hasattr(function, "__wrapped__"):
            setattr(module, name, torch.compiler.disable(function))


def compile_layers(chunks: list[GPTModel], backend: str | None = None) -> int:
    """Compile every transformer layer of this rank's chunks in place; returns how many."""
    backend = backend or DEFAULT_BACKEND
    if backend not in BACKENDS:
        raise ValueError(f"compile backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    _keep_eager()
    # A break inside a nested call (a collective in a linear layer in the attention) resumes tracing in
    # that frame instead of splitting every frame around it: at tp 2 a layer is 5 graphs around its 4
    # collectives instead of 9 graphs in 15 frames (tests/model/test_compile.py counts them).
    # (a torch without the option keeps the plain behaviour: more graphs, the same results)
    if hasattr(torch._dynamo.config, "nested_graph_breaks"):
        torch._dynamo.config.nested_graph_breaks = True
    count = 0
    for chunk in chunks:
        for layer in chunk.layers.values():
            if hasattr(layer.mlp, "fc1"):  # the GeLU MLP: bias + GeLU in one kernel (same parameters)
                layer.mlp.fc1.skip_bias_add = True
            layer.compile(backend=backend)
            count += 1
    return count


def compile_seconds() -> float:
    """Seconds this process has spent compiling so far: Dynamo's frame compiles (graph capture and
    the forward's code generation) plus the backward graphs compiled lazily at the first backward."""
    if "torch._dynamo" not in sys.modules:
        return 0.0
    from torch._dynamo.utils import compilation_time_metrics

    keys = ("_compile.compile_inner", "backward._backward_impl")  # torch's names (2.11 and 2.13)
    return sum(sum(compilation_time_metrics.get(key, ())) for key in keys)
