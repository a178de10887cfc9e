"""Record the p2p issued by the executor at commit e425221 (single isend/irecv), for the checker's fixture.

Runs only against that commit's megalm/parallel/pipeline.py (it patches its dist and wait_for); kept to show how
legacy_1f1b_pp2_m2.json was made. With an argument it also checks the whole grid (724 configurations, 404 failed).
"""
import sys, torch
import megalm.parallel.pipeline as pipeline
from megalm.data.batch import Batch
from megalm.distributed import ParallelGroups
from megalm.parallel.p2p_check import StubChunk, key_text, save_trace, check_trace, sends_held_past_compute
from megalm.topology import Topology

def record_legacy(schedule, pp, m, v, shape):
    trace = {}
    last = pp * v - 1
    tokens = torch.zeros(shape[1], shape[0], dtype=torch.long)
    batches = [Batch(tokens, tokens, torch.ones(tokens.shape)) for _ in range(m)]
    for rank in range(pp):
        events = []
        counter = [0]
        state = {}
        from collections import deque as _deque
        class RecDeque(_deque):
            def popleft(self):
                state["recv_key"] = super().popleft(); return state["recv_key"]
        pipeline.deque = RecDeque
        class Work:
            def __init__(self, i): self.id = i
        def op(kind, tensor, peer):
            # keys are not on the wire: derive the key the old code meant from its posting order
            i = counter[0]; counter[0] += 1
            key = key_text(state["recv_key"] if kind == "recv" else ex._sends(rank, state["action"])[1])
            events.append({"issue": [{"id": i, "op": kind, "peer": peer, "key": key, "bytes": tensor.numel() * tensor.element_size()}]})
            return Work(i)
        class FakeDist:
            @staticmethod
            def isend(tensor, dst, group=None): return op("send", tensor, dst)
            @staticmethod
            def irecv(tensor, src, group=None): tensor.zero_(); return op("recv", tensor, src)
        pipeline.dist = FakeDist
        pipeline.wait_for = lambda work, what: events.append({"wait": work.id})
        groups = ParallelGroups(topology=Topology(1, pp, 1), rank=rank, device=torch.device("cpu"), pp_ranks=tuple(range(pp)))
        chunks = [StubChunk(shape, events, c * pp + rank == 0, c * pp + rank == last, f"chunk {c}") for c in range(v)]
        ex = pipeline.PipelineExecutor(chunks, groups, schedule, m, shape)
        # record the keys: wrap _recv/_send to label the last issued op
        orig_f, orig_b = ex._forward, ex._backward
        def _forward(action, *a):
            state["action"] = action; return orig_f(action, *a)
        def _backward(action):
            state["action"] = action; return orig_b(action)
        ex._forward, ex._backward = _forward, _backward
        ex.run(batches, lambda losses, batch: losses.sum())
        trace[rank] = events
    return trace

if __name__ == "__main__":
    trace = record_legacy("1f1b", 2, 2, 1, (4, 1, 2))
    print(trace)
    save_trace("tests/parallel/data/legacy_1f1b_pp2_m2.json", trace, {
        "what": "p2p issued by megalm's PipelineExecutor before issue 12 (commit e425221: single isend/irecv, "
                "receives posted lazily, sends waited at the end of the step), 1f1b, pp=2, m=2, v=1, "
                "activation shape [4, 1, 2] fp32, each pp rank run with stub chunks; peers are global ranks",
        "schedule": "1f1b", "pp": 2, "microbatches": 2, "virtual_stages": 1, "shape": [4, 1, 2]})
    import sys
    if len(sys.argv) > 1:
        bad = 0; total = 0
        for sched in ("gpipe", "1f1b", "interleaved"):
            for pp in range(1, 9):
                for v in ((1,) if sched != "interleaved" else (1, 2, 3, 4)):
                    for m in range(1, 33):
                        if sched == "interleaved" and (pp < 2 or m % pp): continue
                        t = record_legacy(sched, pp, m, v, (4, 1, 2)); total += 1
                        if not check_trace(t).ok: bad += 1
        print("legacy grid", total, "configs,", bad, "with problems")
    r = check_trace(trace); print(r.problems); print(sends_held_past_compute(trace))
