"""
Supervised classifier finetuning of Aria (paper §4.1 "Supervised finetuning", Table 2; official
aria/training/classifier_finetune.py). "Official" is EleutherAI/aria @ b0486c8 with aria-utils @ e122d03.

    python finetune_cls.py --init out/small --labels labels.csv --out out/cls
    python finetune_cls.py --init none --preset small --labels labels.csv --out out/cls_scratch
    python finetune_cls.py --init out/small --labels labels.csv --n_train 100 --out out/cls_n100
    python finetune_cls.py --init out/small --labels p8.csv --label_col pianist --split_col split_midibert
    torchrun --nproc_per_node=8 finetune_cls.py --init aria-medium-base.safetensors --labels ... --out out/cls
    python finetune_cls.py --out out/cls --resume             # continue exactly where it stopped
    python finetune_cls.py --ckpt out/cls --predict a.mid b.mid   # "a.mid<TAB>label<TAB>probability"

labels.csv has a path column (relative to the CSV's folder or absolute), a label column and
optionally a split column (train / valid / test; without one, a deterministic stratified split).
Every file is tokenized once and cut into slices `prefix <S> ... <E>` of at most --slice_len
tokens; a training sample is one slice with its file's label, the loss the cross-entropy of the
class head at the slice's <E>, and a file's prediction the official rule: the softmaxes at its
slices' <E>, weighted by slice length, summed (_train's val_loop). All weights train end to end; after
every epoch valid (else test) is evaluated, and results.json reports the best valid epoch (paper
§4.1). The loop is pretrain.py's plus that evaluation; the loss, softmaxes and aggregation run in
float32 outside autocast.
"""
import argparse
import contextlib
import csv
import json
import math
import multiprocessing
import os
import random
import sys
import time
from collections import namedtuple
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import model as M
import tokenizer as T
import training as TR

SPLITS = ("train", "valid", "test")
SPLIT_ALIASES = {"train": "train", "valid": "valid", "val": "valid", "validation": "valid", "test": "test"}
MIN_ROOM = 16  # a slice must hold at least this many body tokens besides prefix, <S> and <E>
Labels = namedtuple("Labels", "rows classes has_split")  # read_labels' result


class Fail(Exception):
    """A one-line error for the user: exit status 1, no traceback."""


# how log records print on stdout (OUT/log.jsonl has them as JSON)
LOG_FORMAT = {"loss": "loss {:.4f}", "lr": "lr {:.2e}", "ms": "{:.0f} ms/step",
              "tok_s": "{:,} tok/s per process", "mfu": "MFU {:.1%}", "eta_s": "ETA {}s"}


def get_args(argv=None):
    # defaults: paper §4.1 "Supervised finetuning" and the official aria/training/classifier_finetune.py
    ap = argparse.ArgumentParser(
        description="Aria classifier finetuning (and prediction with a finetuned model).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--labels", default=None,
                    help="CSV with a path, a label and optionally a split column (required to train)")
    ap.add_argument("--path_col", default="path",
                    help="CSV column of the MIDI paths (relative to the CSV's folder or absolute)")
    ap.add_argument("--label_col", default="label", help="CSV column of the labels (Pianist8: pianist)")
    ap.add_argument("--split_col", default="split",
                    help="CSV column of train/valid/test (Pianist8: split_midibert); "
                    "if the default column is absent: a stratified split (--valid_frac, --test_frac)")
    ap.add_argument("--valid_frac", type=float, default=0.1,
                    help="valid share per class when there is no split column (our choice)")
    ap.add_argument("--test_frac", type=float, default=0.1,
                    help="test share per class when there is no split column (our choice)")
    ap.add_argument("--init", default=None, help="pretrained checkpoint: a file (official .safetensors or "
                    "ours) or a folder; none: random init of --preset (from scratch, paper Table 2 †)")
    ap.add_argument("--preset", default="tiny", choices=list(M.PRESETS),
                    help="model size for --init none (as pretrain.py)")
    ap.add_argument("--slice_len", type=int, default=1024,
                    help="tokens per slice at most (official get_dataloaders: seq[:1024])")
    ap.add_argument("--n_train", type=int, default=None, help="class-balanced subset of this many training "
                    "files, drawn by --seed (paper §4.1, Table 2)")
    ap.add_argument("--resid_dropout", type=float, default=0.2, help="residual dropout at the last layer, "
                    "rising linearly from 0 at the first (paper §4.1)")
    ap.add_argument("--reinit_eos", type=int, default=1, help="re-initialize the <E> embedding row "
                    "N(0, 0.02) when starting from a checkpoint (official train(); 1/0)")
    ap.add_argument("--augment", action="store_true", help="pitch/tempo/velocity augmentation of training "
                    "slices (official --apply_aug; off by default there)")
    ap.add_argument("--predict", nargs="+", default=None, metavar="FILE",
                    help="print 'file<TAB>label<TAB>probability' per MIDI file with the model in --ckpt; "
                    "no training")
    ap.add_argument("--ckpt", default=None, help="for --predict: a finetuned checkpoint file or output "
                    "folder (its best.pt, else ckpt.pt); default --out")
    ap.add_argument("--out", default="out/cls",
                    help="checkpoints (ckpt.pt, best.pt), log.jsonl and results.json go here")
    ap.add_argument("--batch_size", type=int, default=16, help="slices per process per optimizer step (not "
                    "stated in the paper or the official code; pretraining's 16 per GPU)")
    ap.add_argument("--micro_batch", type=int, default=0,
                    help="slices per forward/backward (0: the most that fit the GPU's memory; all on CPU)")
    ap.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (paper §4.1)")
    ap.add_argument("--warmup", type=int, default=0, help="linear warmup steps (paper §4.1: none)")
    ap.add_argument("--final_lr_frac", type=float, default=0.1, help="then linear decay to this fraction of "
                    "lr (paper: linear decay; official _get_optim: LinearLR 1 -> 0.1)")
    ap.add_argument("--weight_decay", type=float, default=0.1,
                    help="AdamW, on all parameters; betas (0.9, 0.95), eps 1e-5 (official _get_optim)")
    ap.add_argument("--grad_clip", type=float, default=0.0,
                    help="clip the gradient norm (0: off, as the official code)")
    ap.add_argument("--epochs", type=float, default=10,
                    help="passes over the training slices (paper §4.1: 10, the best one reported)")
    ap.add_argument("--max_iters", type=int, default=None, help="optimizer steps (default: from --epochs)")
    ap.add_argument("--stop_at", type=int, default=None,
                    help="stop after this step without ending the schedule (split a run into jobs)")
    ap.add_argument("--grad_checkpoint", nargs="?", const="1", default="auto", choices=["auto", "0", "1"],
                    help="recompute each block's activations in backward (auto: only if no micro-batch fits "
                    "without)")
    ap.add_argument("--log_interval", type=int, default=10,
                    help="steps per log line (evaluation: after every epoch, paper §4.1)")
    ap.add_argument("--ckpt_interval", type=int, default=None,
                    help="steps between checkpoints (default: one epoch; and one at the end)")
    ap.add_argument("--workers", type=int, default=2, help="data loader worker processes")
    ap.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="autocast dtype of the model (loss and aggregation: float32); auto: bfloat16 on "
                    "CUDA only")
    ap.add_argument("--compile", type=int, default=1, help="torch.compile the model on CUDA (1/0)")
    ap.add_argument("--peak_tflops", type=float, default=0,
                    help="the device's dense bf16 TFLOP/s for MFU (0: from the GPU's name)")
    ap.add_argument("--seed", type=int, default=0,
                    help="model/head init, data order, --n_train subset and augmentation")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt with its saved settings")
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    return args if args.predict is not None else TR.resume_args(args, ap, argv)


# -----------------------------------------------------------------------------
# labels, splits, balanced subsets

def read_labels(csv_path, path_col="path", label_col="label", split_col="split", split_required=False,
                valid_frac=0.1, test_frac=0.1):
    """-> Labels(rows (full path, label, split, path as written), sorted classes, has_split). Without a
    split column, model.stratified_split decides. Raises Fail with one line on anything malformed."""
    p = Path(csv_path)
    if not p.is_file():
        raise Fail(f"{p}: no such labels file")
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            cols = [c.strip() for c in (reader.fieldnames or [])]
            reader.fieldnames = cols
            raw = list(reader)
    except (UnicodeDecodeError, csv.Error) as e:
        raise Fail(f"{p}: not a readable CSV file ({e})") from None
    if not cols:
        raise Fail(f"{p}: empty labels file (expected a header with {path_col!r} and {label_col!r})")
    for col in (path_col, label_col) + ((split_col,) if split_required else ()):
        if col not in cols:
            raise Fail(f"{p}: no column {col!r} (columns: {', '.join(cols)})")
    has_split = split_col in cols
    if not raw:
        raise Fail(f"{p}: no rows")
    rows, seen = [], set()
    for line, r in enumerate(raw, start=2):
        path, label = ((r.get(c) or "").strip() for c in (path_col, label_col))
        if not path or not label:
            raise Fail(f"{p}:{line}: empty {path_col if not path else label_col}")
        split = None
        if has_split:
            name = (r.get(split_col) or "").strip()
            if name.lower() not in SPLIT_ALIASES:
                raise Fail(f"{p}:{line}: unknown split {name!r} in column {split_col!r} "
                           "(expected train, valid or test)")
            split = SPLIT_ALIASES[name.lower()]
        full = Path(path) if Path(path).is_absolute() else p.parent / path
        if not full.is_file():
            raise Fail(f"{p}:{line}: {path}: no such file (paths are relative to {p.parent})")
        if str(full) in seen:
            raise Fail(f"{p}:{line}: {path} is listed twice")
        seen.add(str(full))
        rows.append((str(full), label, split, path))
    classes = sorted({r[1] for r in rows})
    if len(classes) < 2:
        raise Fail(f"{p}: a single class ({classes[0]!r}) in column {label_col!r}; "
                   "a classifier needs two or more")
    if not has_split:
        splits = TR.stratified_split([r[3] for r in rows], [r[1] for r in rows], valid_frac, test_frac)
        rows = [(a, b, s, d) for (a, b, _, d), s in zip(rows, splits)]
    return Labels(rows, classes, has_split)


def balanced_subset(labels, n, seed):
    """Indices of a class-balanced subset of n items (paper §4.1 "class-balanced subsets"): each
    class's items in an order drawn by seed, taken round-robin over the classes (in an order drawn
    by seed, which decides who gets the remainder) until n are taken. Class counts differ by at
    most one, unless a class runs out (then the others fill up). Sorted."""
    rng = np.random.default_rng(seed)
    pools = [rng.permutation([i for i, l in enumerate(labels) if l == c])[::-1] for c in sorted(set(labels))]
    order = rng.permutation(len(pools))  # round r takes item j of every pool: sort by (j, r)
    queue = sorted((j, r, int(i)) for r, k in enumerate(order) for j, i in enumerate(pools[k]))
    return sorted(i for _, _, i in queue[:n])


# -----------------------------------------------------------------------------
# tokenization and slices

def make_slices(ids, slice_len):
    """Cut a tokenized file `prefix <S> body [<E>]` into slices `prefix <S> part <E>` of at most
    slice_len tokens, as the official data has a prefix and <S> per note chunk (aria/eval/linear_probe.py,
    process_entry). Cuts fall before a note, drum or <T> token, and parts have about equal lengths (no
    short stub)."""
    ids = np.asarray(ids)
    bos = int(np.flatnonzero(ids == T.BOS_ID)[0])
    head, body = ids[:bos + 1], ids[bos + 1:]
    if len(body) and body[-1] == T.EOS_ID:
        body = body[:-1]
    room = slice_len - len(head) - 1  # body tokens per slice
    if room < MIN_ROOM:
        raise ValueError(f"--slice_len {slice_len} leaves {room} tokens after the {len(head)}-token prefix")
    cls = T.TOKEN_CLASS[body]
    can_cut = (cls == T.NOTE) | (cls == T.DRUM) | (body == T.SEG_ID)
    out, start = [], 0
    while start < len(body) or not out:
        remaining = len(body) - start
        if remaining <= room:
            end = len(body)
        else:  # k more parts of about equal length; 3 tokens of slack for cuts moved to an event start
            k = max(2, math.ceil(remaining / (room - 3)))
            want = start + math.ceil(remaining / k)
            # the cut points in (start, start + room]
            cand = start + 1 + np.flatnonzero(can_cut[start + 1:start + room + 1])
            end = int(cand[np.abs(cand - want).argmin()]) if len(cand) else start + room
        out.append(np.concatenate([head, body[start:end], [T.EOS_ID]]).astype(np.uint16))
        start = end
    return out


def tokenize_file(path, slice_len, pedal=False):
    """-> (slices, None) or (None, one-line error), in the model's vocabulary. Runs in pool workers."""
    try:
        return make_slices(T.tokenize(path, dim=False, eos=False, pedal=pedal), slice_len), None
    except T.TokenizerError as e:
        return None, str(e)
    except Exception as e:  # anything else a strange file provokes: report it, never die
        return None, f"{path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def tokenize_all(paths, slice_len, world=1, pedal=False):
    """Tokenize every file once, in a process pool when there are many."""
    job = partial(tokenize_file, slice_len=slice_len, pedal=pedal)
    procs = max(1, min(16, (os.cpu_count() or 1) // world))
    if len(paths) < 64 or procs == 1:
        return [job(p) for p in paths]
    with multiprocessing.Pool(procs) as pool:
        return pool.map(job, paths, chunksize=8)


class SliceSet(torch.utils.data.Dataset):
    """Sample g -> (ids (L,) right-padded with <P>, position of <E>, label). An epoch is the slices in
    the order perm(seed, epoch), wrapped round to fill its last step (epochs end at step boundaries);
    as in pretrain.py, g -> (epoch g // len, perm[g % len]), augmentation seeded by (seed, g)."""

    def __init__(self, slices, labels, per_step, seed, augment):
        self.slices, self.labels = slices, labels
        self.seed, self.augment = seed, augment
        self.n = len(slices)
        self.steps_per_epoch = max(1, math.ceil(self.n / per_step))
        self.len = self.steps_per_epoch * per_step
        self.width = max(len(s) for s in slices)
        self.perms = {}

    def __len__(self):
        return self.len

    def __getitem__(self, g):
        epoch, i = divmod(g, self.len)
        if epoch not in self.perms:
            self.perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        k = int(self.perms[epoch][i % self.n])
        x = self.slices[k].astype(np.int64)
        if self.augment:
            x = T.augment(x, random.Random(f"{self.seed}:{g}"))
            if not (x == T.EOS_ID).any():  # a tempo stretch pushed <E> out: force it (official)
                x[-1] = T.EOS_ID
        eos = int(np.flatnonzero(x == T.EOS_ID)[0])
        return torch.from_numpy(T.fit_length(x, self.width)), eos, self.labels[k]


def cls_loss(model, batch, autocast=contextlib.nullcontext(), device=None):
    """Cross-entropy of the class head at each slice's <E> (official _train) -> (loss, non-pad tokens).
    batch: the loader's CPU tensors (ids (B, L), <E> positions, labels), cut and counted on the host
    (.numpy() refuses a device tensor), then moved to `device`: a step never waits for the GPU. The
    model runs under `autocast`; the loss is float32, outside it."""
    ids, eos = batch[0], batch[1]
    y = batch[2]
    # causal attention: nothing after the batch's last <E> changes the outputs read, so it is cut;
    # the length rounded up to a multiple of 64 keeps the number of shapes (compile) small
    ids = ids[:, :min(ids.shape[1], -(-(eos.numpy().max() + 1) // 64) * 64)]
    n = int((ids.numpy() != T.PAD_ID).sum())
    if device:
        ids, eos = ids.to(device, non_blocking=True), eos.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
    with autocast:
        logits = model(ids, out_pos=eos)  # (B, C)
    return F.cross_entropy(logits.float(), y), n


# -----------------------------------------------------------------------------
# prediction, metrics, --predict

@torch.no_grad()
def predict_files(model, files, device, batch_size=16, rank=0, world=1, autocast=contextlib.nullcontext()):
    """files: list of lists of slices -> (n_files, C) float64 file probabilities by the official rule
    (_train's val_loop): the softmaxes at the slices' <E> weighted by slice length (non-pad tokens), summed.
    The model runs under `autocast`, the softmax and aggregation in float32/float64 outside it.
    Under DDP each rank does files rank, rank + world, ... and the results are summed across ranks."""
    model.eval()
    C = model.config.class_size
    mine = [(f, s) for f in range(rank, len(files), world) for s in files[f]]
    mine.sort(key=lambda fs: -len(fs[1]))  # similar lengths together: less padding
    per_file = {}
    for i in range(0, len(mine), batch_size):
        chunk = mine[i:i + batch_size]
        width = len(chunk[0][1])
        ids = torch.stack([torch.from_numpy(T.fit_length(s.astype(np.int64), width)) for _, s in chunk])
        ids = ids.to(device)
        eos = torch.tensor([len(s) - 1 for _, s in chunk], device=device)
        with autocast:
            logits = model(ids, out_pos=eos)  # (b, C)
        probs = logits.float().softmax(-1).double().cpu()
        for (f, s), p in zip(chunk, probs):
            per_file.setdefault(f, []).append((p, len(s)))
    out = torch.zeros(len(files), C, dtype=torch.float64)
    for f, ps in per_file.items():  # divided by the total weight: a distribution, the same argmax
        w = torch.tensor([n for _, n in ps], dtype=torch.float64)
        out[f] = (w[:, None] * torch.stack([p for p, _ in ps])).sum(0) / w.sum()
    if world > 1:
        t = out.to(device, torch.float32)  # NCCL has no float64 on every build; probabilities need no more
        torch.distributed.all_reduce(t)
        out = t.double().cpu()
    return out


def metrics(y_true, y_pred, classes):
    """Accuracy, macro-F1 (over the classes that occur in y_true or y_pred, as sklearn), per-class
    precision/recall/F1/support, and the confusion matrix (rows: true class, columns: predicted)."""
    C = len(classes)
    conf = np.zeros((C, C), dtype=np.int64)
    np.add.at(conf, (np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)), 1)
    tp = np.diag(conf)
    pred, true = conf.sum(0), conf.sum(1)  # per class: predicted, true
    prec, rec = tp / np.maximum(pred, 1), tp / np.maximum(true, 1)
    f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-12), 0.0)
    per_class = {c: {"precision": round(float(prec[k]), 4), "recall": round(float(rec[k]), 4),
                     "f1": round(float(f1[k]), 4), "support": int(true[k])} for k, c in enumerate(classes)}
    n, present = int(conf.sum()), (pred + true) > 0
    return {"accuracy": round(float(np.trace(conf) / n), 4) if n else 0.0,
            "macro_f1": round(float(f1[present].mean()), 4) if present.any() else 0.0,
            "n_files": n, "per_class": per_class, "confusion": conf.tolist()}


def predict_main(args):
    src = Path(args.ckpt or args.out)
    if src.is_dir() and (src / "best.pt").is_file():
        src = src / "best.pt"  # the best valid epoch, not the last one
    saved = M.load_checkpoint(src).get("args", {})
    classes, slice_len = saved.get("classes"), saved.get("slice_len", 1024)
    if not classes:
        raise Fail(f"{M.resolve_checkpoint(src)}: no class names inside (not written by finetune_cls.py)")
    device = TR.setup_distributed(args.device).device
    model = M.load_model(src, device=device, heads=("cls",))
    amp = TR.autocast_dtype(args.dtype, device)
    autocast = torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)
    failed = 0
    for path in args.predict:
        slices, err = tokenize_file(path, slice_len, model.pedal)
        if err:
            print(f"finetune_cls.py: {err}", file=sys.stderr, flush=True)
            failed += 1
            continue
        p = predict_files(model, [slices], device, autocast=autocast)[0]
        k = int(p.argmax())
        print(f"{path}\t{classes[k]}\t{p[k]:.4f}", flush=True)
    return 1 if failed else 0


# -----------------------------------------------------------------------------
# training

def build_model(args, n_classes, out):
    overrides = dict(class_size=n_classes, resid_dropout=args.resid_dropout)
    torch.manual_seed(args.seed)  # the fresh class head (and everything with --init none)
    if args.resume:  # our own checkpoint (the loop restores the optimizer, step and RNG)
        return M.load_model(Path(out) / "ckpt.pt", heads=("cls",), **overrides)
    if args.init in (None, "", "none"):
        cfg = M.PRESETS[args.preset]
        cfg = replace(cfg, max_seq_len=max(cfg.max_seq_len, args.slice_len), **overrides)
        return M.Aria(cfg, ("cls",))
    model = M.load_model(args.init, heads=("cls",), **overrides)
    if args.reinit_eos:
        # as the official classifier_finetune.py train() (the paper does not say): in pretraining <E>
        # only marks "the next file starts here", so a small fresh row is a neutral query to finetune
        with torch.no_grad():
            model.model.tok_embeddings.weight[T.EOS_ID].normal_(0.0, 0.02)
    if args.slice_len > model.config.max_seq_len:
        raise Fail(f"--slice_len {args.slice_len} exceeds the model's context ({model.config.max_seq_len})")
    return model


def say(master, *args, **kwargs):
    """print, flushed, on the first process only."""
    if master:
        print(*args, **kwargs, flush=True)


def log(master, out, rec):
    """One line on stdout and one JSON record in OUT/log.jsonl, from the first process only."""
    if master:
        print(" | ".join(LOG_FORMAT.get(k, k + " {}").format(v) for k, v in rec.items()), flush=True)
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")


def load_files(args, rows, classes, pedal, world, master):
    """Every file tokenized once and cut into slices -> ({split: [(path, label id, slices)]}, skipped)."""
    cls_id = {c: i for i, c in enumerate(classes)}
    skipped, files = [], {s: [] for s in SPLITS}
    tokenized = tokenize_all([r[0] for r in rows], args.slice_len, world, pedal)
    for (path, label, split, _), (slices, err) in zip(rows, tokenized):
        if err:
            skipped.append(err)
            say(master, f"finetune_cls.py: skipping {err}", file=sys.stderr)
        else:
            files[split].append((path, cls_id[label], slices))
    if args.n_train is not None:  # a class-balanced training subset
        if args.n_train < len(classes):
            raise Fail(f"--n_train {args.n_train} is fewer than the {len(classes)} classes")
        subset = balanced_subset([f[1] for f in files["train"]], args.n_train, args.seed)
        files["train"] = [files["train"][i] for i in subset]
    if len({f[1] for f in files["train"]}) < 2:
        raise Fail(f"{args.labels}: fewer than two classes among the readable training files")
    return files, skipped


def evaluate(raw, eval_sets, classes, step, spe, micro, rank, world, device, autocast):
    """An epoch's metrics on valid and test (paper §4.1: the best epoch is reported) -> results entry."""
    entry = {"epoch": round(step / spe, 3), "step": step}
    for name, fs in eval_sets.items():
        probs = predict_files(raw, [f[2] for f in fs], device, micro, rank, world, autocast)
        entry[name] = metrics([f[1] for f in fs], probs.argmax(1).tolist(), classes)
    raw.train()
    return entry


def best_epoch(history, select):
    """The best evaluated epoch: by `select` (valid, else test) accuracy, then macro-F1, then the earlier."""
    return max(history, key=lambda e: (e[select]["accuracy"], e[select]["macro_f1"], -e["step"]))


def main():
    try:
        args = get_args()
        if args.predict is not None:
            sys.exit(predict_main(args))
        train(args)
    except (Fail, M.CheckpointError) as e:
        sys.exit(f"finetune_cls.py: {e}")


def train(args):
    if not args.labels:
        raise Fail("--labels is required (a CSV with path and label columns; see --help)")
    if args.slice_len < MIN_ROOM + 8:
        raise Fail(f"--slice_len {args.slice_len} is too short")
    proc = TR.setup_distributed(args.device)
    rank, world = proc.rank, proc.world
    device = proc.device
    out, master = Path(args.out), rank == 0
    amp = TR.autocast_dtype(args.dtype, device)
    autocast = torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)

    # data: every file tokenized once and cut into slices; an optional balanced training subset
    labels = read_labels(args.labels, args.path_col, args.label_col, args.split_col,
                         args.split_col != "split", args.valid_frac, args.test_frac)
    classes = labels.classes
    model = build_model(args, len(classes), out).to(device).train()  # first: files use its vocabulary
    files, skipped = load_files(args, labels.rows, classes, model.pedal, world, master)
    select = "valid" if files["valid"] else "test"
    if not files[select]:
        raise Fail(f"{args.labels}: no readable valid or test files to evaluate on")
    eval_sets = {s: files[s] for s in ("valid", "test") if files[s]}
    ckpt = M.load_checkpoint(out / "ckpt.pt") if args.resume else None
    if ckpt and ckpt.get("args", {}).get("classes") != classes:
        raise Fail(f"{args.labels}: its classes differ from those of the run in {out}")
    args.classes = classes  # saved in every checkpoint (vars(args)): --predict needs the names

    train_slices = [s for f in files["train"] for s in f[2]]
    train_labels = [f[1] for f in files["train"] for _ in f[2]]
    planned = TR.plan_batch(model.config, args.slice_len, args.batch_size, device, args.micro_batch,
                           args.grad_checkpoint, amp is not None, lm_head=False)  # (micro, ckpt, bytes, line)
    micro, model.config.grad_checkpoint = planned.micro, planned.grad_ckpt
    plan = planned.line
    accum, per_step = args.batch_size // micro, args.batch_size * world
    train_set = SliceSet(train_slices, train_labels, per_step, args.seed, args.augment)
    spe = train_set.steps_per_epoch
    if args.max_iters is None:
        args.max_iters = max(1, round(args.epochs * spe))
    args.warmup = min(args.warmup, args.max_iters)
    args.ckpt_interval = args.ckpt_interval or spe
    counts = {s: len(files[s]) for s in SPLITS}
    run = {"classes": classes, "files": counts, "split": "csv" if labels.has_split else "stratified",
           "skipped": skipped, "train_slices": len(train_slices), "steps_per_epoch": spe,
           "selected_on": select}
    if master:
        out.mkdir(parents=True, exist_ok=True)
    say(master, f"finetune_cls: {len(classes)} classes {classes}; files {counts} ({len(skipped)} skipped); "
        f"{len(train_slices)} training slices of <= {args.slice_len} tokens; "
        f"init {f'none ({args.preset}, random)' if args.init in (None, '', 'none') else args.init} "
        f"({model.num_params() / 1e6:.1f}M params) on {device}, world {world}, "
        f"{'autocast ' + str(amp).replace('torch.', '') if amp else 'float32'}; {args.max_iters} steps of "
        f"{per_step} slices ({args.max_iters / spe:.2f} epochs of {spe} steps); per process {plan}")

    # optimizer; --resume restores weights, optimizer moments, step and RNG (dropout masks included)
    opt = TR.configure_optimizer(model, args.lr, args.weight_decay, device_type=device.type)
    step, history = 0, []  # history: one results.json entry per evaluated epoch
    if ckpt:
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        torch.set_rng_state(ckpt["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in ckpt:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
        history = ckpt.get("history", [])  # evaluated epochs up to this step
        say(master, f"resuming from {out / 'ckpt.pt'} at step {step}")
    raw, ddp = model, None  # what we save and evaluate: `raw`; compile wraps DDP (pretrain.py says why)
    if torch.distributed.is_initialized():
        device_ids = [device.index] if device.type == "cuda" else None
        model = ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if device.type == "cuda" and args.compile:
        model = torch.compile(model)

    # the loader yields this rank's micro-batches from `step` on (TR.StepSampler); its own
    # generator, so that starting it does not draw from the restored global RNG
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=micro, sampler=TR.StepSampler(step, micro, accum, rank, world),
        num_workers=args.workers, pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
        generator=torch.Generator().manual_seed(0))
    batches = iter(loader)
    stop = min(args.max_iters, args.stop_at or args.max_iters)
    first = step
    # rates count training only: the clock is stopped for evaluation and checkpoints, and the
    # first step of a job (compilation, loader start-up) is reported on its own
    t_mark, busy = time.time(), 0.0
    n_steps, n_tokens = 0, 0
    model.train()
    while step < stop:
        lr = TR.lr_at(step, args.lr, args.warmup, args.max_iters, args.final_lr_frac)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        try:
            for i in range(accum):
                if ddp is not None:  # under torchrun: all-reduce gradients in the last micro-step's backward
                    ddp.require_backward_grad_sync = i == accum - 1
                loss, n = cls_loss(model, next(batches), autocast, device)  # CPU (ids, <E> positions, labels)
                (loss / accum).backward()
                loss_sum += loss.detach() / accum
                n_tokens += n  # this process's: tokens/s and MFU are per process (per GPU)
            if args.grad_clip:
                torch.nn.utils.clip_grad_norm_(raw.parameters(), args.grad_clip)
            opt.step()
        except torch.cuda.OutOfMemoryError:
            raise Fail(f"out of GPU memory with micro-batches of {micro} x {args.slice_len} and activation "
                       f"checkpointing {'on' if raw.config.grad_checkpoint else 'off'}: "
                       "lower --micro_batch or set --grad_checkpoint 1") from None
        opt.zero_grad(set_to_none=True)
        step += 1
        n_steps += 1

        if step == first + 1 and step < stop:
            if device.type == "cuda":  # CUDA runs ahead of Python: wait for it before reading a clock
                torch.cuda.synchronize(device)
            say(master, f"first step took {time.time() - t_mark:.1f} s (compilation, loader start-up); "
                "not in the rates")
            t_mark, busy = time.time(), 0.0
            n_steps, n_tokens = 0, 0
        if step % args.log_interval == 0 or step == stop:
            if world > 1:
                torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.AVG)
            loss = loss_sum.item()  # waits for the device: the clock below is honest
            busy += time.time() - t_mark
            rec = {"step": step, "loss": round(loss, 6), "lr": float(f"{lr:.3e}")}
            if n_steps:  # tokens: the slices' non-pad tokens
                mfu = TR.estimate_mfu(raw.config, args.slice_len, n_tokens / busy, lm_head=False,
                                     peak=args.peak_tflops * 1e12) \
                    if device.type == "cuda" or args.peak_tflops else None
                rec.update(ms=round(1e3 * busy / n_steps, 1), tok_s=round(n_tokens / busy),
                           **({"mfu": round(mfu, 4)} if mfu else {}),
                           eta_s=round((stop - step) * busy / n_steps))
            log(master, out, rec)
            t_mark, busy = time.time(), 0.0
            n_steps, n_tokens = 0, 0
        epoch_end = step % spe == 0 or step == args.max_iters  # a mid-epoch --stop_at: after resuming
        saving = step % args.ckpt_interval == 0 or step == stop
        if epoch_end or saving:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            busy += time.time() - t_mark
            if epoch_end:  # metrics on stdout and in log.jsonl; per class and confusion: results.json
                entry = evaluate(raw, eval_sets, classes, step, spe, micro, rank, world, device, autocast)
                history = [e for e in history if e["step"] != step] + [entry]
                best = best_epoch(history, select)
                say(master, f"epoch {entry['epoch']:g} (step {step})")
                for name in eval_sets:
                    m = entry[name]
                    say(master, f"  {name}: accuracy {m['accuracy']:.4f} | macro-F1 {m['macro_f1']:.4f} | "
                        f"{m['n_files']} files")
                if master:
                    summary = {"epoch": best["epoch"], "step": best["step"],
                               **{k: best[k] for k in eval_sets}}
                    results = {**run, "best": summary, "epochs": history, "args": vars(args)}
                    M.atomic_write(out / "results.json",
                                   lambda f: f.write((json.dumps(results, indent=1) + "\n").encode()))
                    if best is entry:  # best.pt: the best epoch's weights, for --predict
                        M.save_checkpoint(out / "best.pt", raw, step=step, epoch=entry["epoch"],
                                          args=vars(args))
                log(master, out, {"step": step, "epoch": entry["epoch"],
                                  **{f"{s}_{k[:3] if k == 'accuracy' else 'f1'}": entry[s][k]
                                     for s in eval_sets for k in ("accuracy", "macro_f1")}})
            if saving:  # OUT/ckpt.pt: weights, optimizer, step, settings, evaluated epochs, RNG
                if master:
                    rng_cuda = {"rng_cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}
                    M.save_checkpoint(out / "ckpt.pt", raw, optimizer=opt.state_dict(), step=step,
                                      args=vars(args), history=history, rng_cpu=torch.get_rng_state(),
                                      **rng_cuda)
                if world > 1:
                    torch.distributed.barrier()
            t_mark = time.time()
    if history:
        b = best_epoch(history, select)
        say(master, f"best epoch {b['epoch']:g} (by {select} accuracy): " + " | ".join(
            f"{s} accuracy {b[s]['accuracy']:.4f} macro-F1 {b[s]['macro_f1']:.4f}" for s in eval_sets)
            + f"; results in {out / 'results.json'}")
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
