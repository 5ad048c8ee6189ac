"""
The paper's tables in one command each, with the stage scripts run as a user would run them
(subprocesses; torchrun with --nproc > 1).

Table 2 (linear probes and classifier finetuning, paper §4.1) at a scale you can afford: prepare, pretrain,
then per task (LABELS.csv:LABEL_COL[:SPLIT_COL]; no split column: finetune_cls.py's stratified 80/10/10):
    python reproduce.py --scale tiny --out out/repro_tiny --data data/maestro_v2 data/pop909 \\
        --task data/pianist8/labels_splits.csv:pianist:split_midibert     # --scale small: one GPU
  Aria_Emb    finetune_contrastive.py from the pretrained LM, and embed.py's linear probe (paper §3.3, §4.1)
  Aria†       the same contrastive recipe from random init (Table 2's e=25†)
  LM at <E>   the pretrained LM's final hidden state at <E>, probed: the floor the contrastive stage must beat
  Aria_Ft     finetune_cls.py from the pretrained LM, all labels and --n_train N; scratch_Ft from random init
  Aria_Ft     finetune_cls.py from the pretrained LM (all labels, --n_train N); scratch_Ft: random init
epochs, the classifier's at its best valid epoch (as the paper). Each stage writes OUT/<stage>; a finished one
is skipped when the command is repeated, an interrupted one resumed. OUT/results.json and .md hold the tables.

Table 1 (paper §4: listeners compare 45-s continuations of 15-s prompts, A/B; binomial tests) trains nothing:
    python reproduce.py --table 1 --prompts HELD_OUT_MIDI/ --ckpt out/pretrain [more checkpoints]  # the kit
    python reproduce.py --table 1 --metrics --train data/mine    # objective metrics, no listeners
    python reproduce.py --table 1 --answers answers_*.csv        # the table, from the listeners' CSVs
The kit (OUT/table1/; docs/table1.md): clips/ID.mid, audio/ID.ogg, index.html, kit.json, key.json.
"""
import argparse
import csv
import itertools
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

import model as M
import sample as S
import tokenizer as T
import training as TR

ROOT = Path(__file__).resolve().parent

# Table 2 of the paper (medium, 60k hours of pretraining): accuracy / macro-F1 on Pianist8
PAPER = {"pianist8": {"Aria_Emb": (91.57, 92.38), "Aria†": (84.34, 84.56), "Aria_Ft": (91.56, 92.03)}}

# What each scale runs. tiny fits 45 minutes on 2 CPU cores, small 30 minutes on one H100; medium is
# the paper's recipe (§4.1) for 8 GPUs. Shorter runs than the paper's everywhere below medium: the
# learning rates are raised for the small models and few steps (as the README's quick start does).
SCALES = {  # preset, seq_len, batch, pretrain_iters (0: 75 epochs), lr, warmup, ctr, emb, cls, n_train, seeds
    "smoke": ("tiny", 128, 8, 30, 1e-3, 5, (8, 4, 1e-4, 256, 20, 60), (60, 256, 2),
              (128, 8, 1e-4, 1, 6), [6], 2),
    "tiny": ("tiny", 256, 16, 1000, 1e-3, 100, (250, 16, 1e-4, 512, 50, 160), (150, 512, 4),
             (512, 16, 3e-4, 10, 80), [100], 3),
    "small": ("small", 2048, 16, 3000, 3e-4, 300, (600, 32, 3e-5, 1024, 100, 330), (300, 1024, 0),
              (1024, 16, 3e-5, 10, 300), [100], 3),
    "medium": ("medium", 8192, 16, 0, 3e-4, 1000, (0, 16, 1e-5, 2048, 100, 650), (300, 2048, 0),
               (1024, 16, 1e-5, 10, 0), [100, 200, 500, 1000], 3),
}
SCALES = {name: dict(zip("preset seq_len batch pretrain_iters lr warmup".split(), v[:6]),
                     ctr=dict(zip("max_iters batch_size lr max_len min_notes max_notes".split(), v[6])),
                     emb=dict(zip("notes_per_chunk max_len max_chunks".split(), v[7])),
                     cls=dict(zip("slice_len batch_size lr epochs max_iters".split(), v[8])),
                     n_train=v[9], seeds=v[10]) for name, v in SCALES.items()}


class Fail(Exception):
    """A one-line error for the user: exit status 1, no traceback."""


def need(ok, message):
    if not ok:
        raise Fail(message)


def get_args(argv=None):
    ap = argparse.ArgumentParser(description="Reproduce the paper's Table 2 (stage scripts) or Table 1 "
                                 "(listening test).", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--table", type=int, default=2, choices=[1, 2], help="which of the paper's tables")
    ap.add_argument("--out", default="out/reproduce", help="Table 2: stages and results; Table 1: OUT/table1")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto, for every stage (Table 1: sampling)")
    t2 = ap.add_argument_group("Table 2").add_argument
    t2("--scale", default="tiny", choices=list(SCALES), help="model size, steps and batch of every stage")
    t2("--data", nargs="+", metavar="DIR", help="MIDI folders to pretrain on (prepare.py); required")
    t2("--task", nargs="+", metavar="LABELS.csv:LABEL_COL[:SPLIT_COL]",
       help="classification tasks (required); the split column says train/valid/test (default column: split; "
            "without it, a deterministic stratified 80/10/10 split per class, training.stratified_split)")
    t2("--seeds", type=int, default=None, help="seeds per probe and classifier finetune (default: scale's)")
    t2("--nproc", type=int, default=1, help="processes per training stage (torchrun) for multi-GPU scales")
    t2("--workers", type=int, default=2, help="data loader workers of the training stages")
    t1 = ap.add_argument_group("Table 1 (paper §4)").add_argument
    t1("--prompts", metavar="DIR", help="held-out MIDI to cut the prompts from: builds the kit")
    t1("--ckpt", nargs="+", default=[], help="checkpoints to test (as sample.py's --ckpt), one system each")
    t1("--n_prompts", type=int, default=5, help="prompts, drawn by --seed (paper: 5)")
    t1("--n_continuations", type=int, default=8, help="per prompt and checkpoint (paper: 8)")
    t1("--prompt_seconds", type=float, default=15.0, help="prompt length (paper: 15 s)")
    t1("--continuation_seconds", type=float, default=45.0, help="continuation length (paper: 45 s)")
    t1("--temp", type=float, default=0.98, help="sampling temperature (sample.py's, official)")
    t1("--min_p", type=float, default=0.035, help="min-p sampling (sample.py's, official)")
    t1("--seed", type=int, default=0,
       help="draws the prompts and the clips' order; prompt i samples with seed + i")
    t1("--trials", type=int, default=40,
       help="A/B trials per listener, every pair of systems equally often (the paper: not said)")
    t1("--with_repeat", action="store_true", help="also put the naive repeat in the listening test")
    t1("--soundfont", default="/usr/share/sounds/sf2/FluidR3_GM.sf2",
       help="GM sound font (the paper: Pianoteq); none: MIDI only")
    t1("--answers", nargs="+", metavar="CSV", help="the listeners' CSVs (from index.html): the table")
    t1("--min_training", type=float, default=1.0, help="leave out listeners with fewer years of training")
    t1("--metrics", action="store_true", help="objective metrics of the kit: OUT/table1/metrics.json")
    t1("--train", metavar="DATASET", help="with --metrics: a prepare.py dataset to find copied notes in")
    return ap.parse_args(argv)


def parse_task(spec):
    parts = spec.split(":")
    need(len(parts) in (2, 3) and parts[0], f"--task {spec!r}: expected LABELS.csv:LABEL_COL[:SPLIT_COL]")
    path, label_col = Path(parts[0]), parts[1]
    split_col = parts[2] if len(parts) == 3 else "split"
    need(path.is_file(), f"{path}: no such labels file (--task)")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    has_split = bool(rows) and split_col in rows[0]
    need(rows and "path" in rows[0] and label_col in rows[0] and (len(parts) == 2 or has_split),
         f"{path}: needs columns path, {label_col!r}" + (f" and {split_col!r}" if len(parts) == 3 else ""))
    # no split column: the stages split as finetune_cls.py does (the same files in every stage)
    splits = ([r[split_col] for r in rows] if has_split else
              TR.stratified_split([r["path"].strip() for r in rows], [r[label_col].strip() for r in rows]))
    name = path.parent.name if path.stem in ("labels", "labels_splits") else path.stem
    return dict(name=name, csv=str(path), label_col=label_col, split_col=split_col,
                classes=len({r[label_col] for r in rows}), split="csv" if has_split else "stratified",
                n_train=sum(s.strip().lower() == "train" for s in splits))


# -----------------------------------------------------------------------------
# running stages


class Runner:
    """Runs stage scripts one after the other, prints progress, skips finished stages."""

    def __init__(self, args, n_stages):
        self.args, self.n = args, n_stages
        self.done, self.t0 = 0, time.time()

    def run(self, name, script, *argv, finished=(), train=None):
        """Run `script argv` unless the files `finished` all exist. train: a training stage's output folder;
        finished when its checkpoint reached max_iters, resumed (--resume) when it has one before."""
        self.done += 1
        elapsed = time.time() - self.t0
        head = f"[{self.done}/{self.n}] {name}"
        if (finished_training(train) if train else finished and all(Path(f).is_file() for f in finished)):
            print(f"{head}: done already, skipped", flush=True)
            return
        if train and (Path(train) / "ckpt.pt").is_file():
            argv = ("--out", train, "--resume", "--device", self.args.device, "--workers", self.args.workers)
            head += " (resuming)"
        print(f"{head} (elapsed {elapsed / 60:.1f} min)", flush=True)
        cmd = [sys.executable, str(ROOT / script), *map(str, argv)]
        if train and self.args.nproc > 1:
            cmd[1:1] = ["-m", "torch.distributed.run", f"--nproc_per_node={self.args.nproc}"]
        t = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        last = "no output"
        for line in proc.stdout:  # the stage's own log lines (step, loss, ETA) as they come
            last = line.rstrip()
            print(f"    {last}", flush=True)
        need(proc.wait() == 0, f"{name} failed ({' '.join(cmd[1:3])} ...): {last}")
        print(f"    {name}: {time.time() - t:.0f} s", flush=True)


def finished_training(out):
    """A training stage is finished when its checkpoint has reached its max_iters."""
    try:
        ckpt = torch.load(Path(out) / "ckpt.pt", map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError):
        return False
    return ckpt.get("step") == ckpt.get("args", {}).get("max_iters")


def summary(runs):
    """[{"accuracy", "macro_f1"}, ...] in [0, 1] -> per metric {"mean", "std", "n", "values"} in percent."""
    res = {}
    for m in ("accuracy", "macro_f1"):
        v = [100 * x[m] for x in runs]
        std = round(statistics.stdev(v), 2) if len(v) > 1 else 0.0
        res[m] = dict(mean=round(statistics.mean(v), 2), std=std, n=len(v), values=[round(x, 2) for x in v])
    return res


def flags(d, keys):
    """--key value for each of keys in d; max_iters 0 is left out (the script's default: its epochs)."""
    return [x for k in keys.split() if k != "max_iters" or d[k] for x in (f"--{k}", d[k])]


# -----------------------------------------------------------------------------
# Table 2


def reproduce(args):
    need(args.data and args.task, "Table 2 needs --data DIR ... and --task LABELS.csv:LABEL_COL ...")
    s = SCALES[args.scale]
    seeds = list(range(args.seeds or s["seeds"]))
    tasks = [parse_task(t) for t in args.task]
    for d in args.data:
        need(Path(d).is_dir(), f"{d}: no such folder (--data)")
    out = Path(args.out)
    dev = ["--device", args.device]
    work = ["--workers", str(args.workers)]
    ns = {t["name"]: [n for n in s["n_train"] if n < t["n_train"]] for t in tasks}
    n_stages = 2 + sum(2 + 3 + 3 * len(seeds) + 2 * len(seeds) * (1 + len(ns[t["name"]])) for t in tasks)
    r = Runner(args, n_stages)
    print(f"reproduce: scale {args.scale} ({s['preset']}), {len(tasks)} task(s), seeds {seeds}, "
          f"{n_stages} stages -> {out}", flush=True)

    # 1. data and pretraining (paper §3.2)
    data = out / "data"
    r.run("prepare", "prepare.py", *args.data, "--out", data, finished=[data / "meta.json"])
    pre = out / "pretrain"
    its = ["--max_iters", s["pretrain_iters"]] if s["pretrain_iters"] else []
    r.run("pretrain", "pretrain.py", "--data", data, "--out", pre, "--batch_size", s["batch"], *its,
          *flags(s, "preset seq_len lr warmup"), "--eval_interval", 0, "--log_interval", 20, *dev, *work,
          train=pre)

    results = {"scale": args.scale, "settings": s, "seeds": seeds, "tasks": {}}
    for t in tasks:
        name, tdir = t["name"], out / t["name"]
        csv_args = ["--label_col", t["label_col"], "--split_col", t["split_col"]]
        probe = ["--probe", t["csv"], *csv_args]
        rows = {}

        # 2. contrastive embeddings (paper §3.3): from the pretrained LM and from random init
        ctr = ["--data", data, "--emb_size", 512, "--log_interval", 10, *dev, *work,
               *flags(s["ctr"], "batch_size lr max_len min_notes max_notes max_iters")]
        emb_dirs = {"Aria_Emb": tdir / "emb_pretrained", "Aria†": tdir / "emb_scratch"}
        for row, init in (("Aria_Emb", [pre]), ("Aria†", ["none", "--preset", s["preset"]])):
            r.run(f"contrastive from {'the pretrained LM' if init[0] == pre else 'random init'} ({row})",
                  "finetune_contrastive.py", "--init", *init, *ctr, "--out", emb_dirs[row],
                  train=emb_dirs[row])

        # 3. embeddings of the task's files, then the linear probe over seeds (paper §4.1)
        chunking = flags(s["emb"], "notes_per_chunk max_len max_chunks")
        sources = {"Aria_Emb": (emb_dirs["Aria_Emb"], "emb", "Aria_Emb"),
                   "Aria†": (emb_dirs["Aria†"], "emb", "Ariadagger"),
                   "LM at <E>": (pre, "hidden", "LM_at_E")}
        for row, (ckpt, head, stem) in sources.items():
            npy = tdir / f"emb_{stem}.npy"
            r.run(f"embed {name} ({row})", "embed.py", "--ckpt", ckpt, "--head", head, *probe, *chunking,
                  "--out", npy, *dev, finished=[npy, npy.with_suffix(".files.txt")])
            runs = []
            for seed in seeds:
                res = npy.with_name(f"{npy.stem}_probe{seed}.json")
                r.run(f"probe {name} ({row}, seed {seed})", "embed.py", "--emb", npy, *probe, "--seed", seed,
                      "--probe_out", res, finished=[res])
                runs.append(json.loads(res.read_text())["best"]["test"])
            rows[row] = summary(runs)

        # 4. classifier finetuning (paper §4.1) from the pretrained LM and random init: all labels, n_train
        cls = ["--labels", t["csv"], *csv_args, "--log_interval", 10, *dev, *work,
               *flags(s["cls"], "slice_len batch_size lr epochs max_iters")]
        for label, kind, init in (("Aria_Ft", "pretrained", [pre]),
                                  ("scratch_Ft", "scratch", ["none", "--preset", s["preset"]])):
            for n in [None] + ns[name]:
                row = label if n is None else f"{label} n={n}"
                runs = []
                for seed in seeds:
                    d = tdir / f"cls_{kind}_{n or 'all'}_s{seed}"
                    r.run(f"classifier {name} ({row}, seed {seed})", "finetune_cls.py", "--init", *init, *cls,
                          *(["--n_train", n] if n else []), "--seed", seed, "--out", d, train=d)
                    runs.append(json.loads((d / "results.json").read_text())["best"]["test"])
                rows[row] = summary(runs)
        results["tasks"][name] = dict(csv=t["csv"], label_col=t["label_col"], classes=t["classes"],
                                      train_files=t["n_train"], split=t["split"], split_col=t["split_col"],
                                      rows=rows)

    write_results(out, results)
    print(f"reproduce: done in {(time.time() - r.t0) / 60:.1f} min; {out / 'results.md'}", flush=True)
    print((out / "results.md").read_text())
    return 0


def write_results(out, results):
    s = results["settings"]
    cell = lambda x: f"{x['mean']:.1f} ± {x['std']:.1f}"  # noqa: E731
    lines = [f"# Table 2 at scale `{results['scale']}`", "", f"Model `{s['preset']}`; pretraining "
             f"{s['pretrain_iters'] or '75 epochs'} steps of {s['batch']} x {s['seq_len']} tokens; "
             f"contrastive {s['ctr']}; embeddings {s['emb']}; classifier {s['cls']}; "
             f"{len(results['seeds'])} seeds per probe and classifier finetune (mean ± std, test split).", ""]
    for name, task in results["tasks"].items():
        paper = PAPER.get(name, {})
        split = (f"split: column `{task['split_col']}` of the CSV" if task["split"] == "csv" else
                 "split: no split column, so the deterministic stratified split of finetune_cls.py "
                 "(80/10/10 per class, by a hash of each path; the same files in every stage)")
        lines += [f"## {name} ({task['classes']} classes, {task['train_files']} training files)", "",
                  split + ".", "",
                  "| row | accuracy | macro-F1 |" + (" paper (medium) acc / F1 |" if paper else ""),
                  "|---|---|---|" + ("---|" if paper else "")]
        for row, m in task["rows"].items():
            ref = paper.get(row)
            lines.append(f"| {row} | {cell(m['accuracy'])} | {cell(m['macro_f1'])} |"
                         + (f" {ref[0]:.1f} / {ref[1]:.1f} |" if ref else " |" if paper else ""))
        lines.append("")
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text("\n".join(lines))


# -----------------------------------------------------------------------------
# Table 1: the listening test (paper §4)

# The paper's Table 1: Aria (medium, generative finetune) against each system: wins, ties, losses, p-value
PAPER_T1 = [("AM Transformer", 38, 0, 6, 9.43e-7), ("Suno 3.5", 18, 9, 21, 7.49e-1),
            ("MusicGen", 49, 1, 0, 3.55e-15), ("Ground Truth", 15, 9, 17, 8.60e-1)]
GT, REPEAT = "ground_truth", "repeat"
AUDIO_RATE = 22050   # Hz: Ogg Vorbis at about 0.5 MB per minute keeps a kit small (docs/table1.md)
TARGET_DBFS = -24.0  # every clip's gated RMS level, or lower where a clip's peaks need it (render_audio)
COLUMNS = ["listener", "training", "trial", "clip_a", "clip_b", "choice", "seconds"]  # index.html's CSV
FEATURES = ["pitch", "pitch_class", "ioi", "duration", "velocity", "polyphony", "density"]
NGRAM = 8            # notes per stretch in the memorisation index


def write_json(path, obj):
    M.atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def table1(args):
    t1 = Path(args.out) / "table1"
    need(args.prompts or args.answers or args.metrics or args.train,
         "--table 1 needs --prompts DIR --ckpt CKPT (the kit), --metrics or --answers CSV ...")
    if args.prompts:
        build_kit(args, t1)
    need((t1 / "key.json").is_file(),
         f"{t1}: no listening-test kit here; build one with --prompts DIR --ckpt CKPT")
    kit, key = (json.loads((t1 / name).read_text()) for name in ("kit.json", "key.json"))
    if args.metrics or args.train:
        metrics(args, t1, kit, key)
    if args.answers:
        listening_table(args, t1, key)
    return 0


def pick_prompts(args, p_ms, end_ms):
    """--n_prompts files (drawn by --seed) with end_ms of music after the first note: the prompt's notes and
    the real continuation's, tokenized (10-ms grid, velocity bins, pedal in durations) as the model's are."""
    folder = Path(args.prompts)
    need(folder.is_dir(), f"{folder}: no such folder (--prompts)")
    files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in (".mid", ".midi"))
    random.Random(args.seed).shuffle(files)
    picked = []
    for f in files:
        try:
            score = T.load_midi(f)
            first = score.duration_ms(0, score.notes[0][0])  # IndexError: no notes
            notes, programs = T.detokenize_notes(T.prompt(score, (first + p_ms) / 1000))
            full = T.detokenize_notes(T.prompt(score, (first + end_ms) / 1000))[0]
        except (T.TokenizerError, IndexError):
            continue
        gt = [n for n in full[len(notes):] if n[0] < end_ms]  # solo piano, neither side near silence:
        if (score.duration_ms(0, score.notes[-1][0]) - first >= end_ms and min(len(notes), len(gt)) >= 10
                and programs == {0: 0}):
            picked.append(dict(file=str(f), first_ms=first, notes=notes, programs=programs, gt=gt))
        if len(picked) == args.n_prompts:
            return picked
    raise Fail(f"{folder}: only {len(picked)} of {len(files)} MIDI files hold {end_ms / 1000:g} s of solo "
               f"piano (--n_prompts {args.n_prompts})")


def build_kit(args, t1):
    """Prompts, continuations, clips, audio and the listening page, in OUT/table1; key.json last."""
    t0, checkpoints = time.time(), []
    for k in ("n_prompts", "n_continuations", "trials", "prompt_seconds", "continuation_seconds"):
        need(getattr(args, k) > 0, f"--{k} must be > 0")
    need(args.ckpt, "--prompts needs --ckpt CKPT ...: the checkpoints to test")
    need(not (t1 / "key.json").exists(),
         f"{t1} holds a kit, and answers name its clip ids: use another --out")
    p_ms = round(args.prompt_seconds * 1e3)
    end_ms = round((args.prompt_seconds + args.continuation_seconds) * 1e3)
    prompts = pick_prompts(args, p_ms, end_ms)
    clips, loop = [], min(p_ms, end_ms - p_ms)  # (system, prompt, row, notes); REPEAT: the prompt's end again
    for i, p in enumerate(prompts):
        again = [(s + k * loop, e + k * loop, *r) for k in range(1, -(-(end_ms - p_ms) // loop) + 1)
                 for s, e, *r in p["notes"] if s >= p_ms - loop]
        clips += [(GT, i, 0, p["notes"] + p["gt"]), (REPEAT, i, 0, p["notes"] + again)]
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    names = [Path(c).stem if Path(c).is_file() else Path(c).resolve().name for c in args.ckpt]
    names = [f"{n}_{k + 1}" if names.count(n) > 1 or n in (GT, REPEAT) else n for k, n in enumerate(names)]
    for spec, name in zip(args.ckpt, names):
        try:
            path = M.resolve_checkpoint(spec)
            model = M.load_model(path, device=device, dtype=dtype)
        except M.CheckpointError as e:
            raise Fail(str(e)) from None
        need("lm" in model.heads, f"{path}: no LM head ({', '.join(model.heads)}); continuations need one")
        runs = []
        checkpoints.append(dict(system=name, path=str(path), params=model.num_params(), device=device,
                                runs=runs))
        for i, p in enumerate(prompts):
            ids, t = T.prompt(p["file"], (p["first_ms"] + p_ms) / 1000, pedal=model.pedal), time.time()
            length = model.config.max_seq_len - len(ids)
            need(length > 0, f"{p['file']}: its {len(ids)}-token prompt fills {path}'s context")
            # each row runs to its first event at end_ms, with no <E> before: an early end gives a system away
            rows = S.generate(model, ids, n_variations=args.n_continuations, length=length, device=device,
                              seed=args.seed + i, temp=args.temp, min_p=args.min_p, eos=False, stats={},
                              seconds=(end_ms - max(n[0] for n in p["notes"])) / 1000)
            clips += [(name, i, r, p["notes"] + S.split_notes(x, len(ids))[1]) for r, x in enumerate(rows)]
            reached = [r[-1] == T.EOS_ID for r in rows]
            runs.append(dict(prompt=i + 1, seed=args.seed + i, prompt_tokens=len(ids), reached=reached,
                             new_tokens=[len(r) - len(ids) for r in rows], s=round(time.time() - t, 1)))
            short = (f"; {reached.count(False)} stop short of {args.continuation_seconds:g} s: "
                     "the context is full") * (not all(reached))
            print(f"table 1: {name}, prompt {i + 1}/{len(prompts)}: {len(rows)} continuations in "
                  f"{runs[-1]['s']} s{short}")

    # opaque ids, drawn afresh (answers to another kit are caught), in an order that hides the systems
    rng, fresh = random.Random(args.seed), random.SystemRandom()
    rng.shuffle(clips)
    ids = [f"{x:06x}" for x in fresh.sample(range(16 ** 6), len(clips))]
    tagged = list(zip(ids, clips))
    for sub in ("clips", "audio"):
        shutil.rmtree(t1 / sub, ignore_errors=True)
    for cid, (_, i, _, notes) in tagged:  # 1 tick = 1 ms; every clip lasts exactly end_ms
        mid = T.notes_to_midi([(s, min(e, end_ms), *r) for s, e, *r in notes if s < end_ms],
                              prompts[i]["programs"])
        mid.tracks[0][-1].time = max(0, end_ms - sum(m.time for m in mid.tracks[0]))
        M.atomic_write(t1 / "clips" / f"{cid}.mid", lambda f: mid.save(file=f))
    audio = render_audio(args, t1, ids)

    # the page gets, per prompt, the clip ids of each tested system as an unnamed group (in a seeded order)
    tested = [c["system"] for c in checkpoints] + [GT] + [REPEAT] * args.with_repeat
    order = rng.sample(tested, len(tested))
    groups = [[sorted(c for c, (s, i, _, _) in tagged if (s, i) == (g, k)) for g in order]
              for k in range(len(prompts))]
    pairs = len(tested) * (len(tested) - 1) // 2
    trials = -(-args.trials // pairs) * pairs
    kit_id = f"{fresh.getrandbits(40):010x}"  # the page keeps its answers under this name in the browser
    page = json.dumps(dict(kit=kit_id, trials=trials, prompts=groups, audio=audio and audio["format"],
                           seconds=[args.prompt_seconds, args.continuation_seconds])).replace("</", "<\\/")
    html = (ROOT / "table1.html").read_text(encoding="utf-8").replace("__KIT__", page)
    M.atomic_write(t1 / "index.html", lambda f: f.write(html.encode()))
    prompt_files = [dict(file=p["file"], offset_s=p["first_ms"] / 1000, notes=len(p["notes"]))
                    for p in prompts]
    kit = dict(kit=kit_id, settings=vars(args), prompt_ms=p_ms, end_ms=end_ms, trials=trials,
               checkpoints=checkpoints, prompts=prompt_files, clips={c: i + 1 for c, (_, i, _, _) in tagged},
               audio=audio)
    key = dict(systems=tested, clips={c: dict(system=s, prompt=i + 1, row=r) for c, (s, i, r, _) in tagged})
    write_json(t1 / "kit.json", kit)
    write_json(t1 / "key.json", key)  # last: the kit is whole when key.json is there
    print(f"table 1: kit of {len(ids)} clips ({len(prompts)} prompts; {', '.join(tested)} in the test, "
          f"{trials} trials per listener) in {time.time() - t0:.0f} s: open {t1 / 'index.html'}; "
          "keep key.json from listeners")


def render_audio(args, t1, ids):
    """Every clip through FluidSynth at one loudness: rendered at gain 0.2 to measure its level (mean power
    of its 100-ms blocks above -60 dBFS) and peak, then at the (linear) gain for TARGET_DBFS, or lower where
    the spikiest clip would peak above -1 dBFS. Returns kit.json's "audio", or None without FluidSynth."""
    sf2 = Path(args.soundfont)
    if args.soundfont == "none" or not shutil.which("fluidsynth") or not sf2.is_file():
        why = "--soundfont none" if args.soundfont == "none" else f"no fluidsynth or no {sf2}"
        print(f"note: {why}: the kit is MIDI only (for audio: apt-get install fluidsynth fluid-soundfont-gm)")
        return None
    (t1 / "audio").mkdir(parents=True, exist_ok=True)

    def fluidsynth(c, gain, out, kind):
        cmd = ["fluidsynth", "-ni", "-q", "-r", str(AUDIO_RATE), "-g", f"{gain:.4f}", "-F", str(out), "-T",
               kind, str(sf2), str(t1 / "clips" / f"{c}.mid")]
        r = subprocess.run(cmd, capture_output=True, text=True)
        need(r.returncode == 0 and out.is_file(),
             f"fluidsynth failed on {c}.mid: {(r.stderr.strip() or 'no output').splitlines()[-1]}")

    def measure(c):
        fluidsynth(c, 0.2, t1 / "audio" / f"{c}.raw", "raw")  # 16-bit stereo samples, no header
        x = np.fromfile(t1 / "audio" / f"{c}.raw", np.int16) / np.float32(32768)
        (t1 / "audio" / f"{c}.raw").unlink()
        power = (x[:len(x) // 4410 * 4410] ** 2).reshape(-1, 4410).mean(1)  # 100-ms stereo blocks (22.05 kHz)
        level = 10 * math.log10(power[power > 1e-6].mean()) if (power > 1e-6).any() else -60.0
        peak = 20 * math.log10(max(np.abs(x).max(), 1e-6))
        return c, dict(level_dbfs=round(level, 2), peak_dbfs=round(peak, 2))

    with ThreadPoolExecutor(2) as pool:  # FluidSynth runs on one core
        clips = dict(pool.map(measure, ids))
        target = min(TARGET_DBFS, min(v["level_dbfs"] - v["peak_dbfs"] for v in clips.values()) - 1)
        for v in clips.values():
            v["gain"] = round(min(10.0, 0.2 * 10 ** ((target - v["level_dbfs"]) / 20)), 4)
        list(pool.map(lambda c: fluidsynth(c, clips[c]["gain"], t1 / "audio" / f"{c}.ogg", "oga"), ids))
    return dict(format="ogg", sample_rate=AUDIO_RATE, target_dbfs=round(target, 2), clips=clips)


def binom_p(wins, losses):
    """Two-sided exact binomial test of wins against losses at p = 1/2 (ties left out, as in the paper)."""
    n = wins + losses
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2 ** n) if n else 1.0


def listening_table(args, t1, key):
    """Listeners' CSVs -> per pair of systems the first's wins, ties, losses and p: OUT/table1/results.*"""
    clips, answers = key["clips"], []
    for path in map(Path, args.answers):
        need(path.is_file(), f"{path}: no such file (--answers)")
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
        need(rows and not set(COLUMNS) - set(rows[0]), f"{path}: not an answers file of index.html (its CSV)")
        for line, r in enumerate(rows, 2):
            at = f"{path}, line {line}"
            for c in (r["clip_a"], r["clip_b"]):
                need(c in clips, f"{at}: clip id {c!r} is not in {t1 / 'key.json'} (another kit's answers?)")
            need(r["choice"] in ("A", "tie", "B"), f"{at}: choice {r['choice']!r}, expected A, tie or B")
            try:
                answers.append(dict(r, years=float(r["training"])))
            except ValueError:
                raise Fail(f"{at}: years of training {r['training']!r} is not a number") from None
    left_out = {r["listener"] for r in answers if r["years"] < args.min_training}
    answers = [r for r in answers if r["years"] >= args.min_training]
    tally = {pair: [0, 0, 0] for pair in itertools.combinations(dict.fromkeys(key["systems"] + [REPEAT]), 2)}
    for r in answers:
        a, b = clips[r["clip_a"]]["system"], clips[r["clip_b"]]["system"]
        pair, won = (a, b) if (a, b) in tally else (b, a), {"A": a, "B": b}.get(r["choice"])
        if pair in tally:
            tally[pair][1 if won is None else 0 if won == pair[0] else 2] += 1
    rows = [dict(system=a, against=b, wins=won, ties=tied, losses=lost, p=binom_p(won, lost))
            for (a, b), (won, tied, lost) in tally.items() if won + tied + lost]
    paper = [dict(system="Aria", against=a, wins=w, ties=t, losses=n, p=p) for a, w, t, n, p in PAPER_T1]
    res = dict(listeners=len({r["listener"] for r in answers}), left_out=sorted(left_out),
               answers=len(answers), min_training=args.min_training, rows=rows, paper=paper)
    lines = ["# Table 1: the listening test", "",
             f"{res['listeners']} listeners, {len(answers)} answers; {len(left_out)} listeners left out "
             f"(under {args.min_training:g} years of musical training). Wins, ties and losses of the first "
             "system; p: two-sided exact binomial test on the non-tied answers.", ""]
    for name, table in (("This kit", rows), ("The paper (Aria medium, 46 listeners)", paper)):
        lines += [f"## {name}", "", "| system | against | wins | ties | losses | p-value |", "|---" * 6 + "|"]
        lines += [f"| {' | '.join(map(str, list(r.values())[:5]))} | {r['p']:.2e} |" for r in table] + [""]
    write_json(t1 / "results.json", res)
    M.atomic_write(t1 / "results.md", lambda f: f.write("\n".join(lines).encode()))
    print("\n".join(lines))


def features(notes, t0, t1):
    """Yang & Lerch's (2020) features of notes starting in [t0, t1) ms: inter-onsets and durations in log2 s,
    density in notes per second."""
    x = np.array([n[:4] for n in notes if t0 <= n[0] < t1], dtype=float).reshape(-1, 4)
    start, end = x[:, 0], x[:, 1]  # then pitch, velocity
    onsets = np.unique(start)
    return dict(pitch=x[:, 2], pitch_class=x[:, 2] % 12, ioi=np.log2(np.maximum(np.diff(onsets), 10) / 1000),
                duration=np.log2(np.maximum(end - start, 10) / 1000), velocity=x[:, 3],
                polyphony=np.array([np.sum((start <= t) & (end > t)) for t in onsets], dtype=float),
                density=np.histogram(start, bins=np.arange(t0, t1 + 1, 1000))[0].astype(float))


def overlap(x, y, feature):
    """The overlapping area of two samples' distributions: of Gaussian kernel-density estimates (Silverman's
    bandwidth), as Yang & Lerch; for pitch class, of the 12-bin histograms (a circular, discrete feature)."""
    if not len(x) or not len(y):
        return 0.0
    if feature == "pitch_class":
        return float(np.minimum(*(np.bincount(v.astype(int), minlength=12) / len(v) for v in (x, y))).sum())
    bw = [0.9 * (min(v.std(), np.subtract(*np.percentile(v, [75, 25])) / 1.34) or v.std() or 1.0)
          * len(v) ** -0.2 for v in (x, y)]
    grid = np.linspace(min(x.min(), y.min()) - 4 * max(bw), max(x.max(), y.max()) + 4 * max(bw), 512)
    pdf = [np.exp(-0.5 * ((grid[:, None] - v) / h) ** 2).sum(1) / (len(v) * h * math.sqrt(2 * math.pi))
           for v, h in zip((x, y), bw)]
    return float(np.minimum(*pdf).sum() * (grid[1] - grid[0]))


def note_ngrams(group, start, pitch):
    """(n - NGRAM + 1,) uint64: a hash of each NGRAM-note stretch of notes sorted by (group, start, pitch),
    from its pitch steps and onset gaps (the same under transposition and shifts in time); 0 across groups."""
    m = len(pitch) - NGRAM + 1
    if m < 1:
        return np.zeros(0, np.uint64)
    step = (np.diff(pitch) + 128 + 256 * np.diff(start)).astype(np.uint64)  # (n - 1,)
    h = np.zeros(m, np.uint64)
    for j in range(NGRAM - 1):
        h = h * np.uint64(1000003) + step[j:j + m]
    return np.where(group[:m] == group[NGRAM - 1:], h, np.uint64(0))


def ngram_index(dataset):
    """NGRAM-note stretches of a prepare.py dataset's training files: (sorted note_ngrams hashes, files)."""
    d = Path(dataset)
    need((d / "train.bin").is_file() and (d / "train.idx.npy").is_file(),
         f"{d}: not a prepare.py dataset (no train.bin, train.idx.npy) (--train)")
    ids, idx = np.fromfile(d / "train.bin", dtype=np.uint16).astype(np.int64), np.load(d / "train.idx.npy")
    cls = T.TOKEN_CLASS[ids]
    at = np.flatnonzero((cls[:-2] == T.NOTE) & (cls[1:-1] == T.ONSET) & (cls[2:] == T.DUR))
    group = np.searchsorted(idx, at, side="right") - 1
    segs = np.concatenate([[0], np.cumsum(ids == T.SEG_ID)])  # <T>s before each position
    start = (segs[at] - segs[idx[group]]) * T.SEGMENT_MS + (ids[at + 1] - T.ONSET_START) * T.TIME_STEP_MS
    pitch = (ids[at] - T.NOTE_START) % T.NOTES_PER_INSTRUMENT // len(T.VELOCITIES)
    order = np.lexsort((pitch, start, group))
    h = note_ngrams(group[order], start[order], pitch[order])
    return np.sort(h[h != 0]), len(idx) - 1  # (np.unique and np.isin are many times slower on uint64)


def longest_copy(notes, index):
    """The longest stretch of notes (at least NGRAM, else 0) whose every NGRAM-note window is in the index."""
    notes = sorted((n[0], n[2]) for n in notes)
    h = note_ngrams(np.zeros(len(notes)), *(np.array([n[k] for n in notes], dtype=np.int64) for k in (0, 1)))
    at = np.minimum(np.searchsorted(index, h), len(index) - 1)
    runs = [len(list(run)) for hit, run in itertools.groupby(index[at] == h) if hit] if len(index) else []
    return max(runs) + NGRAM - 1 if runs else 0


def metrics(args, t1, kit, key):
    """Per system and feature the overlapping area (OA) of its continuations' features with the ground
    truth's, by an unrelated piece (another prompt's ground truth), the ground truth's halves, the repeat;
    --train: copying."""
    p_ms, end_ms = kit["prompt_ms"], kit["end_ms"]
    n, half = len(kit["prompts"]), (p_ms + end_ms) // 2
    cont = defaultdict(list)  # (system, prompt) -> each clip's notes after the prompt
    for cid, c in key["clips"].items():  # (1 tick = 1 ms)
        notes = T.load_midi(t1 / "clips" / f"{cid}.mid").notes
        cont[c["system"], c["prompt"]].append([x for x in notes if x[0] >= p_ms])
    gt = [cont[GT, k][0] for k in range(1, n + 1)]
    systems = list(dict.fromkeys(key["systems"] + [REPEAT]))  # the checkpoints, ground truth, repeat
    gtf = [features(g, p_ms, end_ms) for g in gt]
    sets = {s: [([features(x, p_ms, end_ms) for x in cont[s, k + 1]], [gtf[k]]) for k in range(n)]
            for s in systems if s != GT}
    sets["unrelated (floor)"] = [([gtf[(k + 1) % n]], [gtf[k]]) for k in range(n if n > 1 else 0)]
    sets["ground truth halves"] = [([features(g, p_ms, half)], [features(g, half, end_ms)]) for g in gt]
    rows = {}
    for s, pairs in sets.items():
        oa = {f: [overlap(*(np.concatenate([x[f] for x in side]) for side in pair), f) for pair in pairs]
              for f in FEATURES}
        rows[s] = {f: dict(mean=round(float(np.mean(v)), 3), std=round(float(np.std(v)), 3),
                           per_prompt=[round(x, 3) for x in v]) for f, v in oa.items() if v}
    res = dict(features=FEATURES, window_ms=[p_ms, end_ms], prompts=n, oa=rows)
    lines = [f"| OA with the ground truth | {' | '.join(FEATURES)} |", "|---" * (len(FEATURES) + 1) + "|"]
    lines += [f"| {s} | " + " | ".join(f"{r[f]['mean']:.2f} ± {r[f]['std']:.2f}" for f in FEATURES) + " |"
              for s, r in rows.items() if r]
    if args.train:
        index, files = ngram_index(args.train)
        copies = {s: [longest_copy(x, index) for k in range(1, n + 1) for x in cont[s, k]] for s in systems}
        res["memorisation"] = dict(dataset=str(args.train), train_files=files, ngram=NGRAM, longest_copy={
            s: dict(max=max(v), mean=round(statistics.mean(v), 1), per_clip=v) for s, v in copies.items()})
        lines += ["", f"Longest stretch of notes copied from {args.train} ({files} files): " + "; ".join(
            f"{s} max {max(v)}, mean {statistics.mean(v):.1f}" for s, v in copies.items())]
    write_json(t1 / "metrics.json", res)
    print(f"table 1 metrics: overlapping area (OA) with the ground truth's continuation, mean ± std over "
          f"{n} prompts ({t1 / 'metrics.json'})\n" + "\n".join(lines))


# -----------------------------------------------------------------------------


def main(argv=None):
    try:
        args = get_args(argv)
        return table1(args) if args.table == 1 else reproduce(args)
    except Fail as e:
        print(f"reproduce.py: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
