"""prepare.py and pretrain.py through their CLIs: filters, dedup, bad input, loss, resume, DDP."""
import json
import os
import subprocess
import sys
from pathlib import Path

import mido
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import model as M  # noqa: E402
import prepare  # noqa: E402
import tokenizer as T  # noqa: E402
import training as TR  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
# a small, fast training configuration shared by the tests below
FAST = ["--preset", "tiny", "--seq_len", "64", "--batch_size", "4", "--warmup", "5", "--log_interval", "1",
        "--eval_interval", "0", "--eval_iters", "2", "--workers", "0", "--device", "cpu"]


def run(script, *args, ok=True, timeout=300):
    r = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                       env=ENV, timeout=timeout, cwd=ROOT)
    if ok:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def losses(out):
    return {d["step"]: d["loss"] for d in map(json.loads, open(Path(out) / "log.jsonl")) if "loss" in d}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "synth"
    run("prepare.py", "--synthetic", "60", "--out", out, "--workers", "2")
    return out


def simple_midi(path, pitches, step_ms=250, durs=(200,), velocity=64):
    mid = mido.MidiFile(type=0, ticks_per_beat=500)
    tr = mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=500000)])
    for i, p in enumerate(pitches):
        d = durs[i % len(durs)]
        tr.append(mido.Message("note_on", note=p, velocity=velocity, time=0 if i == 0 else step_ms - prev))
        tr.append(mido.Message("note_off", note=p, time=d))
        prev = d
    mid.tracks.append(tr)
    mid.save(path)


# -- prepare -------------------------------------------------------------------------------

def test_prepare_synthetic_dataset_layout(synth):
    meta = json.loads((synth / "meta.json").read_text())
    assert meta["vocab_hash"] == T.VOCAB_HASH
    for split in ("train", "val"):
        idx = np.load(synth / f"{split}.idx.npy")
        tokens = np.fromfile(synth / f"{split}.bin", dtype=np.uint16)
        assert idx[0] == 0 and idx[-1] == len(tokens) == meta["splits"][split]["tokens"]
        for a, b in zip(idx[:-1], idx[1:]):
            ids = tokens[a:b].tolist()
            assert ids[-1] == T.EOS_ID and T.BOS_ID in ids and ids.count(T.DIM_ID) == 1
    assert not (synth.parent / "synth.partial").exists()
    notes = T.detokenize_notes(tokens[idx[0]:idx[1]])[0]
    assert len(notes) > 50  # real music: chords, melody, pedal-lengthened notes


def test_prepare_filters_dedup_and_bad_files(tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    prepare.write_synthetic(3, src / "sub", seed=1)
    (src / "copy.mid").write_bytes((src / "sub" / "synthetic_00000.mid").read_bytes())  # exact duplicate
    simple_midi(src / "short.mid", [60, 62, 64])                                         # too few notes
    simple_midi(src / "loop.mid", [60, 64, 67, 72, 67, 64, 60, 55] * 40, durs=(50, 90, 130, 170, 210))  # a loop
    simple_midi(src / "black.mid", list(range(30, 100)) * 40, step_ms=5, durs=(2, 3, 4))                 # black MIDI
    (src / "junk.mid").write_bytes(b"not a midi file at all")
    (src / "cut.mid").write_bytes((src / "sub" / "synthetic_00001.mid").read_bytes()[:100])
    out = tmp_path / "ds"
    r = run("prepare.py", src, tmp_path / "missing_dir", "--out", out, "--workers", "2")
    assert "missing_dir: no such file or directory" in r.stderr and "Traceback" not in r.stderr
    decisions = {Path(d["file"]).name: d for d in map(json.loads, open(out / "files.jsonl"))}
    assert len(decisions) == 9
    kept = {n for n, d in decisions.items() if d["kept"]}
    assert kept == {"synthetic_00000.mid", "synthetic_00001.mid", "synthetic_00002.mid"} or \
        kept == {"copy.mid", "synthetic_00001.mid", "synthetic_00002.mid"}
    reason = lambda n: decisions[n].get("reason", "")
    assert "duplicate" in reason("copy.mid") or "duplicate" in reason("synthetic_00000.mid")
    assert "fewer than" in reason("short.mid")
    assert "repetitive" in reason("loop.mid")
    assert "denser" in reason("black.mid")
    assert reason("junk.mid").startswith("unreadable") and reason("cut.mid").startswith("unreadable")
    report = json.loads((out / "report.json").read_text())
    assert report["kept"] == 3 and report["dropped"] == 6
    # same inputs -> identical bytes (split by content hash, seeded <D>), whatever the workers
    run("prepare.py", src, "--out", tmp_path / "ds2", "--workers", "1")
    for name in ("train.bin", "val.bin", "train.idx.npy"):
        assert (out / name).read_bytes() == (tmp_path / "ds2" / name).read_bytes()
    # an existing dataset is not overwritten by accident
    r = run("prepare.py", src, "--out", out, ok=False)
    assert r.returncode != 0 and "already holds a dataset" in r.stderr


def test_prepare_empty_or_all_bad(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run("prepare.py", tmp_path / "empty", "--out", tmp_path / "ds", ok=False)
    assert r.returncode != 0 and "no MIDI files" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.mid").write_bytes(b"junk")
    r = run("prepare.py", tmp_path / "bad", "--out", tmp_path / "ds", ok=False)
    assert r.returncode != 0 and "no file survived" in r.stderr and not (tmp_path / "ds" / "meta.json").exists()


def test_prepare_empty_splits_have_their_own_line(tmp_path):
    # every kept file drawn into validation is not "no file survived ({})"
    r = run("prepare.py", "--synthetic", "6", "--out", tmp_path / "ds", "--val_fraction", "0.9999", "--workers", "1", ok=False)
    assert r.returncode == 1 and "all 6 kept files fell in the validation split" in r.stderr and "survived" not in r.stderr
    assert not (tmp_path / "ds" / "meta.json").exists()
    r = run("prepare.py", "--synthetic", "6", "--out", tmp_path / "ds2", "--val_fraction", "0", "--workers", "1")
    assert "the validation split is empty" in r.stderr and (tmp_path / "ds2" / "meta.json").is_file()
    r = run("prepare.py", "--synthetic", "6", "--out", tmp_path / "ds3", "--val_fraction", "1", ok=False)
    assert r.returncode == 1 and "--val_fraction 1.0" in r.stderr and "Traceback" not in r.stderr


def test_composition_cap():
    files = [f"f{i}.mid" for i in range(40)]
    meta = {f: {"composer": "chopin", "opus": "64", "piece": "2"} for f in files[:15]}
    meta.update({f: {"composer": "chopin", "opus": str(i), "piece": ""} for i, f in enumerate(files[15:30])})
    meta.update({f: {"composer": "chopin", "opus": "", "piece": ""} for f in files[30:35]})
    meta.update({f: {"composer": "satie", "opus": "", "piece": ""} for f in files[35:]})
    drop = prepare.composition_cap(files, meta, [], per_piece=10, composer_min=20)
    assert set(drop) == set(files[10:15]) | set(files[30:35])  # 5 over the cap, 5 untagged
    assert prepare.composition_cap(files, meta, [], per_piece=10, composer_min=30) == {}


@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data not present")
def test_prepare_real_files(tmp_path):
    src = tmp_path / "real"
    src.mkdir()
    for f in sorted((DATA / "pop909").rglob("*.mid"))[:4] + sorted((DATA / "piano_midi_de").rglob("*.mid"))[:4]:
        (src / f.name).write_bytes(f.read_bytes())
    run("prepare.py", src, "--out", tmp_path / "ds", "--workers", "2")
    report = json.loads((tmp_path / "ds" / "report.json").read_text())
    assert report["kept"] == 8, report


# -- pretrain ------------------------------------------------------------------------------

def test_loss_falls(synth, tmp_path):
    out = tmp_path / "run"
    run("pretrain.py", "--data", synth, "--out", out, *FAST, "--max_iters", "40", "--lr", "2e-3")
    loss = losses(out)
    assert np.mean([loss[s] for s in range(1, 6)]) - np.mean([loss[s] for s in range(36, 41)]) > 1.5
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 40 and ckpt["args"]["max_iters"] == 40
    m = M.load_model(out)
    assert m(torch.tensor([[T.BOS_ID]])).shape == (1, 1, T.VOCAB_SIZE)


def test_resume_is_exact(synth, tmp_path):
    args = ["--data", synth, *FAST, "--max_iters", "12", "--ckpt_interval", "3"]
    run("pretrain.py", *args, "--out", tmp_path / "full")
    run("pretrain.py", *args, "--out", tmp_path / "split", "--stop_at", "6")
    # nothing else typed but the device, a per-run option (a run may resume on another machine)
    r = run("pretrain.py", "--out", tmp_path / "split", "--resume", "--device", "cpu")
    assert "resuming" in r.stdout and "at step 6" in r.stdout
    full, split = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert sorted(split) == list(range(1, 13))
    assert [split[s] for s in range(1, 13)] == [full[s] for s in range(1, 13)]


def test_resume_with_loader_workers_matches(synth, tmp_path):
    args = ["--data", synth, *FAST, "--max_iters", "4"]
    run("pretrain.py", *args, "--out", tmp_path / "w0")
    run("pretrain.py", *args, "--out", tmp_path / "w2", "--workers", "2")
    assert losses(tmp_path / "w0") == losses(tmp_path / "w2")


def test_ddp_two_gloo_processes_match_one_and_log_per_process_rates(synth, tmp_path):
    args = ["--data", synth, *FAST, "--max_iters", "3", "--peak_tflops", "1"]
    run("pretrain.py", *args, "--out", tmp_path / "one", "--batch_size", "4", "--micro_batch", "2")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
                        str(ROOT / "pretrain.py"), *map(str, args), "--batch_size", "2", "--out", str(tmp_path / "two")],
                       capture_output=True, text=True, env=ENV, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("step 1 |") == 1  # only rank 0 prints
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert one.keys() == two.keys()
    assert all(abs(one[s] - two[s]) < 1e-4 for s in one), (one, two)
    a, b = M.load_model(tmp_path / "one"), M.load_model(tmp_path / "two")
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-5), k
    # tokens/s and MFU are one process's: its 2 x 64 tokens per step, not the global batch's 4 x 64
    rec = [d for d in map(json.loads, open(tmp_path / "two" / "log.jsonl")) if "tok_s" in d][-1]
    assert rec["tok_s"] * rec["ms"] / 1e3 == pytest.approx(2 * 64, rel=0.02)
    assert rec["mfu"] == pytest.approx(TR.flops_per_token(M.PRESETS["tiny"], 64) * rec["tok_s"] / 1e12, rel=1e-3, abs=1e-4)


def test_interrupted_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    m = M.Aria(M.PRESETS["tiny"])
    M.save_checkpoint(tmp_path / "ckpt.pt", m, step=1)

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        M.save_checkpoint(tmp_path / "ckpt.pt", m, step=2)
    monkeypatch.undo()
    assert M.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 1


def test_bad_pretrain_inputs(tmp_path):
    r = run("pretrain.py", "--data", tmp_path / "nothing", "--out", tmp_path / "o", ok=False)
    assert r.returncode != 0 and "not a dataset" in r.stderr and "Traceback" not in r.stderr
    r = run("pretrain.py", "--out", tmp_path / "o", "--resume", ok=False)
    assert r.returncode != 0 and "nothing to resume" in r.stderr and "Traceback" not in r.stderr
    r = run("pretrain.py", "--preset", "huge", ok=False)
    assert r.returncode == 2 and "invalid choice" in r.stderr


# -- every documented option has an effect -------------------------------------------------

def test_quick_start_with_no_arguments(tmp_path, monkeypatch, capsys):
    # `python pretrain.py` alone: makes data/synthetic, trains tiny, writes out/pretrain (here shortened)
    import pretrain as P
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(P, "QUICKSTART_FILES", 60)
    monkeypatch.setattr(P, "QUICKSTART", {**P.QUICKSTART, "max_iters": 4, "eval_interval": 2, "log_interval": 2,
                                          "ckpt_interval": 2, "device": "cpu", "workers": 0, "seq_len": 64})
    monkeypatch.setattr(sys, "argv", ["pretrain.py"])
    P.main()
    assert (tmp_path / "data" / "synthetic" / "meta.json").is_file()
    log = [json.loads(line) for line in open(tmp_path / "out" / "pretrain" / "log.jsonl")]
    assert [d["step"] for d in log if "val_loss" in d] == [2, 4]  # val_loss every --eval_interval and at the end
    assert M.load_checkpoint(tmp_path / "out" / "pretrain")["args"]["preset"] == "tiny"
    assert "val_loss" in capsys.readouterr().out


def test_grad_clip_and_no_augment_have_effects(synth, tmp_path):
    args = ["--data", synth, *FAST, "--max_iters", "1", "--warmup", "1", "--weight_decay", "0", "--batch_size", "2"]
    run("pretrain.py", *args, "--out", tmp_path / "free")
    run("pretrain.py", *args, "--out", tmp_path / "clip", "--grad_clip", "1e-7")
    run("pretrain.py", *args, "--out", tmp_path / "plain", "--no_augment")
    torch.manual_seed(0)
    init = M.Aria(M.PRESETS["tiny"]).state_dict()
    moved = {}
    for name in ("free", "clip"):
        sd = M.load_model(tmp_path / name).state_dict()
        moved[name] = sum((sd[k] - init[k]).abs().sum().item() for k in init)
    # Adam normalises the step, so only a gradient clipped far below eps=1e-5 shows: the update vanishes
    assert moved["free"] > 0 and moved["clip"] < 0.01 * moved["free"]
    assert losses(tmp_path / "free")[1] == losses(tmp_path / "clip")[1]  # same batch, same forward
    assert losses(tmp_path / "plain")[1] != losses(tmp_path / "free")[1]  # augmentation changes the batch


@pytest.mark.parametrize("script", ["pretrain.py", "finetune_gen.py", "finetune_contrastive.py", "finetune_cls.py",
                                    "sample.py", "embed.py", "prepare.py", "reproduce.py"])
def test_help_lists_every_option_with_its_default(script):
    text = run(script, "--help").stdout.split("options:")[1]
    blocks = {}  # option -> its help text
    for line in text.splitlines():
        if line.startswith("  -"):
            opt = line.split()[0].rstrip(",")
            blocks[opt] = line
        elif blocks:
            blocks[opt] += " " + line.strip()
    assert len(blocks) > 5
    assert all("(default:" in h for opt, h in blocks.items() if opt != "-h"), [o for o, h in blocks.items() if "(default:" not in h]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line(synth, tmp_path):
    r = run("pretrain.py", "--data", synth, "--out", tmp_path / "o", "--device", "cuda", ok=False)
    assert r.returncode == 1 and r.stderr.strip() == "--device cuda: not available on this machine"
