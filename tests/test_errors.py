"""Ordinary mistakes end in one clear line that names the problem and the fix: no traceback, printed
once (not once per rank), and, where the mistake can be seen at start, before any process group
exists or the run directory is touched.

Most cases call `megalm.cli.main` in-process (what a worker runs), which is faithful for everything
before the process group; the launcher's once-per-job check runs torchrun for real.
"""

from __future__ import annotations

import builtins
import errno
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch.distributed as dist

from megalm.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
VOCAB = 1024
SHORT = ["train.steps=2", "optim.warmup_steps=1"]


def one_line(capsys) -> str:
    """The single line on stderr; fails on a traceback or on more than one line."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def refused(capsys, argv: list[str], *expected: str, code: int = 2) -> str:
    """Run `megalm ARGV`: it must exit `code` with one line containing each expected text."""
    assert main(argv) == code
    line = one_line(capsys)
    for text in expected:
        assert text in line, line
    assert not dist.is_initialized()  # refused before any process group
    return line


# ---- data ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A small corpus, two tokenizers of the same vocabulary size and the corpus tokenized with the first."""
    out = tmp_path_factory.mktemp("data")
    corpus = out / "corpus.jsonl"
    assert main(["data", "corpus", str(corpus), "--size-mb", "0.2", "--seed", "1"]) == 0
    for name, kind in (("tok", "bpe"), ("other", "unigram")):
        assert main(["tokenizer", "train", "--input", str(corpus), "--output", str(out / name),
                     "--vocab-size", str(VOCAB), "--model-type", kind]) == 0
    assert main(["preprocess", "--input", str(corpus), "--output-prefix", str(out / "corpus"),
                 "--tokenizer", str(out / "tok.model"), "--no-progress"]) == 0
    broken = out / "broken"
    broken.mkdir()
    bin_bytes, idx_bytes = (out / "corpus.bin").read_bytes(), (out / "corpus.idx").read_bytes()
    (broken / "nobin.idx").write_bytes(idx_bytes)
    (broken / "short.idx").write_bytes(idx_bytes)
    (broken / "short.bin").write_bytes(bin_bytes[: len(bin_bytes) // 2])
    (broken / "garbage.bin").write_bytes(bin_bytes)
    (broken / "garbage.idx").write_bytes(bytes(range(256)) * 4)
    (broken / "text.model").write_text("this is not a sentencepiece model\n")
    return out


@pytest.mark.parametrize(
    "paths, tokenizer, expected",
    [
        ("broken/nobin", "tok", ["nobin.bin: token file missing", "re-run `megalm preprocess`"]),
        ("broken/short", "tok", ["short.bin: size", "truncated or corrupt", "re-run `megalm preprocess`"]),
        ("corpus", "other", ["tokenized with a different tokenizer", "re-run megalm preprocess with this tokenizer"]),
        ("corpus", "broken/text", ["text.model is not a sentencepiece model", "pass the .model file written by"]),
        ("corpus.bin", "tok", ["without .bin", "data.paths=["]),
        ("broken/garbage", "tok", ["garbage.idx: not a megalm index file", "re-run `megalm preprocess`"]),
    ],
    ids=["missing-bin", "truncated-bin", "another-tokenizer", "not-sentencepiece", "bin-suffix", "garbage-idx"],
)
def test_data_errors_are_one_line_before_the_run_directory(data, paths, tokenizer, expected, tmp_path, capsys) -> None:
    run_dir = tmp_path / "run"
    overrides = [f"model.vocab_size={VOCAB}", "data.kind=indexed", f"data.paths=[{data / paths}]",
                 f"data.tokenizer={data / tokenizer}.model", *SHORT]
    line = refused(capsys, ["train", TINY, *overrides, "--run-dir", str(run_dir)], "megalm: data error: ", *expected)
    if paths == "corpus.bin":
        assert f"data.paths=[{data / 'corpus'}]" in line  # the fix, spelled out
    assert not run_dir.exists()


# ---- config files --------------------------------------------------------------------------------------
def test_config_file_mistakes_are_refused(tmp_path: Path, capsys) -> None:
    refused(capsys, ["check", str(tmp_path)], "megalm: config error: ", "is a directory: give a YAML file")
    (tmp_path / "latin1.yaml").write_bytes("model:\n  family: lm  # \xe9t\xe9\n".encode("latin-1"))
    refused(capsys, ["check", str(tmp_path / "latin1.yaml")], "latin1.yaml is not UTF-8 text (byte 0xe9",
            "saved as UTF-8")
    (tmp_path / "empty.yaml").write_text("# to do\n")
    refused(capsys, ["train", str(tmp_path / "empty.yaml"), "--run-dir", str(tmp_path / "run")],
            "empty.yaml is empty", "write at least `base: tiny.yaml`")
    assert not (tmp_path / "run").exists()  # no longer trains every default for 100 steps
    (tmp_path / "twice.yaml").write_text("base: " + TINY + "\nmodel:\n  hidden_size: 64\n  num_heads: 4\n"
                                         "  hidden_size: 128\n")
    refused(capsys, ["check", str(tmp_path / "twice.yaml")],
            "twice.yaml: key 'hidden_size' is given twice, on line 3 and line 5; keep one of them")


def test_a_huge_hidden_size_is_refused_not_overflowed_in_the_dry_run(capsys) -> None:
    refused(capsys, ["train", TINY, "model.hidden_size=4611686018427387904", "--dry-run"],
            "model too large to describe: the word embedding", "beyond torch's 2^63-byte limit")
    # the largest that can be described still dry-runs (on the meta device, nothing allocated)
    assert main(["check", TINY, "model.hidden_size=536870912", "train.global_batch_size=4"]) == 0
    assert "parameters: " in capsys.readouterr().out


@contextmanager
def time_limit(seconds: int):
    """Fail (instead of waiting minutes) when the body takes longer than `seconds`."""
    def expired(number, frame):  # noqa: ARG001
        raise TimeoutError(f"took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_the_divisor_hint_for_a_huge_hidden_size_is_instant(capsys) -> None:
    from megalm.config import _nearby_divisor

    start = time.perf_counter()
    with time_limit(5):  # the old search tried every number up to hidden_size: minutes here
        refused(capsys, ["check", TINY, "model.hidden_size=100000000009", "model.num_heads=6"],
                "model.hidden_size=100000000009 is not divisible by model.num_heads=6", "(e.g. 7)")
        assert _nearby_divisor(2**61 - 1, 10**9) == 1  # a prime: gcd fallback, no search over 10^9 numbers
    assert time.perf_counter() - start < 2.0
    assert _nearby_divisor(5120, 48) == 40 and _nearby_divisor(96, 7) == 6 and _nearby_divisor(12, 5) == 4


# ---- command line --------------------------------------------------------------------------------------
def test_overrides_after_an_option_are_accepted(tmp_path: Path, capsys) -> None:
    assert main(["check", TINY, "--world-size", "8", "parallel.tp=2", "train.global_batch_size=32"]) == 0
    assert "world 8 = tp 2 x pp 1 x dp 4" in capsys.readouterr().out
    run_dir = tmp_path / "run"
    argv = ["train", TINY, "train.steps=2", "--run-dir", str(run_dir), "optim.warmup_steps=1", "optim.lr=5e-4"]
    assert main(argv) == 0
    resolved = (run_dir / "config.yaml").read_text()
    assert "steps: 2" in resolved and "warmup_steps: 1" in resolved and "lr: 0.0005" in resolved
    capsys.readouterr()
    with pytest.raises(SystemExit):  # what is neither an option nor an override is still refused
        main(["train", TINY, "--run-dir", str(run_dir), "stray"])
    assert "unrecognized arguments: stray" in capsys.readouterr().err


def test_cuda_without_a_gpu_is_a_config_error(tmp_path: Path, capsys) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    refused(capsys, ["train", TINY, "train.device=cuda", "--run-dir", str(tmp_path / "run")],
            "megalm: config error: train.device=cuda but no GPU is visible", "use train.device=cpu or auto")
    assert not (tmp_path / "run").exists()


def test_more_local_ranks_than_gpus_is_a_config_error(tmp_path: Path, capsys, monkeypatch) -> None:
    """Seen on an H200 machine with one GPU: LOCAL_RANK=1 ended in torch's IndexError traceback."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    from megalm.config import ConfigError
    from megalm.distributed import resolve_device

    with pytest.raises(ConfigError, match=r"local rank 1 needs cuda:1 but only 1 GPU\(s\) are visible: launch at "
                                          r"most 1 processes per node \(--nproc-per-node\)"):
        resolve_device("cuda")


def test_a_run_dir_that_is_a_file_is_refused(tmp_path: Path, capsys) -> None:
    (tmp_path / "file").write_text("x")
    refused(capsys, ["train", TINY, *SHORT, "--run-dir", str(tmp_path / "file")],
            "run directory", "file is a file, not a directory: use another --run-dir")
    refused(capsys, ["train", TINY, *SHORT, "--run-dir", str(tmp_path / "file" / "run")],
            "cannot be created:", "is a file: use another --run-dir")


@contextmanager
def read_only(directory: Path):
    """Make creating anything inside `directory` fail with EROFS, as on a read-only mount (root ignores
    permission bits, so chmod cannot show it in a test run as root)."""
    real_open, real_mkdir = os.open, os.mkdir

    def inside(path) -> bool:
        return Path(os.fsdecode(path)).resolve().parent == directory.resolve()

    def guarded_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and inside(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if inside(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))
        return real_mkdir(path, *args, **kwargs)

    os.open, os.mkdir = guarded_open, guarded_mkdir
    try:
        yield
    finally:
        os.open, os.mkdir = real_open, real_mkdir


def test_a_read_only_checkpoint_directory_is_found_before_training(tmp_path: Path, capsys) -> None:
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    with read_only(checkpoints):
        refused(capsys, ["train", TINY, *SHORT, "--run-dir", str(tmp_path)],
                f"the checkpoint directory {checkpoints} is not writable (Read-only file system)",
                "make it writable or use another --run-dir")
    assert not (tmp_path / "metrics.jsonl").exists()  # not a step trained (before: failed at the first save)


def test_convert_into_a_missing_directory_says_so(tmp_path: Path, capsys) -> None:
    assert main(["train", TINY, *SHORT, "--run-dir", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    refused(capsys, ["convert", str(step), str(tmp_path / "missing" / "model.pt")],
            f"the directory {tmp_path / 'missing'} does not exist; create it first")
    refused(capsys, ["convert", str(step), str(tmp_path)], "is a directory: give the file to write")
    assert main(["convert", str(step), str(tmp_path / "model.pt")]) == 0


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("kill:1", "has 2 field(s)"),
        ("boom:0:1", "unknown kind 'boom'"),
        ("kill:first:3", "RANK must be a global rank or *, got 'first'"),
        ("kill:0:three", "STEP must be an optimizer step number"),
        ("sleep:0:1:soon", "SECONDS must be a number >= 0"),
    ],
)
def test_a_malformed_megalm_fault_is_refused_at_start(spec, expected, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("MEGALM_FAULT", spec)
    refused(capsys, ["train", TINY, *SHORT, "--run-dir", str(tmp_path / "run")],
            f"megalm: error: MEGALM_FAULT={spec!r}", expected, "expected KIND:RANK:STEP[:SECONDS], e.g. kill:1:5")
    assert not (tmp_path / "run").exists()


def test_only_local_rank_zero_reports_an_error_every_rank_meets(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "1")  # another worker of the same node: quiet, same exit code
    assert main(["check", TINY, "optim.lrr=1"]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(["check", TINY, "optim.lrr=1"]) == 2
    assert "did you mean 'optim.lr'" in one_line(capsys)


# ---- a full disk during a save -------------------------------------------------------------------------
def test_a_full_disk_says_no_space_left_and_keeps_the_previous_checkpoint(tmp_path: Path, capsys, monkeypatch) -> None:
    """The disk fills during the save of step 4: torch.save reports the failed write as "unexpected pos";
    megalm says "No space left on device", commits nothing, and step 2 stays `latest` and resumable."""
    real_open = builtins.open

    class FillsUp:
        """A file that takes 1,000 bytes, then fails every write with ENOSPC (as a full disk does)."""

        def __init__(self, handle) -> None:
            self.handle, self.room = handle, 1000

        def write(self, data) -> int:
            if len(data) > self.room:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.room -= len(data)
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.handle.close()

    def filling_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return FillsUp(handle) if ".tmp-step_00000004" in os.fspath(file) and "w" in mode else handle

    run = ["train", TINY, "train.steps=4", "optim.warmup_steps=1", "checkpoint.interval_steps=2",
           "--run-dir", str(tmp_path)]
    monkeypatch.setattr(builtins, "open", filling_open)
    assert main(run) == 2
    monkeypatch.setattr(builtins, "open", real_open)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "unexpected pos" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("megalm: error:")]
    assert len(errors) == 1, err
    assert "saving step 4 failed (rank 0 writing" in errors[0]
    assert "No space left on device (ENOSPC): free space on that filesystem" in errors[0]
    assert "nothing was committed and the previous checkpoint step_00000002 is intact" in errors[0]
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000002"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000002"]
    assert main(run) == 0  # space again: resumes from the intact step 2 and finishes
    assert "resumed from" in capsys.readouterr().out
    assert (checkpoints / "latest").read_text().strip() == "step_00000004"


# ---- the launcher: once per job, before any worker --------------------------------------------------------
def test_the_launcher_reports_a_mistake_once_before_starting_workers(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("MEGALM_FAULT", None)
    cmd = [sys.executable, "-m", "megalm.launch", "--standalone", "--nproc-per-node", "2", "-m", "megalm.cli",
           "train", "configs/tiny.yaml", "--run-dir", str(tmp_path / "run"), "parallel.tp=3"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "megalm: config error: model.num_heads=4 is not divisible by parallel.tp=3: each tensor-parallel rank "
        "needs whole heads; use a tp dividing 4"
    ]
    assert not (tmp_path / "run").exists()


def test_a_refusal_every_rank_agrees_on_is_printed_once_and_the_launcher_adds_one_line(tmp_path: Path) -> None:
    """The run directory is locked by another job: rank 0's verdict reaches every rank, rank 0 alone says
    it, and megalm.launch reports the failed workers in one line instead of torchrun's traceback."""
    from tests.checkpoint.test_store import lock_held_elsewhere

    run_dir = tmp_path / "run"
    with lock_held_elsewhere(run_dir, 1):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env.pop("MEGALM_FAULT", None)
        cmd = [sys.executable, "-m", "megalm.launch", "--standalone", "--nproc-per-node", "2", "-m", "megalm.cli",
               "train", "configs/tiny.yaml", *SHORT, "--run-dir", str(run_dir)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr
    refusals = [line for line in proc.stderr.splitlines() if line.startswith("megalm: error:")]
    assert len(refusals) == 1 and "is in use by another job (host elsewhere pid 1)" in refusals[0], proc.stderr
    assert re.search(r"^megalm\.launch: 2 worker\(s\) failed; the first: global rank \d \(local rank \d, pid \d+\) "
                     r"exited with code 2 at [\d:]{8}; its own report is above$", proc.stderr, re.M), proc.stderr
    assert not (run_dir / "metrics.jsonl").exists()
