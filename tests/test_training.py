"""What the four training loops share, checked in each, in-process on CPU: no step waits for the
device (no host read of a value the step computes), an out-of-memory error is one line naming the
options to change, and the micro-batch plan is printed and obeyed."""
import contextlib
import json
import sys
import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import finetune_cls as FC  # noqa: E402
import finetune_contrastive as C  # noqa: E402
import finetune_gen as G  # noqa: E402
import model as M  # noqa: E402
import prepare  # noqa: E402
import pretrain as P  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
STAGES = {"pretrain.py": P, "finetune_gen.py": G, "finetune_contrastive.py": C, "finetune_cls.py": FC}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A prepared dataset, its MIDI files with a two-class labels CSV (no split column), a tiny LM."""
    tmp = tmp_path_factory.mktemp("training")
    prepare.write_synthetic(12, tmp / "midi", seed=0)
    files = sorted((tmp / "midi").glob("*.mid"))
    (tmp / "labels.csv").write_text("path,label\n" + "".join(f"midi/{f.name},{'ab'[i % 2]}\n" for i, f in enumerate(files)))
    argv, sys.argv = sys.argv, ["prepare.py", str(tmp / "midi"), "--out", str(tmp / "ds"), "--workers", "1", "--val_fraction", "0.2"]
    try:
        prepare.main()
    finally:
        sys.argv = argv
    torch.manual_seed(0)
    M.save_checkpoint(tmp / "lm.pt", M.Aria(M.PRESETS["tiny"]))
    return tmp


def stage_argv(script, tmp, out, *extra):
    """Three steps of 4 sequences (pretrain, gen, cls: in micro-batches of 2; contrastive: 2 micro-steps of 4 pairs)."""
    own = {"pretrain.py": ["--data", tmp / "ds", "--preset", "tiny", "--seq_len", 64, "--micro_batch", 2, "--eval_interval", 0,
                           "--eval_iters", 1],
           "finetune_gen.py": ["--init", tmp / "lm.pt", "--data", tmp / "ds", "--seq_len", 64, "--micro_batch", 2, "--eval_iters", 1],
           "finetune_contrastive.py": ["--init", tmp / "lm.pt", "--data", tmp / "ds", "--max_len", 128, "--min_notes", 20,
                                       "--max_notes", 40, "--eval_files", 4, "--grad_accum", 2],
           "finetune_cls.py": ["--init", tmp / "lm.pt", "--labels", tmp / "labels.csv", "--slice_len", 64, "--micro_batch", 2,
                               "--epochs", 100]}[script]
    return [script, "--out", out, "--max_iters", 3, "--log_interval", 3, "--workers", 0, "--device", "cpu", "--batch_size", 4,
            *own, *extra]


class HostReads(TorchDispatchMode):
    """Records each read of a tensor's value by the host made inside a training step (from the
    model's training forward to the optimizer step): .item(), int(), float() and bool() of a tensor
    all dispatch aten._local_scalar_dense, which on a GPU waits for the device. Host arithmetic on
    the loader's CPU tensors goes through .numpy() (which refuses a device tensor) and is not seen."""

    def __init__(self):
        super().__init__()
        self.in_step, self.reads, self.steps = False, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and self.in_step:
            self.reads.append("".join(traceback.format_stack(limit=10)[:-1]))
        return func(*args, **(kwargs or {}))


def run_stage(argv, monkeypatch, mode=None):
    monkeypatch.setattr(sys, "argv", list(map(str, argv)))
    if mode:  # a step: from a training forward (the trunk's hidden states) to the optimizer step
        hidden, opt_step = M.Aria.hidden, torch.optim.AdamW.step

        def hidden_(self, *a, **k):
            mode.in_step |= self.training and torch.is_grad_enabled()
            return hidden(self, *a, **k)

        def opt_step_(self, *a, **k):  # CPU AdamW reads its step counter; CUDA's fused one does not
            mode.in_step, mode.steps = False, mode.steps + 1
            return opt_step(self, *a, **k)
        monkeypatch.setattr(M.Aria, "hidden", hidden_)
        monkeypatch.setattr(torch.optim.AdamW, "step", opt_step_)
    with mode or contextlib.nullcontext():
        STAGES[argv[0]].main()


def test_the_host_read_detector_sees_a_read():
    mode = HostReads()
    mode.in_step = True
    with mode:
        x = torch.arange(5.0) * 2
        int(x.max()), x.sum().item(), bool(x[0] > 1)
        n = int((x.numpy() > 3).sum())  # host arithmetic on a CPU tensor: not a device read
    assert len(mode.reads) == 3 and n == 3


@pytest.mark.parametrize("script", list(STAGES))
def test_no_step_waits_for_the_device_and_the_plan_is_printed(script, inputs, tmp_path, monkeypatch, capsys):
    mode = HostReads()
    run_stage(stage_argv(script, inputs, tmp_path / "o"), monkeypatch, mode)
    assert mode.steps == 3 and not mode.reads, f"{len(mode.reads)} host reads in a step, the first:\n{mode.reads[:1]}"
    out = capsys.readouterr().out
    plan = "micro-batches of 8 x 128 (1 per step)" if script == "finetune_contrastive.py" else "micro-batches of 2 x 64 (2 per step)"
    assert f"{plan}, activation checkpointing off" in out, out
    log = [json.loads(line) for line in open(tmp_path / "o" / "log.jsonl")]
    assert [d["step"] for d in log if "loss" in d] == [3]


@pytest.mark.parametrize("script", list(STAGES))
def test_out_of_memory_is_one_line_naming_the_options(script, inputs, tmp_path, monkeypatch):
    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(M.Aria, "hidden", oom)
    with pytest.raises(SystemExit) as e:
        run_stage(stage_argv(script, inputs, tmp_path / "o"), monkeypatch)
    msg = str(e.value.code)
    assert msg.startswith(f"{script}: out of GPU memory") and "--grad_checkpoint 1" in msg and "\n" not in msg, msg
    assert ("--batch_size" if script == "finetune_contrastive.py" else "--micro_batch") in msg


def test_grad_checkpoint_option_recomputes_with_the_same_losses(inputs, tmp_path, monkeypatch, capsys):
    losses = {}
    for flag in ("0", "1"):
        run_stage(stage_argv("pretrain.py", inputs, tmp_path / flag, "--grad_checkpoint", flag, "--log_interval", 1), monkeypatch)
        assert f"activation checkpointing {'on' if flag == '1' else 'off'}" in capsys.readouterr().out
        losses[flag] = [d["loss"] for d in map(json.loads, open(tmp_path / flag / "log.jsonl")) if "loss" in d]
    assert len(losses["1"]) == 3 and losses["1"] == pytest.approx(losses["0"], rel=1e-5)
    with pytest.raises(SystemExit, match="--micro_batch 3 does not divide --batch_size 4"):
        run_stage(stage_argv("pretrain.py", inputs, tmp_path / "x", "--micro_batch", 3), monkeypatch)
