"""CUDA-only tests, skipped without a GPU (the rest of the suite runs on CPU whatever the machine has).

Sampling: the decode step recorded once as a CUDA graph (sample.py --cuda_graph) gives exactly the
tokens of the eager loop for a seed, at batch 1 and at batch 8 with different prompt lengths, with
--end, top-k/top-p and without the grammar; bench.py sample runs on the GPU and prints its figures."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import model as M  # noqa: E402
import sample as S  # noqa: E402
import tokenizer as T  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny_model(dtype):
    torch.manual_seed(0)
    return M.Aria(M.ModelConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=512)).to("cuda", dtype).eval()


def piano_prompt(n_events):
    ids = [T.INSTRUMENT_PREFIX_ID["piano"], T.BOS_ID]
    for k in range(n_events):
        ids += [T.note_id("piano", 48 + (k * 7) % 36, 80), T.onset_id(100 * k), T.dur_id(300)]
    return ids


def obeys_grammar(row, n_prompt):
    g = S.Grammar([row[:n_prompt]])
    for tok in row[n_prompt:]:
        if g.bias()[0, tok] != 0:
            return False
        g.advance(torch.tensor([tok]))
    return True


SETTINGS = {
    "default": dict(),
    "end": dict(end=True, eos=False),
    "top-k-top-p": dict(temp=1.0, top_k=40, top_p=0.9, min_p=0.0),
    "no-grammar": dict(grammar=False, temp=1.2, min_p=0.0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", SETTINGS)
def test_cuda_graph_gives_the_eager_tokens(name, dtype):
    m, kw = tiny_model(dtype), SETTINGS[name]
    for prompts, nvar in ((piano_prompt(10), 1), ([piano_prompt(n) for n in (0, 3, 10, 25)], 2)):  # batch 1, 8
        eager = S.generate(m, prompts, nvar, 200, seed=7, device="cuda", **kw)
        stats = {}
        graph = S.generate(m, prompts, nvar, 200, seed=7, device="cuda", cuda_graph=True, stats=stats, **kw)
        assert graph == eager
        assert len({tuple(r) for r in eager}) == len(eager)  # the rows are different samples
        assert stats["step_s"] > 0
        if name == "end":
            assert all(T.DIM_ID in r for r in eager)


def test_cuda_graph_with_compile_samples_grammatical_rows():
    # inductor's kernels may round differently from eager, so only the grammar and the length are checked
    m, prompts = tiny_model(torch.bfloat16), [piano_prompt(n) for n in (0, 5)]
    rows = S.generate(m, prompts, 2, 100, device="cuda", compile=True, cuda_graph=True, eos=False)
    for row, prompt in zip(rows, [p for p in prompts for _ in range(2)]):
        assert len(row) == len(prompt) + 100 and obeys_grammar(row, len(prompt))


def test_bench_sample_on_the_gpu():
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, str(ROOT / "bench.py"), "sample", "--device", "cuda", "--cuda_graph",
                        "--preset", "tiny", "--tokens", "64", "--batch", "1,8"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = {int(m[0]): [float(x) for x in m[1:]]
            for m in re.findall(r"^\s*(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+) s\s+([\d.]+)%", r.stdout, re.M)}
    assert sorted(rows) == [1, 8] and all(x > 0 for row in rows.values() for x in row), r.stdout
