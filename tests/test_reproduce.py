"""reproduce.py --scale smoke end to end on MIDI made here, with a labels CSV without a split column
(the stages split it as finetune_cls.py does): every stage runs, the table has every row, every number
is read back from a stage's own output, and a repeated command skips finished stages and resumes an
interrupted one."""
import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import prepare  # noqa: E402
from test_finetune_cls import REGISTERS, piece  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ROWS = ["Aria_Emb", "Aria†", "LM at <E>", "Aria_Ft", "Aria_Ft n=6", "scratch_Ft", "scratch_Ft n=6"]


def reproduce(*args, ok=True):
    r = subprocess.run([sys.executable, str(ROOT / "reproduce.py"), *map(str, args)], capture_output=True, text=True,
                       env=ENV, cwd=ROOT, timeout=600)
    if ok:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    return r


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("repro")
    prepare.write_synthetic(30, tmp / "midi", seed=0)
    (tmp / "task" / "midi").mkdir(parents=True)
    rng, rows = random.Random(0), []
    for c, (lo, hi) in REGISTERS.items():  # three classes told apart by pitch range
        for i in range(8):
            piece(rng, lo, hi, rng.randint(60, 160)).save(tmp / "task" / "midi" / f"{c}_{i}.mid")
            rows.append((f"midi/{c}_{i}.mid", c))
    with open(tmp / "task" / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "register"), *rows])  # no split column: most users' own labels
    args = ["--scale", "smoke", "--data", tmp / "midi", "--task", f"{tmp / 'task' / 'labels.csv'}:register",
            "--out", tmp / "out", "--device", "cpu", "--workers", "0"]
    r = reproduce(*args)
    return tmp / "out", args, r


def test_smoke_table_has_every_row_and_real_numbers(smoke):
    out, _, r = smoke
    res = json.loads((out / "results.json").read_text())
    assert res["scale"] == "smoke" and res["seeds"] == [0, 1]
    rows = res["tasks"]["task"]["rows"]
    assert list(rows) == ROWS
    for row, m in rows.items():
        for k in ("accuracy", "macro_f1"):
            assert m[k]["n"] == 2 and len(m[k]["values"]) == 2 and all(0 <= v <= 100 for v in m[k]["values"]), row
    # the numbers are the stages' own: the classifiers' results.json and the probes' JSON
    for seed in (0, 1):
        cls = json.loads((out / "task" / f"cls_pretrained_all_s{seed}" / "results.json").read_text())
        assert rows["Aria_Ft"]["accuracy"]["values"][seed] == round(100 * cls["best"]["test"]["accuracy"], 2)
        probe = json.loads((out / "task" / f"emb_Aria_Emb_probe{seed}.json").read_text())
        assert rows["Aria_Emb"]["macro_f1"]["values"][seed] == round(100 * probe["best"]["test"]["macro_f1"], 2)
    md = (out / "results.md").read_text()
    assert md.count("\n| ") == len(ROWS) + 1 and "± " in md and "scale `smoke`" in md and "stratified split" in md
    # 8 files per class: 1 test, 1 valid, 6 train, the same in the classifier and the probe
    assert res["tasks"]["task"]["train_files"] == 18 and res["tasks"]["task"]["split"] == "stratified"
    assert cls["files"] == {"train": 18, "valid": 3, "test": 3} and probe["files"] == cls["files"]
    assert "[21/21]" in r.stdout and "reproduce: done" in r.stdout


def test_repeat_skips_finished_stages_and_resumes_an_interrupted_one(smoke):
    out, args, _ = smoke
    ckpt_path = out / "pretrain" / "ckpt.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["step"] == ckpt["args"]["max_iters"] == 30
    torch.save({**ckpt, "step": 25}, ckpt_path)  # as if the pretraining job had been stopped at step 25
    r = reproduce(*args)
    assert "pretrain (resuming)" in r.stdout and "at step 25" in r.stdout
    assert r.stdout.count("done already, skipped") == 20
    steps = [d["step"] for d in map(json.loads, open(out / "pretrain" / "log.jsonl")) if "loss" in d]
    assert steps[-1] == 30 and torch.load(ckpt_path, weights_only=True)["step"] == 30


def test_parse_task_with_and_without_a_split_column(tmp_path):
    import model as M
    import training as TR
    import reproduce as R
    names, labels = [f"m/{c}{i}.mid" for c in "ab" for i in range(10)], [c for c in "ab" for _ in range(10)]
    (tmp_path / "plain.csv").write_text("path,label\n" + "".join(f"{n},{l}\n" for n, l in zip(names, labels)))
    t = R.parse_task(f"{tmp_path / 'plain.csv'}:label")
    assert t["split"] == "stratified" and t["n_train"] == TR.stratified_split(names, labels).count("train") == 16
    (tmp_path / "split.csv").write_text("path,label,fold\n" + "".join(f"{n},{l},{'test' if i % 2 else 'train'}\n"
                                                                        for i, (n, l) in enumerate(zip(names, labels))))
    t = R.parse_task(f"{tmp_path / 'split.csv'}:label:fold")
    assert t["split"] == "csv" and t["split_col"] == "fold" and t["n_train"] == 10
    with pytest.raises(R.Fail, match="'fold'"):
        R.parse_task(f"{tmp_path / 'plain.csv'}:label:fold")  # a split column named on the command line must exist


def test_bad_task_one_line(tmp_path):
    r = reproduce("--scale", "smoke", "--data", tmp_path, "--task", "nowhere.csv:label", "--out", tmp_path / "o", ok=False)
    assert r.returncode == 1 and "nowhere.csv: no such labels file" in r.stderr and "Traceback" not in r.stderr
    r = reproduce("--scale", "smoke", "--data", tmp_path, "--task", "x.csv", "--out", tmp_path / "o", ok=False)
    assert r.returncode == 1 and "LABELS.csv:LABEL_COL" in r.stderr
