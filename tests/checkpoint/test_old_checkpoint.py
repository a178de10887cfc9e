"""Checkpoints saved before issue 23's model spec (main at ce7e5c9) load and resume bit for bit today.

The fixture (tests/fixtures/old_checkpoint_ce7e5c9, made by tests/fixtures/make_old_checkpoint.py with
that commit's code) holds two tiny fp32 runs saved at step 3, their config.yaml, and what training on
to step 6 gave then: the losses, the gradient norms and the final weights' sha256.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from megalm.checkpoint import Checkpointer
from megalm.checkpoint.state import PieceIndex, model_differences, named_params
from megalm.config import config_from_dict, config_to_dict, load_config
from megalm.distributed import ParallelGroups, build_parallel_groups
from megalm.testing import run_distributed
from megalm.topology import Topology
from megalm.train import build_trainer
from tests.fixtures import make_old_checkpoint as old

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "old_checkpoint_ce7e5c9"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
NAMES = sorted(EXPECTED["runs"])
SAVED = f"checkpoints/step_{EXPECTED['saved_step']:08d}"
# Said with a bit-for-bit failure: another torch may change a CPU kernel's rounding without any megalm change.
MADE_WITH = (f"(the fixture was made with {EXPECTED['made_by']}; this is torch {torch.__version__}: if only torch "
             f"changed, regenerate it with ce7e5c9's code as tests/fixtures/make_old_checkpoint.py says)")


def _metadata(name: str) -> dict:
    return json.loads((FIXTURE / name / SAVED / "metadata.json").read_text())


def _saved_params(name: str) -> dict[str, torch.Tensor]:
    """Every weight the fixture's checkpoint holds, full (tp=1) tensors by name."""
    path = FIXTURE / name / SAVED
    index = PieceIndex(path, _metadata(name)["files"])
    return {param: index.full(param, "param") for param, kind in index.pieces if kind == "param"}


@pytest.fixture
def one_thread():
    """Single-threaded kernels, as the fixture was made with (blocking may change a sum's order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_fixture_is_what_the_generator_describes() -> None:
    assert NAMES == sorted(old.MODELS) and EXPECTED["saved_step"] == old.SAVED_STEP
    assert "layernorm_eps" in (FIXTURE / "learned" / "config.yaml").read_text()  # the old spelling, kept as saved
    assert "layernorm_eps" in _metadata("learned")["config"]["model"]


@pytest.mark.parametrize("name", NAMES)
def test_the_old_config_loads_as_the_same_model(name: str) -> None:
    """The saved config.yaml and the checkpoint's config load today; rebuilt, they differ in no model field;
    the model they build has exactly the checkpoint's parameters at its shapes."""
    saved_model = _metadata(name)["config"]["model"]
    from_metadata = config_from_dict(_metadata(name)["config"], source=f"{name} metadata.json")
    from_yaml = load_config(FIXTURE / name / "config.yaml")
    assert from_yaml == from_metadata
    rebuilt = config_to_dict(from_yaml)["model"]
    assert model_differences(saved_model, rebuilt) == []
    assert model_differences(rebuilt, saved_model) == []
    assert from_yaml.model.norm_eps == saved_model.get("layernorm_eps", 1e-5)
    if name == "learned":
        assert from_yaml.model.norm_eps == 1e-6  # not the default: the old key was read, not dropped
    # the comparison can fail, and reads the old key: another epsilon under the old name is another model
    assert model_differences(dict(saved_model, layernorm_eps=2e-5), rebuilt) == [
        f"model.norm_eps: checkpoint 2e-05, this run {from_yaml.model.norm_eps}"]
    trainer = build_trainer(from_yaml, ParallelGroups.single(), None)
    shapes = {n: tuple(p.shape) for n, p in named_params(trainer.chunks)}
    assert shapes == {n: tuple(t.shape) for n, t in _saved_params(name).items()}


@pytest.mark.parametrize("name", NAMES)
def test_the_old_checkpoint_resumes_bit_for_bit(name: str, tmp_path: Path, one_thread) -> None:
    """Resumed today, steps 4..6 give the very losses, gradient norms and final weights they gave at ce7e5c9."""
    run_dir = tmp_path / name
    shutil.copytree(FIXTURE / name, run_dir)
    trainer, step = old.resume_run(run_dir)
    assert step == EXPECTED["saved_step"]
    for param, value in _saved_params(name).items():  # the weights as loaded, before any step
        assert torch.equal(dict(named_params(trainer.chunks))[param].detach(), value), param
    got, want = old.train_on(trainer, step), EXPECTED["runs"][name]
    assert got["steps"] == want["steps"] == list(range(step + 1, EXPECTED["final_step"] + 1))
    losses = {"today": [float.fromhex(x) for x in got["losses"]], "ce7e5c9": [float.fromhex(x) for x in want["losses"]]}
    assert got["losses"] == want["losses"], f"{losses} {MADE_WITH}"
    assert got["grad_norms"] == want["grad_norms"], MADE_WITH
    differ = sorted(p for p in want["param_sha256"] if got["param_sha256"].get(p) != want["param_sha256"][p])
    assert not differ and set(got["param_sha256"]) == set(want["param_sha256"]), f"weights differ: {differ} {MADE_WITH}"
    assert got["weights_sha256"] == want["weights_sha256"]


# ---- tp=2 reads the tp=1 checkpoint: each rank's shard is its slice of the full tensor -------------------------
def _tp2_worker(rank: int, world_size: int, root: str) -> dict:
    groups = build_parallel_groups(Topology(tp=2, pp=1, dp=1), rank, torch.device("cpu"))
    out = {}
    for name in NAMES:
        run_dir = Path(root) / name
        trainer = build_trainer(load_config(run_dir / "config.yaml", ["parallel.tp=2"]), groups, None)
        step = Checkpointer(trainer, run_dir).resume()
        params = {n: (p.detach().clone(), getattr(p, "tp_split_dim", None)) for n, p in named_params(trainer.chunks)}
        out[name] = {"step": step, "params": params}
    return out


def test_a_tp2_resume_of_the_old_checkpoint_loads_its_full_weights(tmp_path: Path) -> None:
    for name in NAMES:
        shutil.copytree(FIXTURE / name, tmp_path / name)
    ranks = run_distributed(_tp2_worker, 2, str(tmp_path), timeout=240)
    for name in NAMES:
        saved = _saved_params(name)
        assert [r[name]["step"] for r in ranks] == [EXPECTED["saved_step"]] * 2
        assert set(ranks[0][name]["params"]) == set(saved)
        split_weights = 0
        for param, full in saved.items():
            (first, split), (second, _) = ranks[0][name]["params"][param], ranks[1][name]["params"][param]
            if split is None:
                assert torch.equal(first, full) and torch.equal(second, full), (name, param)
                continue
            whole = torch.cat([first, second], dim=split)
            rows = min(whole.shape[0], full.shape[0])  # tp=2 pads the vocabulary to another multiple
            assert whole.shape[1:] == full.shape[1:] and torch.equal(whole[:rows], full[:rows]), (name, param)
            split_weights += 1
        assert split_weights >= 9, (name, split_weights)  # qkv, proj, fc1, fc2 per layer and the embedding
