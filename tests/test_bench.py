"""bench.py smoke runs on CPU with tiny settings (a few seconds each): every subcommand runs and
prints its figures, all positive. The figures themselves are README's, measured on a quiet machine."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import bench  # noqa: E402
import model as M  # noqa: E402
import sample as S  # noqa: E402
import tokenizer as T  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # the in-process GEMVs, as the CLI runs them
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
NUMBER = r"(\d[\d,]*(?:\.\d+)?)"


def bench_cli(*args, env=ENV):
    r = subprocess.run([sys.executable, str(ROOT / "bench.py"), *map(str, args)], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


def numbers(text):
    return [float(x.replace(",", "")) for x in re.findall(NUMBER, text)]


def sample_rows(out):
    """The sample table as dicts, one per setting, numbers as floats."""
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:2] == ["quantize", "kv"])
    keys = ["quantize", "kv", "batch", "prompt", "context", "weights MB", "KV B/slot", "KV MB", "floor ms",
            "model ms", "model share", "step ms", "step share", "tokens/s", "first ms"]
    rows = []
    for line in lines[head + 1:]:
        cells = line.split()
        assert len(cells) == len(keys), line
        rows.append({k: c if k in ("quantize", "kv") else float(c.strip("%").replace(",", ""))
                     for k, c in zip(keys, cells)})
    return rows


def test_bench_tokenizer(tmp_path):
    for k in range(3):
        notes = [(i * 200, i * 200 + 300, 40 + (i * 5 + k) % 48, 70, 0) for i in range(50 + 10 * k)]
        T.notes_to_midi(notes, {0: 0}, pedals=[(1000, 1), (2500, 0)]).save(str(tmp_path / f"{k}.mid"))
    out = bench_cli("tokenizer", tmp_path, "--repeats", "1")
    assert "3 files, 180 notes" in out and "pedal mode" not in out
    stages = [line for line in out.splitlines() if "load_midi + tokenize" in line or "detokenize" in line]
    assert len(stages) == 3 and all(len(numbers(s)) >= 4 and min(numbers(s)) > 0 for s in stages), out
    out = bench_cli("tokenizer", tmp_path, "--repeats", "1", "--pedal")  # each stage's pedal-mode twin
    m = re.search(r"3 files, 180 notes, " + NUMBER + " tokens \\(" + NUMBER + " in pedal mode\\)", out)
    assert m and numbers(m.group(2)) == [numbers(m.group(1))[0] + 3 * 2 * 2], out  # two pedal events per file
    twins = [line for line in out.splitlines() if line.startswith(" pedal mode")]
    assert len(twins) == 5 and all(min(numbers(s)) > 0 for s in twins), out


def test_gemv_bandwidth_times_the_models_weight_shapes(monkeypatch):
    calls = []
    linear = torch.nn.functional.linear

    def spy(x, w, *rest):
        calls.append((tuple(x.shape), tuple(w.shape), w.dtype))
        return linear(x, w, *rest)
    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    cfg = M.PRESETS["tiny"]  # d 128, 4 layers
    rate, shapes = bench.gemv_bandwidth(cfg, "cpu", repeats=2)
    assert rate > 0 and all(r > 0 for *_, r in shapes)
    expected = [(384, 128, 4), (128, 128, 4), (512, 128, 8), (128, 512, 4), (cfg.vocab_size, 128, 1)]
    assert [s[:3] for s in shapes] == expected  # q|k|v, attention out, gate and up, down, LM head
    assert {(w, x) for x, w, _ in calls} == {((o, i), (1, i)) for o, i, _ in expected}  # GEMVs: one input row
    assert {dt for *_, dt in calls} == {torch.float32}
    rates = [r for *_, r in shapes]  # combined as the model reads them: bytes over time, within the range
    assert 0.999 * min(rates) <= rate <= 1.001 * max(rates)


def test_bench_sample():
    out = bench_cli("sample", "--device", "cpu", "--preset", "tiny", "--tokens", "16", "--batch", "1,2",
                    "--threads", "1", "--prompt_len", "300", "--quantize", "none,int8,int4", "--repeats", "1")
    bw = re.search(r"GEMV bandwidth " + NUMBER + r" GB/s: float32 F.linear", out)
    assert bw and float(bw.group(1)) > 0 and "prompt: the first 300 tokens" in out, out
    rows = sample_rows(out)
    expected = [(q, b) for b in (1, 2) for q in ("none", "int8", "int4")]
    assert [(r["quantize"], r["batch"]) for r in rows] == expected, out
    assert all(v > 0 for r in rows for k, v in r.items() if k not in ("quantize", "kv")), out
    assert all(r["context"] == 300 + 16 // 2 for r in rows), out  # slots read by generate's mean timed step
    kv = {r["quantize"]: r["kv"] for r in rows}  # --kv auto: the weights' dtype, or sample.py's choice
    auto = f"auto:{S.KV_AUTO_QUANTIZED}"
    assert kv == {"none": "auto:float32", "int8": auto, "int4": auto}, out
    weights = {r["quantize"]: r["weights MB"] for r in rows}  # the floor counts the stored width
    assert weights["int4"] < weights["int8"] < 0.5 * weights["none"], out
    kv_mb = {int(r["batch"]): r["KV MB"] for r in rows}  # the KV slots read grow with the batch
    assert kv_mb[2] > 1.9 * kv_mb[1], out


def test_bench_sample_kv_changes_what_is_stored():
    out = bench_cli("sample", "--device", "cpu", "--preset", "tiny", "--tokens", "8", "--batch", "1",
                    "--threads", "1", "--prompt_len", "64,128", "--kv", "float32,bfloat16,int8",
                    "--repeats", "1")
    rows = sample_rows(out)
    expected = [(p, k) for p in (64, 128) for k in ("float32", "bfloat16", "int8")]
    assert [(r["prompt"], r["kv"]) for r in rows] == expected, out
    per_slot = {r["kv"]: r["KV B/slot"] for r in rows}  # 4 layers x K and V x 2 heads x 64 values
    assert per_slot == {"float32": 4 * 2 * 2 * 64 * 4, "bfloat16": 4 * 2 * 2 * 64 * 2,
                        "int8": 4 * 2 * 2 * (64 + 4)}, out  # int8: a float32 scale per token and head
    for r in rows:
        assert r["context"] == r["prompt"] + 4, out  # the floor's KV bytes: per slot x the context
        assert abs(r["KV MB"] - r["KV B/slot"] * r["context"] / 1e6) <= 0.05, out
        assert r["model ms"] > 0 and r["step ms"] > 0 and r["floor ms"] > 0, out


def test_bench_quality_scores_the_cache_through_the_decode_path(tmp_path):
    torch.manual_seed(0)
    M.save_checkpoint(tmp_path / "tiny.pt", M.Aria(M.PRESETS["tiny"]))
    notes = [(i * 150, i * 150 + 300, 40 + (i * 5) % 48, 40 + (i * 11) % 80, 0) for i in range(120)]
    (tmp_path / "data").mkdir()
    ids = T.tokenize(T.load_midi(T.notes_to_midi(notes, {0: 0})))
    np.array(ids, dtype=np.uint16).tofile(tmp_path / "data" / "val.bin")
    env = {**ENV, "ARIA_KV_COMPILE": "0"}  # the compiled step's arithmetic, without compiling it here

    def quality(*args):
        out = bench_cli("quality", "--ckpt", tmp_path / "tiny.pt", "--data", tmp_path / "data",
                        "--seq_len", 64, "--windows", 2, *args, env=env)
        assert "2 windows of 64 tokens" in out and re.search(r"^\s+note\s+\d+", out, re.M), out
        return json.loads(out.splitlines()[-1])
    exact = quality("--quantize", "none", "--kv", "float32")  # an exact cache decodes as the full forward
    assert exact["kv"] == "float32" and exact["all"]["positions"] == 128 and abs(exact["kl"]) < 1e-10, exact
    assert exact["top1"] == 1 and abs(exact["loss"] - exact["loss_float32"]) < 1e-5, exact
    int8 = quality("--quantize", "none", "--kv", "int8")  # every step reads the int8 keys and values
    assert int8["kl"] > 1e3 * max(exact["kl"], 1e-15) and int8["loss"] != exact["loss"], int8
    weights = quality("--quantize", "int8")  # no --kv: one prefill, the weights alone
    assert weights["kv"] is None and weights["kl"] > 0 and weights["top1"] > 0.9, weights


def test_bench_train():
    for extra in ([], ["--full_logits"]):
        out = bench_cli("train", "--device", "cpu", "--preset", "tiny", "--seq_len", "32", "--batch", "2",
                        "--steps", "1", "--warmup", "1", *extra)
        m = re.search(r"float32, (chunked loss|full float32 logits), .*: " + NUMBER + " ms/step, " + NUMBER
                      + " tokens/s", out)
        assert m and float(m.group(2)) > 0 and float(m.group(3).replace(",", "")) > 0, out
        assert m.group(1) == ("full float32 logits" if extra else "chunked loss"), out
        assert "micro-batches of 2 x 32" in out, out
