"""bench.py smoke runs on CPU with tiny settings (a few seconds each): every subcommand runs and
prints its figures, all positive. The figures themselves are README's, measured on a quiet machine."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tokenizer as T  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
NUMBER = r"(\d[\d,]*(?:\.\d+)?)"


def bench(*args):
    r = subprocess.run([sys.executable, str(ROOT / "bench.py"), *map(str, args)], capture_output=True, text=True,
                       env=ENV, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def numbers(text):
    return [float(x.replace(",", "")) for x in re.findall(NUMBER, text)]


def test_bench_tokenizer(tmp_path):
    for k in range(3):
        notes = [(i * 200, i * 200 + 300, 40 + (i * 5 + k) % 48, 70, 0) for i in range(50 + 10 * k)]
        T.notes_to_midi(notes, {0: 0}, pedals=[(1000, 1), (2500, 0)]).save(str(tmp_path / f"{k}.mid"))
    out = bench("tokenizer", tmp_path, "--repeats", "1")
    assert "3 files, 180 notes" in out and "pedal mode" not in out
    stages = [line for line in out.splitlines() if "load_midi + tokenize" in line or "detokenize" in line]
    assert len(stages) == 3 and all(len(numbers(s)) >= 4 and min(numbers(s)) > 0 for s in stages), out
    out = bench("tokenizer", tmp_path, "--repeats", "1", "--pedal")  # each tokenizer stage's pedal-mode twin
    m = re.search(r"3 files, 180 notes, " + NUMBER + " tokens \\(" + NUMBER + " in pedal mode\\)", out)
    assert m and numbers(m.group(2)) == [numbers(m.group(1))[0] + 3 * 2 * 2], out  # two pedal events per file
    twins = [line for line in out.splitlines() if line.startswith(" pedal mode")]
    assert len(twins) == 5 and all(min(numbers(s)) > 0 for s in twins), out


def test_bench_sample():
    out = bench("sample", "--device", "cpu", "--preset", "tiny", "--tokens", "16", "--batch", "1,2", "--threads", "1",
                "--prompt_len", "300", "--quantize", "none,int8,int4", "--repeats", "1")
    bw = re.search(r"read bandwidth " + NUMBER + r" GB/s .*prompt 300 tokens", out)
    assert bw and float(bw.group(1)) > 0, out
    rows = re.findall(r"^\s*(none|int8|int4)\s+(\d+)\s+" + r"\s+".join([NUMBER] * 4) + r" ms\s+"
                      + r"\s+".join([NUMBER] * 3) + r"\s+" + NUMBER + "%$", out, re.M)
    assert [(r[0], int(r[1])) for r in rows] == [(q, b) for b in (1, 2) for q in ("none", "int8", "int4")], out
    assert all(float(x.replace(",", "")) > 0 for r in rows for x in r[2:]), out
    weights = {r[0]: float(r[6]) for r in rows}  # the floor counts the stored width
    assert weights["int4"] < weights["int8"] < 0.5 * weights["none"], out
    kv = {int(r[1]): float(r[7]) for r in rows}  # the KV slots read grow with the batch
    assert kv[2] > 1.9 * kv[1], out


def test_bench_train():
    for extra in ([], ["--full_logits"]):
        out = bench("train", "--device", "cpu", "--preset", "tiny", "--seq_len", "32", "--batch", "2", "--steps", "1",
                    "--warmup", "1", *extra)
        m = re.search(r"float32, (chunked loss|full float32 logits), .*: " + NUMBER + " ms/step, " + NUMBER + " tokens/s", out)
        assert m and float(m.group(2)) > 0 and float(m.group(3).replace(",", "")) > 0, out
        assert m.group(1) == ("full float32 logits" if extra else "chunked loss") and "micro-batches of 2 x 32" in out, out
