"""
MIDI file embeddings with an Aria embedding model (paper §3.3, §4.1; official aria/embedding.py and
aria/eval/linear_probe.py, EleutherAI/aria @ b0486c8, with aria-utils @ e122d03): write them, find
similar files, run the paper's linear probe, draw a map.

    python embed.py --ckpt out/emb song.mid ~/midi --out emb.npy        # emb.npy + emb.files.txt
    python embed.py --ckpt aria-medium-embedding/model.safetensors ~/midi --nearest 5 query.mid
    python embed.py --ckpt out/emb --probe ../shared/data/pianist8/labels_splits.csv \\
        --label_col pianist --split_col split_midibert --out p8.npy --map p8.png
    python embed.py --emb p8.npy --probe labels.csv ...                 # probe saved embeddings again
    python embed.py --ckpt out/pretrain --head hidden ...               # a plain LM's hidden state at <E>

A file's embedding is exactly the official get_global_embedding_from_midi (embedding.py): the file is
cut into consecutive 300-note chunks, each tokenized without <D> as `prefix <S> notes <E>` (cut to
2048 tokens, the last forced to <E>), and the embedding head's outputs at the chunks' <E> are
averaged, unweighted and not normalized; with the official aria-medium-embedding weights it gives
the official vectors. Chunks of many files are run together in batches, right-padded (the model is
causal, so padding after <E> changes nothing) and sorted by length to waste little.

The probe (paper §4.1; official linear_probe.py, ClassifierHead) trains a linear classifier with bias on
the frozen, raw file
embeddings of the CSV's train split: AdamW (lr 3e-4, weight decay 0.1, betas (0.9, 0.95), eps 1e-5),
the learning rate decaying linearly to 0, separately for 10, 20 and 50 epochs; it reports accuracy
and macro-F1 on the test split for each and, as the paper does, the best.

Precision: float32 by default (--dtype auto), with TF32 matmuls on CUDA; --dtype float32 keeps
IEEE float32 matmuls there too (the official vectors within 2e-7; TF32 and bf16 autocast have not
run on a GPU yet). With --dtype bfloat16 only the model's forward runs under autocast;
its outputs are taken to float32, and everything after it (the mean over chunks, cosines, the probe,
PCA) runs in float32 or float64 with autocast off, even inside a caller's autocast.
"""
import argparse
import csv
import json
import os
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import model as M
import tokenizer as T
import training as TR

MIDI_SUFFIXES = (".mid", ".midi")
SPLIT_ALIASES = {"train": "train", "valid": "valid", "val": "valid", "validation": "valid", "test": "test"}
Embeddings = namedtuple("Embeddings", "emb files errors")  # embed_files' result


class Fail(Exception):
    """A one-line error for the user: exit status 1, no traceback."""


def get_args(argv=None):
    ap = argparse.ArgumentParser(
        description="Embed MIDI files with an Aria embedding model; nearest files, linear probe, map.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("inputs", nargs="*", metavar="FILE_OR_DIR",
                    help="MIDI files, or folders searched recursively for *.mid/*.midi")
    ap.add_argument("--ckpt", default=None, help="embedding model: official .safetensors "
                    "(aria-medium-embedding), our .pt, or an output folder")
    ap.add_argument("--emb", default=None, metavar="X.npy",
                    help="use embeddings saved by --out (rows named by X.files.txt) instead of a model")
    ap.add_argument("--head", default="emb", choices=["emb", "hidden"],
                    help="emb: the embedding head at <E> (official get_embedding_from_seq); hidden: the "
                         "final hidden state at <E>, for models without an embedding head (a plain "
                         "pretrained LM as a baseline)")
    ap.add_argument("--out", default=None, metavar="X.npy",
                    help="write the embeddings (float32, one row per file, in input order) here and the "
                         "files' paths to X.files.txt")
    ap.add_argument("--nearest", nargs=2, default=None, metavar=("K", "QUERY"),
                    help="print the K files most similar (cosine) to the MIDI file QUERY among the inputs")
    ap.add_argument("--probe", default=None, metavar="LABELS.csv",
                    help="linear probe (paper §4.1): CSV with path (relative to the CSV or absolute), label "
                         "and split (train/valid/test) columns; without the split column the deterministic "
                         "stratified split of finetune_cls.py (80/10/10 per class); its files are embedded "
                         "too")
    ap.add_argument("--path_col", default="path", help="CSV column of the paths")
    ap.add_argument("--label_col", default="label", help="CSV column of the labels (Pianist8: pianist)")
    ap.add_argument("--split_col", default="split", help="CSV column of the split (Pianist8: split_midibert)")
    ap.add_argument("--probe_epochs", default="10,20,50",
                    help="separate probes with these epoch counts, best reported (paper §4.1)")
    ap.add_argument("--probe_lr", type=float, default=3e-4,
                    help="probe learning rate, linear decay to 0 (paper §4.1)")
    ap.add_argument("--probe_batch_size", type=int, default=16,
                    help="probe batch size (not given by the paper or the official code: our choice)")
    ap.add_argument("--probe_weight_decay", type=float, default=0.1,
                    help="probe AdamW weight decay (official aria/eval/linear_probe.py, _get_optim)")
    ap.add_argument("--probe_out", default=None, metavar="RESULTS.json",
                    help="write the probe's results here")
    ap.add_argument("--map", default=None, metavar="OUT.png", help="2-D PCA map of the embeddings coloured "
                    "by label (paper Fig. 1; by folder without --probe); needs matplotlib")
    ap.add_argument("--notes_per_chunk", type=int, default=300,
                    help="notes per chunk (official get_global_embedding_from_midi)")
    ap.add_argument("--max_len", type=int, default=2048, help="tokens per chunk at most (official "
                    "get_global_embedding_from_midi), capped at the model's context")
    ap.add_argument("--max_chunks", type=int, default=0, help="embed only the first this many chunks of "
                    "each file (0: all, as official); for quick looks")
    ap.add_argument("--batch_size", type=int, default=16, help="chunks per forward pass")
    ap.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "tf32", "bfloat16"],
                    help="the model's matmuls: float32 reproduces the official vectors (within 2e-7); "
                         "tf32: float32 with TF32 matmuls on CUDA (as float32 elsewhere); auto: tf32 on "
                         "CUDA, float32 elsewhere; bfloat16 runs the forward under autocast (on CPU it shows "
                         "what CUDA does); means, cosines, probe and PCA are float32 either way")
    ap.add_argument("--seed", type=int, default=0, help="probe initialisation and shuffling")
    args = ap.parse_args(argv)
    if not (args.out or args.nearest or args.probe or args.map):
        ap.error("nothing to do: give --out, --nearest, --probe and/or --map")
    if (args.ckpt is None) == (args.emb is None):
        ap.error("give exactly one of --ckpt (a model) and --emb (saved embeddings)")
    return args


# -----------------------------------------------------------------------------
# model and embeddings


def load_embedder(path, device="cpu", head="emb"):
    """A model for embedding: its emb head (head="emb"), or any model's final hidden state (head="hidden")."""
    try:
        model = M.load_model(path, device=device)
    except M.CheckpointError as e:
        raise Fail(str(e)) from None
    if head == "emb" and model.emb_head is None:
        raise Fail(f"{M.resolve_checkpoint(path)}: no embedding head (it has {', '.join(model.heads)}); "
                   "train one with finetune_contrastive.py, or pass --head hidden to use the final hidden "
                   "state at <E>")
    return model


def find_midi(inputs):
    """Files as given, folders expanded (recursive, sorted). Raises Fail for a path that does not exist."""
    files = []
    for x in inputs:
        p = Path(x)
        if p.is_dir():
            files += sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in MIDI_SUFFIXES and f.is_file())
        elif p.exists():
            files.append(str(p))
        else:
            raise Fail(f"{p}: no such file or directory")
    return files


def file_chunks(path, notes_per_chunk=300, max_len=2048, max_chunks=0, pedal=False):
    """-> (chunks, None) or (None, one-line error). The official chunk ids (embedding.py, _get_chunks and
    get_global_embedding_from_midi), in the model's vocabulary (pedal: the 17,729-token one)."""
    try:
        score = T.load_midi(path)
        if max_chunks:
            score = score.with_notes(score.notes[:max_chunks * notes_per_chunk])
        return T.note_chunks(score, notes_per_chunk, max_len, pedal=pedal), None
    except T.TokenizerError as e:
        return None, str(e)
    except Exception as e:  # anything else a strange file provokes: report it, never die
        return None, f"{path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


@torch.no_grad()
def embed_chunks(model, chunks, batch_size=16, head="emb", dtype=torch.float32):
    """Token id lists, each ending in <E> -> (n, E) float32 outputs at their last position.
    dtype bfloat16: the forward runs under autocast; float32: autocast off, whatever the caller has on."""
    model.eval()
    device = model.model.tok_embeddings.weight.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    order = sorted(range(len(chunks)), key=lambda i: -len(chunks[i]))
    out = [None] * len(chunks)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        width = len(chunks[idx[0]])
        ids = torch.tensor(np.stack([T.fit_length(chunks[j], width) for j in idx]), device=device)
        eos = torch.tensor([len(chunks[j]) - 1 for j in idx], device=device)
        with autocast:
            if head == "hidden":
                z = model.hidden(ids)[torch.arange(len(idx), device=device), eos]
            else:
                z = model(ids, out_pos=eos, head="emb")
        for j, row in zip(idx, z.float().cpu()):
            out[j] = row
    return torch.stack(out) if out else torch.zeros(0, model.config.emb_size or model.config.d_model)


# Everything after the model runs with CPU autocast off (its tensors are on the CPU), so that a
# caller's autocast (a training script's evaluation, a test) cannot turn a mean, a cosine or the
# probe's matmuls into bfloat16; only embed_chunks' forward follows --dtype.
@torch.autocast("cpu", enabled=False)
def embed_files(model, paths, batch_size=16, head="emb", notes_per_chunk=300, max_len=2048, max_chunks=0,
                on_error=None, block=64, dtype=torch.float32):
    """Global embeddings of MIDI files: the unweighted mean over each file's chunk embeddings
    (official get_global_embedding_from_midi), in float32. -> Embeddings(float32 array (n_ok, E), paths
    embedded, errors). Files are taken `block` at a time, so memory stays flat on big folders."""
    max_len = min(max_len, model.config.max_seq_len)
    embs, ok = [], []
    errors = []
    for b in range(0, len(paths), block):
        group = paths[b:b + block]
        chunks, owner = [], []
        for p in group:
            c, err = file_chunks(p, notes_per_chunk, max_len, max_chunks, model.pedal)
            if err:
                errors.append(err)
                if on_error:
                    on_error(err)
                continue
            owner += [len(ok)] * len(c)
            chunks += c
            ok.append(p)
        if not chunks:
            continue
        z = embed_chunks(model, chunks, batch_size, head, dtype)  # (n_chunks, E) float32
        owner = torch.tensor(owner)
        for f in owner.unique().tolist():
            embs.append(z[owner == f].mean(0))
    dim = model.config.emb_size if head == "emb" else model.config.d_model
    arr = torch.stack(embs).numpy() if embs else np.zeros((0, dim), dtype=np.float32)
    return Embeddings(arr.astype(np.float32), ok, errors)


def global_embedding(model, path, **kw):
    """One file's embedding (E,), as the official get_global_embedding_from_midi. Raises T.TokenizerError."""
    got = embed_files(model, [path], **kw)
    if got.errors:
        raise T.TokenizerError(got.errors[0])
    return got.emb[0]


def save_embeddings(path, emb, files):
    path = Path(path)
    M.atomic_write(path, lambda f: np.save(f, emb))
    M.atomic_write(path.with_suffix(".files.txt"),
                   lambda f: f.write("".join(x + "\n" for x in files).encode()))


def load_embeddings(path):
    path = Path(path)
    names = path.with_suffix(".files.txt")
    if not path.is_file():
        raise Fail(f"{path}: no such file")
    if not names.is_file():
        raise Fail(f"{names}: no such file (written beside the embeddings by --out)")
    try:
        emb = np.load(path)
    except Exception as e:
        raise Fail(f"{path}: not a .npy array ({e})") from None
    files = names.read_text().splitlines()
    if emb.ndim != 2 or len(files) != len(emb):
        raise Fail(f"{path}: {emb.shape} array for {len(files)} names in {names}")
    return emb.astype(np.float32), files


# -----------------------------------------------------------------------------
# nearest files, the linear probe, the map


@torch.autocast("cpu", enabled=False)
def cosine_nearest(emb, query, k):
    """-> [(index, cosine)] of the k rows of emb most similar to query (E,)."""
    e = F.normalize(torch.as_tensor(emb, dtype=torch.float64), dim=-1)
    q = F.normalize(torch.as_tensor(query, dtype=torch.float64), dim=-1)
    sim = e @ q
    top = torch.argsort(sim, descending=True, stable=True)[:k]
    return [(int(i), float(sim[i])) for i in top]


def read_labels(csv_path, path_col="path", label_col="label", split_col="split"):
    """-> (rows (path resolved against the CSV's folder, label, split), "csv" or "stratified"). Without
    a split column (the default name absent) model.stratified_split decides, as in finetune_cls.py.
    Raises Fail on anything malformed."""
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
    has_split = split_col in cols or split_col != "split"
    for col in (path_col, label_col) + ((split_col,) if has_split else ()):
        if col not in cols:
            raise Fail(f"{p}: no column {col!r} (columns: {', '.join(cols) or 'none'}); "
                       "see --path_col/--label_col/--split_col")
    rows = []
    for line, r in enumerate(raw, start=2):
        path, label = ((r.get(c) or "").strip() for c in (path_col, label_col))
        split = (r.get(split_col) or "").strip()
        if not path or not label:
            raise Fail(f"{p}:{line}: empty {path_col if not path else label_col}")
        if not has_split:
            split = "train"  # replaced below
        elif split.lower() not in SPLIT_ALIASES:
            raise Fail(f"{p}:{line}: unknown split {split!r} in column {split_col!r} "
                       "(expected train, valid or test)")
        full = Path(path) if Path(path).is_absolute() else p.parent / path
        if not full.is_file():
            raise Fail(f"{p}:{line}: {path}: no such file (paths are relative to {p.parent})")
        rows.append((str(full), label, SPLIT_ALIASES[split.lower()], path))
    if not rows:
        raise Fail(f"{p}: no rows")
    if has_split:
        splits = [r[2] for r in rows]
    else:
        splits = TR.stratified_split([r[3] for r in rows], [r[1] for r in rows])
    rows = [(full, label, split) for (full, label, _, _), split in zip(rows, splits)]
    return rows, "csv" if has_split else "stratified"


def metrics(y_true, y_pred, n_classes):
    """Accuracy and macro-F1 (mean F1 over the classes present in y_true or y_pred, as sklearn)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    f1s = []
    for c in range(n_classes):
        tp = int(((y_pred == c) & (y_true == c)).sum())
        pred, true = int((y_pred == c).sum()), int((y_true == c).sum())
        if pred or true:
            f1s.append(2 * tp / (pred + true))
    return {"accuracy": float((y_true == y_pred).mean()) if len(y_true) else 0.0,
            "macro_f1": float(np.mean(f1s)) if f1s else 0.0}


@torch.autocast("cpu", enabled=False)
def train_probe(x, y, n_classes, epochs, lr=3e-4, batch_size=16, weight_decay=0.1, seed=0):
    """A linear classifier with bias (official linear_probe.py, ClassifierHead) on frozen embeddings
    x (n, E): AdamW, betas (0.9, 0.95), eps 1e-5, cross-entropy, the learning rate decaying linearly
    from lr to 0 over all steps (paper §4.1), reshuffled every epoch. -> nn.Linear."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)
    clf = torch.nn.Linear(x.shape[1], n_classes)
    with torch.no_grad():  # PyTorch's default init, drawn from the seeded generator
        bound = 1 / x.shape[1] ** 0.5
        clf.weight.uniform_(-bound, bound, generator=g)
        clf.bias.uniform_(-bound, bound, generator=g)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95), eps=1e-5)
    steps_per_epoch = -(-len(x) // batch_size)
    total, step = epochs * steps_per_epoch, 0
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            for group in opt.param_groups:
                group["lr"] = lr * (1 - step / total)
            loss = F.cross_entropy(clf(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    return clf


@torch.autocast("cpu", enabled=False)
def linear_probe(emb, labels, splits, epochs=(10, 20, 50), lr=3e-4, batch_size=16, weight_decay=0.1, seed=0):
    """The paper's probe: one classifier per epoch count, trained on the train split, scored on
    test (and valid, if any). -> {"classes", "files", "runs": [{epochs, train_loss, test: {accuracy,
    macro_f1}, valid: ...}], "best": the run with the best test accuracy (then macro-F1), as the
    paper reports}. train_loss (final cross-entropy on the train split) shows under- or overfitting."""
    classes = sorted(set(labels))
    y = np.array([classes.index(l) for l in labels])
    splits = np.asarray(splits)
    emb = np.asarray(emb, dtype=np.float32)
    train = splits == "train"
    if len(set(y[train])) < 2:
        raise Fail("the probe needs training files of at least two classes")
    if not (splits == "test").any():
        raise Fail("the probe needs files in the test split")
    runs = []
    for n_ep in epochs:
        clf = train_probe(emb[train], y[train], len(classes), n_ep, lr, batch_size, weight_decay, seed)
        with torch.no_grad():
            x_train = torch.from_numpy(emb[train])
            train_loss = F.cross_entropy(clf(x_train), torch.from_numpy(y[train]))
            run = {"epochs": n_ep, "train_loss": float(train_loss)}
            for s in ("test", "valid"):
                m = splits == s
                if m.any():
                    pred = clf(torch.from_numpy(emb[m])).argmax(1).numpy()
                    run[s] = metrics(y[m], pred, len(classes))
        runs.append(run)
    best = max(runs, key=lambda r: (r["test"]["accuracy"], r["test"]["macro_f1"]))
    return {"classes": classes, "files": {s: int((splits == s).sum()) for s in ("train", "valid", "test")},
            "dim": int(emb.shape[1]), "runs": runs, "best": best}


def format_probe(res):
    lines = [f"probe: {len(res['classes'])} classes, files train {res['files']['train']} / valid "
             f"{res['files']['valid']} / test {res['files']['test']}, embeddings of {res['dim']} dims",
             "epochs  train_loss  test_acc  test_f1"
             + ("  valid_acc  valid_f1" if res["files"]["valid"] else "")]
    for r in res["runs"]:
        line = (f"{r['epochs']:6d}  {r['train_loss']:10.4f}  {r['test']['accuracy']:8.4f}  "
                f"{r['test']['macro_f1']:7.4f}")
        if "valid" in r:
            line += f"  {r['valid']['accuracy']:9.4f}  {r['valid']['macro_f1']:8.4f}"
        lines.append(line)
    b = res["best"]
    lines.append(f"best (test accuracy, paper §4.1): {b['epochs']} epochs, "
                 f"accuracy {b['test']['accuracy']:.4f}, macro-F1 {b['test']['macro_f1']:.4f}")
    return "\n".join(lines)


@torch.autocast("cpu", enabled=False)
def pca_2d(x):
    """(n, E) -> (n, 2): the projection on the first two principal components."""
    x = torch.as_tensor(x, dtype=torch.float64)
    x = x - x.mean(0)
    v = torch.linalg.svd(x, full_matrices=False).Vh
    return (x @ v[:2].T).numpy()


def draw_map(path, emb, groups, title=""):
    """Scatter the 2-D PCA of emb coloured by group. -> False (and nothing written) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    xy = pca_2d(emb)
    fig, ax = plt.subplots(figsize=(7, 6))
    names = sorted(set(groups))
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    for i, name in enumerate(names):
        m = np.array([g == name for g in groups])
        ax.scatter(xy[m, 0], xy[m, 1], s=12, color=cmap(i % cmap.N), label=name)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title)
    if len(names) <= 20:
        ax.legend(fontsize=7, markerscale=1.5)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return True


# -----------------------------------------------------------------------------

def main(argv=None):
    try:
        return run(get_args(argv))
    except Fail as e:
        print(f"embed.py: {e}", file=sys.stderr)
        return 1


def run(args):
    def warn(msg):
        print(f"embed.py: skipping {msg}", file=sys.stderr, flush=True)

    for bad, msg in ((args.notes_per_chunk < 1, "--notes_per_chunk must be at least 1"),
                     (args.max_len < 2, "--max_len must be at least 2 (a chunk needs room for <E>)"),
                     (args.max_chunks < 0, "--max_chunks must be 0 (all) or more"),
                     (args.batch_size < 1, "--batch_size must be at least 1"),
                     (args.probe_batch_size < 1, "--probe_batch_size must be at least 1"),
                     (args.probe_lr < 0 or args.probe_weight_decay < 0,
                      "--probe_lr and --probe_weight_decay must be >= 0")):
        if bad:
            raise Fail(msg)
    try:
        epochs = [int(e) for e in args.probe_epochs.split(",") if e.strip()]
    except ValueError:
        epochs = []
    if not epochs or min(epochs) < 1:
        raise Fail(f"--probe_epochs {args.probe_epochs!r}: expected positive numbers like 10,20,50")
    k = None
    if args.nearest:
        try:
            k = int(args.nearest[0])
        except ValueError:
            raise Fail(f"--nearest K QUERY: K must be a number, not {args.nearest[0]!r}") from None
        if k < 1:
            raise Fail("--nearest K QUERY: K must be at least 1")
        if not Path(args.nearest[1]).is_file():
            raise Fail(f"{args.nearest[1]}: no such file (the --nearest query)")
    rows, split = [], None
    if args.probe:
        rows, split = read_labels(args.probe, args.path_col, args.label_col, args.split_col)
    files = find_midi(args.inputs)
    seen = {os.path.realpath(f) for f in files}
    for path, _, _ in rows:  # the CSV's files, unless already given
        if os.path.realpath(path) not in seen:
            seen.add(os.path.realpath(path))
            files.append(path)
    if not files:
        raise Fail("no MIDI files to embed (give files or folders, or --probe LABELS.csv)")

    model = None
    if args.emb:
        emb_all, names = load_embeddings(args.emb)
        where = {os.path.realpath(n): i for i, n in enumerate(names)}
        missing = [f for f in files if os.path.realpath(f) not in where]
        if missing:
            raise Fail(f"{args.emb}: {len(missing)} of the files are not in it, e.g. {missing[0]}")
        ok = files
        emb = emb_all[[where[os.path.realpath(f)] for f in files]]
    else:
      
        device = TR.setup_distributed(args.device, tf32=args.dtype in ("auto", "tf32")).device
        dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
        tf32 = device.type == "cuda" and args.dtype in ("auto", "tf32")
        model = load_embedder(args.ckpt, device, args.head)
        got = embed_files(model, files, args.batch_size, args.head, args.notes_per_chunk, args.max_len,
                          args.max_chunks, on_error=warn, dtype=dtype)
        emb, ok = got.emb, got.files
        if dtype == torch.bfloat16:
            precision = "bfloat16 autocast"
        else:
            precision = "float32, TF32 matmuls" if tf32 else "float32"
        print(f"embed.py: {len(ok)} files embedded ({emb.shape[1]} dims, head {args.head}, "
              f"{precision} on {device})" + (f", {len(got.errors)} skipped" if got.errors else ""),
              file=sys.stderr, flush=True)
        if not ok:
            raise Fail("none of the files could be embedded")
    if args.out:
        save_embeddings(args.out, emb, ok)
        print(f"embed.py: wrote {args.out} {tuple(emb.shape)} and {Path(args.out).with_suffix('.files.txt')}",
              file=sys.stderr, flush=True)

    if args.nearest:
        query = args.nearest[1]
        if model is not None:
            try:
                q = global_embedding(model, query, batch_size=args.batch_size, head=args.head, dtype=dtype,
                                     notes_per_chunk=args.notes_per_chunk, max_len=args.max_len,
                                     max_chunks=args.max_chunks)
            except T.TokenizerError as e:
                raise Fail(f"the --nearest query: {e}") from None
        else:
            i = {os.path.realpath(n): i for i, n in enumerate(names)}.get(os.path.realpath(query))
            if i is None:
                raise Fail(f"{query}: not in {args.emb} (the --nearest query)")
            q = emb_all[i]
        cand = [i for i, f in enumerate(ok) if os.path.realpath(f) != os.path.realpath(query)]
        print(f"# nearest to {query} (cosine)")
        for rank, (i, sim) in enumerate(cosine_nearest(emb[cand], q, k), start=1):
            print(f"{rank}\t{sim:.4f}\t{ok[cand[i]]}")

    labels = {os.path.realpath(p): (label, split) for p, label, split in rows}
    if args.probe:
        keep = [i for i, f in enumerate(ok) if os.path.realpath(f) in labels]
        lab = [labels[os.path.realpath(ok[i])] for i in keep]
        res = linear_probe(emb[keep], [l for l, _ in lab], [s for _, s in lab], epochs, args.probe_lr,
                           args.probe_batch_size, args.probe_weight_decay, args.seed)
        res["skipped"], res["split"] = len(rows) - len(keep), split
        if split == "stratified":
            print(f"embed.py: {args.probe} has no {args.split_col!r} column: the deterministic stratified "
                  "split of finetune_cls.py (80/10/10 per class)", file=sys.stderr)
        print(format_probe(res)
              + (f"\n({res['skipped']} labelled files could not be embedded)" if res["skipped"] else ""))
        if args.probe_out:
            settings = ("probe_lr", "probe_batch_size", "probe_weight_decay", "seed")
            res["settings"] = {o: getattr(args, o) for o in settings}
            M.atomic_write(args.probe_out, lambda f: f.write((json.dumps(res, indent=1) + "\n").encode()))

    if args.map:
        groups = [labels[os.path.realpath(f)][0] if os.path.realpath(f) in labels else Path(f).parent.name
                  for f in ok]
        if draw_map(args.map, emb, groups, f"{len(ok)} files, PCA"):
            print(f"embed.py: wrote {args.map}", file=sys.stderr)
        else:
            print("embed.py: --map needs matplotlib, which is not installed (pip install matplotlib); "
                  "no map drawn", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
