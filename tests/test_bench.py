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
        T.notes_to_midi(notes, {0: 0}).save(str(tmp_path / f"{k}.mid"))
    out = bench("tokenizer", tmp_path, "--repeats", "1")
    assert "3 files, 180 notes" in out
    stages = [line for line in out.splitlines() if "load_midi + tokenize" in line or "detokenize" in line]
    assert len(stages) == 3 and all(len(numbers(s)) >= 4 and min(numbers(s)) > 0 for s in stages), out


def test_bench_sample():
    out = bench("sample", "--device", "cpu", "--preset", "tiny", "--tokens", "16", "--batch", "1,2", "--threads", "1")
    bw = re.search(r"copy bandwidth " + NUMBER + r" GB/s .* floor " + NUMBER + " ms/step", out)
    assert bw and min(numbers(bw.group(0))) > 0, out
    rows = re.findall(r"^\s*(\d+)\s+" + r"\s+".join([NUMBER] * 4) + r" ms\s+" + NUMBER + "%$", out, re.M)
    assert [int(r[0]) for r in rows] == [1, 2], out  # batch, ms/step, tokens/s, per row, first token, share
    assert all(float(x) > 0 for r in rows for x in r[1:]), out


def test_bench_train():
    for extra in ([], ["--full_logits"]):
        out = bench("train", "--device", "cpu", "--preset", "tiny", "--seq_len", "32", "--batch", "2", "--steps", "1",
                    "--warmup", "1", *extra)
        m = re.search(r"float32, (chunked loss|full float32 logits), .*: " + NUMBER + " ms/step, " + NUMBER + " tokens/s", out)
        assert m and float(m.group(2)) > 0 and float(m.group(3).replace(",", "")) > 0, out
        assert m.group(1) == ("full float32 logits" if extra else "chunked loss") and "micro-batches of 2 x 32" in out, out
