"""
The paper's Table 2 (linear probes and classifier finetuning, paper §4.1) at a scale you can afford,
in one command: prepare, pretrain, then per task the embedding and finetuning comparisons, each with
the stage scripts as a user would run them (subprocesses; torchrun with --nproc > 1).

    python reproduce.py --scale tiny --out out/repro_tiny \\
        --data ../shared/data/maestro_v2 ../shared/data/pop909 ../shared/data/pop1k7 ../shared/data/piano_midi_de \\
        --task ../shared/data/pianist8/labels_splits.csv:pianist:split_midibert
    python reproduce.py --scale small ...                  # one GPU
    python reproduce.py --scale medium --nproc 8 ...       # the paper's model, 8 GPUs (not run here)

Per task (LABELS.csv:LABEL_COL[:SPLIT_COL], paths relative to the CSV, split train/valid/test; a CSV
without a split column gets finetune_cls.py's deterministic stratified 80/10/10 split, in every stage):
  Aria_Emb      finetune_contrastive.py from the pretrained LM, then embed.py's linear probe (paper §3.3, §4.1)
  Aria†         the same contrastive recipe from random init (Table 2's e=25†)
  LM at <E>     the pretrained LM's final hidden state at <E>, probed: the floor the contrastive stage must beat
  Aria_Ft       finetune_cls.py from the pretrained LM, all labels and --n_train N (Table 2's n=100..)
  scratch_Ft    the same classifier finetunes from random init
Probes and classifier finetunes run over --seeds seeds and are reported as mean ± std; a contrastive
model is trained once per variant (seed 0) and the spread of its row is that of the probe. Test
metrics: the probe's best of 10/20/50 epochs (as the paper); the classifier's test accuracy at its
best valid epoch (the paper reports the best epoch). One Pianist8 test file is worth 2.7 points:
a difference within the spread is no difference.

Each stage writes into OUT/<stage>; a stage whose folder holds a finished result is skipped when the
command is repeated, and an interrupted training stage is resumed (--resume), so a long run survives
interruptions. OUT/results.json and OUT/results.md hold the tables, with the scale's settings.
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import model as M
import training as TR


ROOT = Path(__file__).resolve().parent

# Table 2 of the paper (medium, 60k hours of pretraining): accuracy / macro-F1 on Pianist8
PAPER = {"pianist8": {"Aria_Emb": (91.57, 92.38), "Aria†": (84.34, 84.56), "Aria_Ft": (91.56, 92.03)}}

# What each scale runs. tiny fits 45 minutes on 2 CPU cores, small 30 minutes on one H100; medium is
# the paper's recipe (§4.1) for 8 GPUs. Shorter runs than the paper's everywhere below medium: the
# learning rates are raised for the small models and few steps (as the README's quick start does).
SCALES = {
    "smoke": dict(preset="tiny", seq_len=128, batch=8, pretrain_iters=30, lr=1e-3, warmup=5,
                  ctr=dict(max_iters=8, batch_size=4, lr=1e-4, max_len=256, min_notes=20, max_notes=60),
                  emb=dict(notes_per_chunk=60, max_len=256, max_chunks=2),
                  cls=dict(slice_len=128, batch_size=8, lr=1e-4, epochs=1, max_iters=6),
                  n_train=[6], seeds=2),
    "tiny": dict(preset="tiny", seq_len=256, batch=16, pretrain_iters=1000, lr=1e-3, warmup=100,
                 ctr=dict(max_iters=250, batch_size=16, lr=1e-4, max_len=512, min_notes=50, max_notes=160),
                 emb=dict(notes_per_chunk=150, max_len=512, max_chunks=4),
                 cls=dict(slice_len=512, batch_size=16, lr=3e-4, epochs=10, max_iters=80),
                 n_train=[100], seeds=3),
    "small": dict(preset="small", seq_len=2048, batch=16, pretrain_iters=3000, lr=3e-4, warmup=300,
                  ctr=dict(max_iters=600, batch_size=32, lr=3e-5, max_len=1024, min_notes=100, max_notes=330),
                  emb=dict(notes_per_chunk=300, max_len=1024, max_chunks=0),
                  cls=dict(slice_len=1024, batch_size=16, lr=3e-5, epochs=10, max_iters=300),
                  n_train=[100], seeds=3),
    "medium": dict(preset="medium", seq_len=8192, batch=16, pretrain_iters=0, lr=3e-4, warmup=1000,  # 0: 75 epochs
                   ctr=dict(max_iters=0, batch_size=16, lr=1e-5, max_len=2048, min_notes=100, max_notes=650),
                   emb=dict(notes_per_chunk=300, max_len=2048, max_chunks=0),
                   cls=dict(slice_len=1024, batch_size=16, lr=1e-5, epochs=10, max_iters=0),
                   n_train=[100, 200, 500, 1000], seeds=3),
}


class Fail(Exception):
    """A one-line error for the user: exit status 1, no traceback."""


def get_args(argv=None):
    ap = argparse.ArgumentParser(description="Reproduce the paper's Table 2 with the stage scripts.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--scale", default="tiny", choices=list(SCALES), help="model size, steps and batch of every stage")
    ap.add_argument("--data", nargs="+", required=True, metavar="DIR", help="MIDI folders to pretrain on (prepare.py)")
    ap.add_argument("--task", nargs="+", required=True, metavar="LABELS.csv:LABEL_COL[:SPLIT_COL]",
                    help="classification tasks; the split column says train/valid/test (default column: split; "
                         "without it, a deterministic stratified 80/10/10 split per class, model.stratified_split)")
    ap.add_argument("--out", default="out/reproduce", help="every stage's output, results.json and results.md")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per probe and classifier finetune (default: the scale's)")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto, for every stage")
    ap.add_argument("--nproc", type=int, default=1, help="processes per training stage (torchrun) for multi-GPU scales")
    ap.add_argument("--workers", type=int, default=2, help="data loader workers of the training stages")
    return ap.parse_args(argv)


def parse_task(spec):
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0]:
        raise Fail(f"--task {spec!r}: expected LABELS.csv:LABEL_COL[:SPLIT_COL]")
    path, label_col, split_col = Path(parts[0]), parts[1], parts[2] if len(parts) == 3 else "split"
    if not path.is_file():
        raise Fail(f"{path}: no such labels file (--task)")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    has_split = bool(rows) and split_col in rows[0]
    if not rows or "path" not in rows[0] or label_col not in rows[0] or len(parts) == 3 and not has_split:
        raise Fail(f"{path}: needs columns path, {label_col!r}" + (f" and {split_col!r}" if len(parts) == 3 else ""))
    # no split column: the stages split as finetune_cls.py does (the same files in every stage)
    splits = [r[split_col] for r in rows] if has_split else TR.stratified_split([r["path"].strip() for r in rows],
                                                                                 [r[label_col].strip() for r in rows])
    name = path.parent.name if path.stem in ("labels", "labels_splits") else path.stem
    return dict(name=name, csv=str(path), label_col=label_col, split_col=split_col, classes=len({r[label_col] for r in rows}),
                n_train=sum(s.strip().lower() == "train" for s in splits), split="csv" if has_split else "stratified")


# -----------------------------------------------------------------------------
# running stages


class Runner:
    """Runs stage scripts one after the other, prints progress, skips finished stages."""

    def __init__(self, args, n_stages):
        self.args, self.n, self.done, self.t0 = args, n_stages, 0, time.time()

    def run(self, name, script, *argv, finished=None, out=None, train=False):
        """Run `script argv` unless finished() says its output is complete; a training stage with a
        checkpoint but not finished is resumed with --resume."""
        self.done += 1
        elapsed = time.time() - self.t0
        head = f"[{self.done}/{self.n}] {name}"
        if finished and finished():
            print(f"{head}: done already, skipped", flush=True)
            return
        if train and out and (Path(out) / "ckpt.pt").is_file():
            argv = ("--out", str(out), "--resume", "--device", self.args.device, "--workers", str(self.args.workers))
            head += " (resuming)"
        print(f"{head} (elapsed {elapsed / 60:.1f} min)", flush=True)
        cmd = [sys.executable, str(ROOT / script), *map(str, argv)]
        if train and self.args.nproc > 1:
            cmd[1:1] = ["-m", "torch.distributed.run", f"--nproc_per_node={self.args.nproc}"]
        t = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        tail = []
        for line in proc.stdout:  # the stage's own log lines (step, loss, ETA) as they come
            print(f"    {line.rstrip()}", flush=True)
            tail = (tail + [line.rstrip()])[-5:]
        if proc.wait() != 0:
            raise Fail(f"{name} failed ({' '.join(cmd[1:3])} ...): {tail[-1] if tail else 'no output'}")
        print(f"    {name}: {time.time() - t:.0f} s", flush=True)


def finished_training(out):
    """A training stage is finished when its checkpoint has reached its max_iters."""
    def check():
        try:
            ckpt = torch.load(Path(out) / "ckpt.pt", map_location="cpu", weights_only=True, mmap=True)
        except (OSError, RuntimeError):
            return False
        return ckpt.get("step") == ckpt.get("args", {}).get("max_iters")
    return check


def summary(values):
    """[x, ...] in [0, 1] -> {"mean", "std", "n", "values"} in percent."""
    v = [100 * x for x in values]
    return {"mean": round(statistics.mean(v), 2), "std": round(statistics.stdev(v), 2) if len(v) > 1 else 0.0,
            "n": len(v), "values": [round(x, 2) for x in v]}


# -----------------------------------------------------------------------------


def main(argv=None):
    try:
        return reproduce(get_args(argv))
    except Fail as e:
        print(f"reproduce.py: {e}", file=sys.stderr)
        return 1


def reproduce(args):
    s = SCALES[args.scale]
    seeds = list(range(args.seeds or s["seeds"]))
    tasks = [parse_task(t) for t in args.task]
    for d in args.data:
        if not Path(d).is_dir():
            raise Fail(f"{d}: no such folder (--data)")
    out = Path(args.out)
    dev = ["--device", args.device]
    work = ["--workers", str(args.workers)]
    ns = {t["name"]: [n for n in s["n_train"] if n < t["n_train"]] for t in tasks}
    n_stages = 2 + sum(2 + 3 + 3 * len(seeds) + 2 * len(seeds) * (1 + len(ns[t["name"]])) for t in tasks)
    r = Runner(args, n_stages)
    print(f"reproduce: scale {args.scale} ({s['preset']}), {len(tasks)} task(s), seeds {seeds}, {n_stages} stages "
          f"-> {out}", flush=True)

    # 1. data and pretraining (paper §3.2)
    data = out / "data"
    r.run("prepare", "prepare.py", *args.data, "--out", data, finished=lambda: (data / "meta.json").is_file())
    pre = out / "pretrain"
    its = ["--max_iters", s["pretrain_iters"]] if s["pretrain_iters"] else []
    r.run("pretrain", "pretrain.py", "--data", data, "--out", pre, "--preset", s["preset"], "--seq_len", s["seq_len"],
          "--batch_size", s["batch"], "--lr", s["lr"], "--warmup", s["warmup"], *its, "--eval_interval", 0,
          "--log_interval", 20, *dev, *work, finished=finished_training(pre), out=pre, train=True)

    results = {"scale": args.scale, "settings": s, "seeds": seeds, "tasks": {}}
    for t in tasks:
        name, tdir = t["name"], out / t["name"]
        csv_args = ["--label_col", t["label_col"], "--split_col", t["split_col"]]
        rows = {}

        # 2. contrastive embeddings (paper §3.3): from the pretrained LM and from random init
        c = s["ctr"]
        ctr = ["--data", data, "--emb_size", 512, "--batch_size", c["batch_size"], "--lr", c["lr"], "--max_len", c["max_len"],
               "--min_notes", c["min_notes"], "--max_notes", c["max_notes"], "--log_interval", 10, *dev, *work,
               *(["--max_iters", c["max_iters"]] if c["max_iters"] else [])]
        emb_dirs = {"Aria_Emb": tdir / "emb_pretrained", "Aria†": tdir / "emb_scratch"}
        r.run("contrastive from the pretrained LM (Aria_Emb)", "finetune_contrastive.py", "--init", pre, *ctr,
              "--out", emb_dirs["Aria_Emb"], finished=finished_training(emb_dirs["Aria_Emb"]), out=emb_dirs["Aria_Emb"],
              train=True)
        r.run("contrastive from random init (Aria†)", "finetune_contrastive.py", "--init", "none", "--preset", s["preset"],
              *ctr, "--out", emb_dirs["Aria†"], finished=finished_training(emb_dirs["Aria†"]), out=emb_dirs["Aria†"],
              train=True)

        # 3. embeddings of the task's files, then the linear probe over seeds (paper §4.1)
        e = s["emb"]
        chunking = ["--notes_per_chunk", e["notes_per_chunk"], "--max_len", e["max_len"], "--max_chunks", e["max_chunks"]]
        sources = {"Aria_Emb": (emb_dirs["Aria_Emb"], "emb"), "Aria†": (emb_dirs["Aria†"], "emb"),
                   "LM at <E>": (pre, "hidden")}
        for row, (ckpt, head) in sources.items():
            npy = tdir / f"emb_{row.replace(' ', '_').replace('<', '').replace('>', '').replace('†', 'dagger')}.npy"
            r.run(f"embed {name} ({row})", "embed.py", "--ckpt", ckpt, "--head", head, "--probe", t["csv"], *csv_args,
                  *chunking, "--out", npy, *dev, finished=lambda npy=npy: npy.is_file() and npy.with_suffix(".files.txt").is_file())
            runs = []
            for seed in seeds:
                res = npy.with_name(f"{npy.stem}_probe{seed}.json")
                r.run(f"probe {name} ({row}, seed {seed})", "embed.py", "--emb", npy, "--probe", t["csv"], *csv_args,
                      "--seed", seed, "--probe_out", res, finished=res.is_file)
                runs.append(json.loads(res.read_text())["best"]["test"])
            rows[row] = {"accuracy": summary([x["accuracy"] for x in runs]), "macro_f1": summary([x["macro_f1"] for x in runs])}

        # 4. classifier finetuning (paper §4.1): from the pretrained LM and from random init, all labels and n_train
        k = s["cls"]
        cls = ["--labels", t["csv"], *csv_args, "--slice_len", k["slice_len"], "--batch_size", k["batch_size"],
               "--lr", k["lr"], "--epochs", k["epochs"], "--log_interval", 10, *dev, *work,
               *(["--max_iters", k["max_iters"]] if k["max_iters"] else [])]
        for init, label in ((pre, "Aria_Ft"), ("none", "scratch_Ft")):
            for n in [None] + ns[name]:
                row = label if n is None else f"{label} n={n}"
                runs = []
                for seed in seeds:
                    d = tdir / f"cls_{'pretrained' if init == pre else 'scratch'}_{n or 'all'}_s{seed}"
                    extra = (["--preset", s["preset"]] if init == "none" else []) + (["--n_train", n] if n else [])
                    r.run(f"classifier {name} ({row}, seed {seed})", "finetune_cls.py", "--init", init, *cls, *extra,
                          "--seed", seed, "--out", d, finished=finished_training(d), out=d, train=True)
                    runs.append(json.loads((d / "results.json").read_text())["best"]["test"])
                rows[row] = {"accuracy": summary([x["accuracy"] for x in runs]),
                             "macro_f1": summary([x["macro_f1"] for x in runs])}
        results["tasks"][name] = {"csv": t["csv"], "label_col": t["label_col"], "classes": t["classes"],
                                  "train_files": t["n_train"], "split": t["split"], "split_col": t["split_col"], "rows": rows}

    write_results(out, results)
    print(f"reproduce: done in {(time.time() - r.t0) / 60:.1f} min; {out / 'results.md'}", flush=True)
    print((out / "results.md").read_text())
    return 0


def write_results(out, results):
    s = results["settings"]
    lines = [f"# Table 2 at scale `{results['scale']}`", "",
             f"Model `{s['preset']}`; pretraining {s['pretrain_iters'] or '75 epochs'} steps of {s['batch']} x {s['seq_len']} "
             f"tokens; contrastive {s['ctr']}; embeddings {s['emb']}; classifier {s['cls']}; "
             f"{len(results['seeds'])} seeds per probe and classifier finetune (mean ± std, test split).", ""]
    for name, task in results["tasks"].items():
        paper = PAPER.get(name, {})
        split = (f"split: column `{task['split_col']}` of the CSV" if task["split"] == "csv" else
                 "split: no split column, so the deterministic stratified split of finetune_cls.py (80/10/10 per class, "
                 "by a hash of each path; the same files in every stage)")
        lines += [f"## {name} ({task['classes']} classes, {task['train_files']} training files)", "", split + ".", "",
                  "| row | accuracy | macro-F1 |" + (" paper (medium) acc / F1 |" if paper else ""),
                  "|---|---|---|" + ("---|" if paper else "")]
        for row, m in task["rows"].items():
            cell = lambda x: f"{x['mean']:.1f} ± {x['std']:.1f}"  # noqa: E731
            ref = paper.get(row)
            lines.append(f"| {row} | {cell(m['accuracy'])} | {cell(m['macro_f1'])} |"
                         + (f" {ref[0]:.1f} / {ref[1]:.1f} |" if ref else " |" if paper else ""))
        lines.append("")
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
