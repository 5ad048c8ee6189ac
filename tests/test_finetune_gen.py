"""finetune_gen.py: <D> placement in every training example, file-start sequences, the CLI."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import finetune_gen as G  # noqa: E402
import tokenizer as T  # noqa: E402

GOLDEN = ROOT.parent / "shared" / "aria" / "golden" / "model"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(script, *args, ok=True):
    r = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                       env=ENV, timeout=600, cwd=ROOT)
    if ok:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "ds"
    run("prepare.py", "--synthetic", "12", "--out", out, "--workers", "1", "--val_fraction", "0.2")
    return out


def dim_is_where_the_rule_puts_it(seq):
    """<D> once, 90..110 body tokens before <E> (moved to the start of the event it would split)."""
    e = seq.index(T.EOS_ID)
    d = seq.index(T.DIM_ID)
    assert seq.count(T.DIM_ID) == 1 and d < e
    after = e - d - 1  # body tokens after <D>
    assert 89 <= after <= 112, after
    assert T.TOKEN_CLASS[seq[d + 1]] in (T.NOTE, T.DRUM) or seq[d + 1] == T.SEG_ID
    assert T.TOKEN_CLASS[seq[d - 1]] in (T.DUR, T.ONSET, T.SPECIAL)  # the previous event is complete


def test_place_dim_follows_the_official_rule(data):
    tokens = np.fromfile(data / "train.bin", dtype=np.uint16)
    idx = np.load(data / "train.idx.npy")
    ids = tokens[idx[0]:idx[1]].tolist()
    positions = set()
    for seed in range(30):
        seq = G.place_dim(ids, random.Random(seed))
        dim_is_where_the_rule_puts_it(seq)
        positions.add(seq.index(T.DIM_ID))
        assert [i for i in seq if i != T.DIM_ID] == [i for i in ids if i != T.DIM_ID]
    assert len(positions) > 5  # drawn afresh, ±10 tokens
    short = [T.INSTRUMENT_PREFIX_ID["piano"], T.BOS_ID] + ids[2:50] + [T.EOS_ID]
    assert T.DIM_ID not in G.place_dim(short, random.Random(0))  # bodies of <= 150 tokens get none


def test_every_training_example_starts_a_file_and_carries_d_before_its_end(data):
    ds = G.FileSequences(data, "train", 256, seed=0, augment=False)
    lengths = np.diff(np.load(data / "train.idx.npy"))
    assert len(ds) == sum(max(1, -(-(n - 1) // 256)) for n in lengths)
    for g in range(2 * len(ds)):  # two epochs
        seq = ds[g].tolist()
        assert len(seq) == 257
        f, k = ds.items[ds.perms[g // len(ds)][g % len(ds)]]
        if k == 0:
            assert seq[0] == T.INSTRUMENT_PREFIX_ID["piano"] and seq[1] == T.BOS_ID
        if T.EOS_ID in seq:
            dim_is_where_the_rule_puts_it(seq)
            assert all(i == T.PAD_ID for i in seq[seq.index(T.EOS_ID) + 1:])
    aug = G.FileSequences(data, "train", 256, seed=0, augment=True)
    assert all(len(aug[g]) == 257 for g in range(10))


def test_cli_from_official_checkpoint_loss_falls(data, tmp_path):
    if not (GOLDEN / "lm_tiny.safetensors").is_file():
        pytest.skip("../shared not present")
    out = tmp_path / "gen"
    run("finetune_gen.py", "--init", GOLDEN / "lm_tiny.safetensors", "--data", data, "--out", out,
        "--seq_len", "128", "--batch_size", "4", "--max_iters", "30", "--warmup", "3", "--lr", "3e-3",
        "--log_interval", "1", "--workers", "0", "--eval_iters", "1", "--no_augment", "--device", "cpu")
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    loss = {d["step"]: d["loss"] for d in log if "loss" in d}
    assert np.mean([loss[s] for s in (1, 2, 3)]) - np.mean([loss[s] for s in (28, 29, 30)]) > 1.0
    assert any("val_loss" in d for d in log)
    assert log[-1]["step"] == 30 and (out / "ckpt.pt").is_file()


def test_cli_bad_inputs(tmp_path, data):
    r = run("finetune_gen.py", "--init", tmp_path / "missing.pt", "--data", data, "--out", tmp_path / "o", "--device", "cpu",
            ok=False)
    assert r.returncode == 1 and "no such file" in r.stderr and "Traceback" not in r.stderr
    r = run("finetune_gen.py", "--data", data, ok=False)
    assert r.returncode == 2 and "--init" in r.stderr


def test_sample_end_reaches_eos_after_the_finetune(tmp_path):
    """A model finetuned on short whole pieces learns to end after <D>: continuing from <D>,
    sample.py's generate(end=True) reaches <E> within the length."""
    import torch
    import model as M
    import prepare
    import sample as S
    torch.manual_seed(0)
    M.save_checkpoint(tmp_path / "init" / "ckpt.pt", M.Aria(M.PRESETS["tiny"]))
    prepare.write_synthetic(4, tmp_path / "long", seed=3)
    (tmp_path / "short").mkdir()
    for f in sorted((tmp_path / "long").glob("*.mid")):  # 90 notes: whole pieces fit one sequence
        score = T.load_midi(f)
        T.detokenize(T.tokenize(score.with_notes(score.notes[:90]), dim=False)).save(tmp_path / "short" / f.name)
    run("prepare.py", tmp_path / "short", "--out", tmp_path / "ds", "--workers", "1", "--val_fraction", "0")
    run("finetune_gen.py", "--init", tmp_path / "init", "--data", tmp_path / "ds", "--out", tmp_path / "gen",
        "--seq_len", "320", "--batch_size", "4", "--max_iters", "60", "--warmup", "5", "--lr", "3e-3",
        "--log_interval", "20", "--workers", "0", "--no_augment", "--eval_iters", "0", "--device", "cpu")
    m = M.load_model(tmp_path / "gen")
    tokens = np.fromfile(tmp_path / "ds" / "train.bin", dtype=np.uint16)
    idx = np.load(tmp_path / "ds" / "train.idx.npy")
    assert all(np.diff(idx) <= 321)
    ended = 0
    for f in range(len(idx) - 1):
        ids = G.place_dim(tokens[idx[f]:idx[f + 1]].tolist(), random.Random(f))
        d = ids.index(T.DIM_ID)
        greedy = S.generate(m, ids[:d + 1], length=150, end=True, temp=0, device="cpu")[0]
        ended += greedy[-1] == T.EOS_ID and len(greedy) - d - 1 <= 150
        sampled = S.generate(m, ids[:d + 1], n_variations=2, length=150, end=True, seed=f, device="cpu")
        assert all(T.detokenize_notes(r)[0] for r in sampled)
    assert ended >= 3, ended  # of 4 pieces (a 60-step model; greedy ends all 4 here)


def test_resume_is_exact(data, tmp_path):
    import torch
    import model as M
    torch.manual_seed(0)
    M.save_checkpoint(tmp_path / "init.pt", M.Aria(M.PRESETS["tiny"]))
    args = ["--init", tmp_path / "init.pt", "--data", data, "--seq_len", "128", "--batch_size", "2", "--max_iters", "6",
            "--warmup", "2", "--log_interval", "1", "--workers", "0", "--device", "cpu", "--eval_iters", "1"]
    run("finetune_gen.py", *args, "--out", tmp_path / "full")
    run("finetune_gen.py", *args, "--out", tmp_path / "split", "--stop_at", "3")
    r = run("finetune_gen.py", "--out", tmp_path / "split", "--resume", "--device", "cpu")
    assert "at step 3" in r.stdout
    losses = [{d["step"]: d["loss"] for d in map(json.loads, open(tmp_path / o / "log.jsonl")) if "loss" in d}
              for o in ("full", "split")]
    assert sorted(losses[1]) == list(range(1, 7)) and losses[0] == losses[1]
