"""The pedal vocabulary end to end (issue: pedal tokens and the official demo checkpoint): a
checkpoint of the demo's kind (17,729 tokens, with or without the embedding adapter, official
format) loads and says it speaks the pedal; sample.py and live.py tokenize for it without a
flag; the grammar lets pedal events in, each followed by an onset, ON and OFF alternating; a
mismatch between ids and model is one clear line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import mido
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import grammar as G  # noqa: E402
import model as M  # noqa: E402
import sample as S  # noqa: E402
import tokenizer as T  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=1024)


class PedalHungry(M.Aria):
    """Prefers the pedal tokens whenever the grammar lets them in: the rig for the pedal grammar."""

    def forward(self, *args, **kw):
        out = super().forward(*args, **kw)
        out[..., T.PED_ON_ID:] += 12.0
        return out


def pedal_midi(path):
    notes = [(i * 200, i * 200 + 300, 50 + (i * 5) % 20, 70, 0) for i in range(30)]
    T.notes_to_midi(notes, {0: 0}, [(0, 1), (1900, 0), (2000, 1)]).save(str(path))  # ends with the pedal down
    return path


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Official-format files of the demo's kind, tiny: weights in safetensors, the official
    ModelConfig JSON without vocab_size (the official code sets it from the tokenizer), and
    the demo's tokenizer config.json (include_pedal) beside them."""
    pytest.importorskip("safetensors")
    d = tmp_path_factory.mktemp("demo")
    torch.manual_seed(0)
    for name, heads in (("with_adapter", ("lm", "adapter")), ("plain", ("lm",))):
        (d / name).mkdir()
        m = M.Aria(M.ModelConfig(**SMALL, vocab_size=T.PEDAL_VOCAB_SIZE, emb_size=32), heads).eval()
        M.export_safetensors(m, d / name / "model-demo.safetensors")
        cfg = json.loads((d / name / "model-demo.json").read_text())
        del cfg["vocab_size"]
        (d / name / "model-demo.json").write_text(json.dumps(cfg))
        (d / name / "config.json").write_text(json.dumps({"tokenizer": {"abs": {"include_pedal": True}}}))
    pedal_midi(d / "prompt.mid")
    return d


@pytest.mark.parametrize("name", ["with_adapter", "plain"])
def test_demo_checkpoint_loads_and_speaks_the_pedal(demo, name):
    m = M.load_model(demo / name / "model-demo.safetensors")
    assert m.pedal and m.config.vocab_size == T.PEDAL_VOCAB_SIZE
    assert ("adapter" in m.heads) == (name == "with_adapter")
    assert m(torch.tensor([[T.INSTRUMENT_PREFIX_ID["piano"], T.BOS_ID, T.PED_ON_ID, T.onset_id(0)]])).shape == (1, 4, 17729)
    m2 = M.load_model(demo / name)  # the folder: model-demo.safetensors is its only checkpoint
    assert m2.pedal


def test_our_checkpoints_record_their_vocabulary(tmp_path):
    m = M.Aria(M.ModelConfig(**SMALL, vocab_size=T.PEDAL_VOCAB_SIZE)).eval()
    M.save_checkpoint(tmp_path / "p.pt", m)
    assert torch.load(tmp_path / "p.pt", weights_only=True)["vocab_hash"] == T.PEDAL_VOCAB_HASH
    assert M.load_model(tmp_path / "p.pt").pedal and not M.Aria(M.ModelConfig(**SMALL)).pedal


def test_a_pedal_config_with_default_weights_is_one_line(tmp_path):
    pytest.importorskip("safetensors")
    M.export_safetensors(M.Aria(M.ModelConfig(**SMALL)).eval(), tmp_path / "model.safetensors")
    (tmp_path / "model.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({"tokenizer": {"abs": {"include_pedal": True}}}))
    with pytest.raises(M.CheckpointError, match="pedal vocabulary"):
        M.load_model(tmp_path / "model.safetensors")


@torch.no_grad()
def test_grammar_lets_pedal_events_in_and_alternates_them(tmp_path):
    torch.manual_seed(0)
    m = PedalHungry(M.ModelConfig(**SMALL, vocab_size=T.PEDAL_VOCAB_SIZE)).eval()
    prompt = T.prompt(str(pedal_midi(tmp_path / "p.mid")), 15, pedal=True)
    down = G.prompt_info(prompt, T.PEDAL_VOCAB_SIZE)[4]
    for row in S.generate(m, prompt, 3, 120, seed=1, temp=1.0):
        body = row[len(prompt):]
        pedals = [(k, t) for k, t in enumerate(body) if t >= T.PED_ON_ID]
        assert len(pedals) > 5  # the rig gets them in
        assert all(T.TOKEN_CLASS[body[k + 1]] == T.ONSET for k, _ in pedals if k + 1 < len(body))
        kinds = [t for _, t in pedals]
        assert kinds[0] == (T.PED_OFF_ID if down else T.PED_ON_ID)
        assert all(a != b for a, b in zip(kinds, kinds[1:]))  # ON, OFF, ON, ...
        notes, _, changes = T.detokenize_notes(row, pedals=True)
        assert len(changes) >= len(pedals) - 1
    default = M.Aria(M.ModelConfig(**SMALL)).eval()  # a model without the pedal never sees pedal ids
    with pytest.raises(ValueError, match="pedal tokens for a model without them"):
        S.generate(default, prompt, 1, 10)


def test_sample_cli_continues_with_the_pedal(demo, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), str(demo / "prompt.mid"), "--ckpt",
                        str(demo / "plain" / "model-demo.safetensors"), "--out", str(tmp_path), "--length", "80",
                        "--device", "cpu", "--seed", "3"], capture_output=True, text=True, env=ENV, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "pedal tokens" in r.stdout
    side = json.loads((tmp_path / "prompt_1.json").read_text())
    prompt_ids = side["ids"][:side["n_prompt_tokens"]]
    assert T.PED_ON_ID in prompt_ids  # the prompt was tokenized for the pedal model, without a flag
    midi = mido.MidiFile(str(tmp_path / "prompt_1.mid"))
    assert any(m.type == "control_change" and m.control == 64 for m in midi)  # the pedal is written back


def run(script, *args, ok=True):
    r = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                       env=ENV, cwd=ROOT, timeout=300)
    assert (r.returncode == 0) == ok, r.stdout[-1500:] + r.stderr[-1500:]
    return r


def test_pedal_datasets_prepare_train_finetune_and_refuse_mismatches(tmp_path):
    src = tmp_path / "midi"
    src.mkdir()
    for k in range(10):  # pedalled piano performances, varied enough for the quality filters
        notes = [(i * 180 + 7 * (i % 5), i * 180 + 250 + 40 * ((i + k) % 7), 40 + (i * 7 + k * 3) % 45,
                  30 + (i * 13 + k) % 90, 0) for i in range(90)]
        pedals = [(t, on) for j in range(8) for t, on in ((j * 2000 + 10, 1), (j * 2000 + 1500, 0))]
        T.notes_to_midi(notes, {0: 0}, pedals).save(str(src / f"p{k}.mid"))
    T.notes_to_midi([(i * 200, i * 200 + 300, 50 + i % 20, 70, 0) for i in range(90)], {0: 24}).save(str(src / "guitar.mid"))
    run("prepare.py", src, "--out", tmp_path / "ds", "--pedal", "--workers", "1", "--val_fraction", "0.2")
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert meta["pedal"] and meta["vocab_hash"] == T.PEDAL_VOCAB_HASH and meta["vocab_size"] == 17729
    report = json.loads((tmp_path / "ds" / "report.json").read_text())
    assert report["kept"] == 10 and report["dropped"] == 1  # the guitar file: pedal mode takes piano only
    import numpy as np
    assert (np.fromfile(tmp_path / "ds" / "train.bin", dtype=np.uint16) >= T.PED_ON_ID).sum() > 50

    fast = ["--preset", "tiny", "--seq_len", "64", "--batch_size", "4", "--warmup", "2", "--device", "cpu",
            "--workers", "0", "--eval_interval", "100"]
    run("pretrain.py", "--data", tmp_path / "ds", "--out", tmp_path / "pre", *fast, "--max_iters", "3")
    pre = M.load_model(tmp_path / "pre")
    assert pre.pedal  # the dataset's vocabulary, without a flag
    gen = ["--data", tmp_path / "ds", "--seq_len", "64", "--batch_size", "2", "--max_iters", "2", "--warmup", "1",
           "--device", "cpu", "--workers", "0"]
    run("finetune_gen.py", "--init", tmp_path / "pre", "--out", tmp_path / "gen", *gen)
    assert M.load_model(tmp_path / "gen").pedal
    M.save_checkpoint(tmp_path / "default.pt", M.Aria(M.PRESETS["tiny"]).eval())
    r = run("finetune_gen.py", "--init", tmp_path / "default.pt", "--out", tmp_path / "bad", *gen, ok=False)
    assert r.stderr.strip().count("\n") == 0 and "pedal vocabulary" in r.stderr and "--pedal" in r.stderr
    r = run("finetune_contrastive.py", "--init", "none", "--preset", "tiny", "--data", tmp_path / "ds", "--out",
            tmp_path / "ctr", "--device", "cpu", ok=False)
    assert r.stderr.strip().count("\n") == 0 and "pedal tokens" in r.stderr
    r = run("sample.py", "--ckpt", tmp_path / "gen", "--out", tmp_path / "s", "--length", "40", "--device", "cpu")
    assert "pedal tokens" in r.stdout and (tmp_path / "s" / "scratch_1.mid").is_file()
