"""Published 3D-parallel runs the model is checked against (tests/test_plan.py, docs/plan.md).

All rows use configs/clusters/a100-80gb.yaml unchanged and Megatron-style numerics (fp16 params,
fp32 master), materialised attention, dropout 0.1 and full recompute, as those runs did. The
Megatron-LM table gives no micro-batch size or virtual-stage count: the planner picks the fastest
of micro batch 1/2/4/8 and v 1/2/4/8 at the published tp/pp/dp (the same rule for every row).
"""

from __future__ import annotations

from dataclasses import dataclass

from megalm.config import ModelConfig
from megalm.plan.cluster import get_numerics, load_cluster
from megalm.plan.layout import Layout
from megalm.plan.model import StepTime, step_time

YUAN_PUBLISHED = {"step": 46.20, "compute": 36.67, "bubble": 2.83, "pipeline_comm": 2.64, "tensor_comm": 2.60, "data_comm": 0.46}


def _model(layers: int, hidden: int, heads: int, vocab: int = 51200) -> ModelConfig:
    return ModelConfig(num_layers=layers, hidden_size=hidden, num_heads=heads, vocab_size=vocab, seq_length=2048,
                       hidden_dropout=0.1, attention_dropout=0.1)


@dataclass
class Row:
    name: str
    metric: str  # "step s" or "TFLOP/s per GPU"
    predicted: float
    published: float
    layout: Layout
    time: StepTime

    @property
    def error(self) -> float:
        return self.predicted / self.published - 1


MEGATRON_ROWS = [  # name, model, tp, pp, GPUs, global batch, published TFLOP/s per GPU
    ("Megatron 1.7B", _model(24, 2304, 24), 1, 1, 32, 512, 137.0),
    ("Megatron 18.4B", _model(40, 6144, 48), 8, 1, 256, 1024, 135.0),
    ("Megatron 145.6B", _model(80, 12288, 96), 8, 8, 1536, 2304, 148.0),
    ("Megatron 1008B", _model(128, 25600, 160), 8, 64, 3072, 3072, 163.0),
]
YUAN_245B = _model(76, 16384, 128, vocab=53005)


def yuan_layout() -> Layout:
    return Layout(8, 38, 7, 1, 3360, "1f1b", 1, "full")


def validation_rows(cluster_name: str = "a100-80gb") -> list[Row]:
    cluster, numerics = load_cluster(cluster_name), get_numerics("megatron")
    rows = []
    yuan = step_time(YUAN_245B, yuan_layout(), cluster, numerics, "fp16")
    rows.append(Row("Yuan 1.0 245B step", "step s", yuan.total, YUAN_PUBLISHED["step"], yuan_layout(), yuan))
    for name, model, tp, pp, gpus, batch, published in MEGATRON_ROWS:
        dp, best = gpus // (tp * pp), None
        for mb in (1, 2, 4, 8):
            for v in ((1,) if pp == 1 else (1, 2, 4, 8)):
                layout = Layout(tp, pp, dp, mb, batch, "interleaved" if pp > 1 else "1f1b", v, "full")
                try:
                    layout.check(model)
                except ValueError:
                    continue
                time = step_time(model, layout, cluster, numerics, "fp16")
                if best is None or time.total < best[1].total:
                    best = (layout, time)
        rows.append(Row(name, "TFLOP/s per GPU", best[1].hardware_tflops, published, *best))
    return rows


def markdown_table(rows: list[Row]) -> str:
    lines = ["| run | metric | predicted | published | error | layout used |", "| --- | --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r.name} | {r.metric} | {r.predicted:.2f} | {r.published:.2f} | {100 * r.error:+.1f}% | {r.layout.short()} |")
    yuan = rows[0].time
    for part in ("compute", "bubble", "pipeline_comm", "tensor_comm", "data_comm"):
        got, pub = getattr(yuan, part), YUAN_PUBLISHED[part]
        lines.append(f"| Yuan 245B {part} (published: their model's breakdown) | s | {got:.2f} | {pub:.2f} | {100 * (got / pub - 1):+.1f}% | same |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table(validation_rows()))
