"""
The performance figures that README reports, one subcommand per component.

    python bench.py tokenizer [FILES_OR_DIRS...] [--pedal]    # notes/s: mido's parse vs parse + tokenize
    python bench.py train --preset tiny --data data/synthetic    # tokens/s, MFU, peak memory; the loader
    python bench.py sample --preset medium --quantize int8 --kv float32,bfloat16,int8 --prompt_len 256,1024
                                                 # ms/step of the model and of sample.generate vs the floor
    python bench.py sample [--preset tiny|small|medium] [--ckpt X] [--batch 1,8] [--cuda_graph]
    python bench.py quality --ckpt out/pretrain --data data/real --quantize int4    # KL, top-1, loss
    python bench.py quality --ckpt out/pretrain --data data/real --quantize none --kv int8   # the cache alone

Each prints a small table of medians over --repeats runs, the settings compared taken in turn.
This is a benchmark, not a test: run it on a quiet machine.
"""
import argparse
import collections
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared"


def midi_files(paths, limit=None):
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(x for x in p.rglob("*") if x.suffix.lower() in (".mid", ".midi"))
        else:
            files.append(p)
    return files[:limit] if limit else files


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_tokenizer(args):
    """Each stage over the whole file set, every stage once per repeat in turn (side by side on a
    busy machine); --pedal adds the pedal-mode twin of each tokenizer stage, on the piano files
    that mode accepts (all rows then use those files)."""
    import mido
    import tokenizer as T

    default = [SHARED / "aria" / "midi"] if not args.paths else args.paths
    files = midi_files(default, args.limit)
    if not files:
        sys.exit(f"bench.py: no MIDI files found in {' '.join(map(str, default))}")
    data = [f.read_bytes() for f in files]  # from memory: measure parsing, not the disk
    import io
    scores = [T.load_midi(d) for d in data]
    if args.pedal:
        def accepted(s):
            try:
                return bool(T.tokenize(s, pedal=True))
            except T.TokenizerError:
                return False
        keep = [accepted(s) for s in scores]
        data, scores = [d for d, k in zip(data, keep) if k], [s for s, k in zip(scores, keep) if k]
        print(f"pedal mode: {len(scores)} of {len(files)} files (it takes piano only)")
    n_notes = sum(len(s.notes) for s in scores)
    ids = [T.tokenize(s) for s in scores]
    ped = [T.tokenize(s, pedal=True) for s in scores] if args.pedal else []
    rng = random.Random(0)

    rows = [
        ("mido.MidiFile (parse only)", lambda: [mido.MidiFile(file=io.BytesIO(d)) for d in data]),
        ("load_midi (parse + pair notes)", lambda: [T.load_midi(d) for d in data]),
        ("tokenize (from a parsed Score)", lambda: [T.tokenize(s) for s in scores]),
        (" pedal mode", lambda: [T.tokenize(s, pedal=True) for s in scores]),
        ("load_midi + tokenize", lambda: [T.tokenize(T.load_midi(d)) for d in data]),
        (" pedal mode", lambda: [T.tokenize(T.load_midi(d), pedal=True) for d in data]),
        ("detokenize_notes", lambda: [T.detokenize_notes(x) for x in ids]),
        (" pedal mode", lambda: [T.detokenize_notes(x, pedals=True) for x in ped]),
        ("detokenize -> MidiFile", lambda: [T.detokenize(x) for x in ids]),
        (" pedal mode", lambda: [T.detokenize(x) for x in ped]),
        ("augment (tempo+pitch+velocity)", lambda: [T.augment(x, rng) for x in ids]),
        (" pedal mode", lambda: [T.augment(x, rng) for x in ped]),
    ]
    rows = [r for r in rows if args.pedal or r[0] != " pedal mode"]
    times = [[] for _ in rows]
    for _ in range(args.repeats):
        for (_, fn), t in zip(rows, times):
            t.append(timed(fn, 1))
    n_tokens = f"{sum(map(len, ids)):,} tokens"
    n_tokens += f" ({sum(map(len, ped)):,} in pedal mode)" if args.pedal else ""
    print(f"tokenizer: {len(scores)} files, {n_notes:,} notes, {n_tokens}; median of {args.repeats}")
    print(f"{'stage':34s} {'ms':>9s} {'files/s':>9s} {'notes/s':>10s} {'× mido':>7s}")
    base = statistics.median(times[0])
    for (name, _), t in zip(rows, times):
        t = statistics.median(t)
        print(f"{name:34s} {t * 1e3:9.1f} {len(scores) / t:9.1f} {n_notes / t:10,.0f} {t / base:7.2f}")


def device_name(device):
    import platform
    import torch
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def gemv_bandwidth(cfg, device, budget=256 << 20, repeats=5):
    """Bytes/s that a float32 GEMV streams here: F.linear of a (1, d) input by each distinct weight
    shape of the model (q|k|v, the attention output, the gate and up, the down projection, the LM
    head), over as many copies of each as the model has (at most `budget` bytes of a shape, past any
    CPU cache, as the model's own weights are), best of `repeats` passes; the rates combined as the
    model reads them, bytes over time: the rate a decode step's matmuls can reach on this machine.
    -> (bytes/s, [(n_out, n_in, count in the model, bytes/s)])."""
    import torch
    import torch.nn.functional as F
    d, n = cfg.d_model, cfg.n_layers
    hidden = cfg.ff_mult * d
    shapes = collections.Counter({(3 * d, d): n, (d, d): n})
    shapes.update({(hidden, d): 2 * n, (d, hidden): n, (cfg.vocab_size, d): 1})  # adds up if hidden is 3d
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    used = []
    total_bytes = total_s = 0.0
    for (n_out, n_in), count in shapes.items():
        nbytes = n_out * n_in * 4
        copies = max(1, min(count, budget // nbytes))
        weights = [torch.rand(n_out, n_in, device=device) for _ in range(copies)]
        x = torch.rand(1, n_in, device=device)

        def sweep():
            for w in weights:
                F.linear(x, w)
            sync()
        sweep()  # warm-up: first-touch page faults, kernel selection
        best = min(timed(sweep, 1) for _ in range(repeats)) / len(weights)
        used.append((n_out, n_in, count, nbytes / best))
        total_bytes += count * nbytes
        total_s += count * best
    return total_bytes / total_s, used


def stored_bytes(model):
    """Bytes of weights a decode step reads, at their stored width: the blocks, the final norm and
    the LM head (int8: 1 byte a weight plus a scale per row; int4: half a byte plus a scale and
    offset per group). The embedding table is read one row per token; other heads not at all."""
    return sum(t.numel() * t.element_size() for k, t in model.state_dict().items()
               if k.startswith(("model.", "lm_head.")) and "tok_embeddings" not in k)


def bench_prompt(args, T, n):
    """The first n tokens of one real performance, `prefix <S> body` without <E>: --prompt, else
    (when ../shared is there) the reference nocturne or, for prompts past its 3,036 tokens, the
    first MAESTRO v2 file (sorted by path) that is long enough; else made-up notes. -> (ids, name)."""
    if args.prompt:
        if not Path(args.prompt).is_file():
            sys.exit(f"bench.py: {args.prompt}: no such file")
        files = [Path(args.prompt)]
    else:
        files = [SHARED / "aria" / "midi" / "nocturne.mid", *midi_files([SHARED / "data" / "maestro_v2"], 50)]
    for path in filter(Path.is_file, files):
        try:
            ids = T.tokenize(str(path), dim=False, eos=False)
        except T.TokenizerError as e:
            sys.exit(f"bench.py: {path}: {e}")
        if len(ids) >= n:
            return ids[:n], str(path.relative_to(SHARED) if SHARED in path.parents else path)
        if args.prompt:
            sys.exit(f"bench.py: {path} has {len(ids)} tokens, fewer than --prompt_len {n}")
    notes = [(i * 120, i * 120 + 400, 48 + (i * 7) % 36, 40 + (i * 13) % 80, 0) for i in range(n)]
    return T.tokenize(T.load_midi(T.notes_to_midi(notes, {0: 0})), dim=False, eos=False)[:n], "made-up notes"


def model_step_s(model, tok, ctx, n, sync):
    """Seconds per bare decode step, the model's forward alone (no grammar, no draw): tok (B, 1) at
    position ctx - 1, reading ctx cache slots; the mean of n calls after an untimed one."""
    import torch
    with torch.no_grad():
        model(tok, input_pos=ctx - 1)
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            model(tok, input_pos=ctx - 1)
        sync()
    return (time.perf_counter() - t0) / n


KV_NAMES = ("auto", "float32", "bfloat16", "int8")  # sample.py --kv


def bench_sample(args):
    """Decoding after a prompt of --prompt_len tokens, random weights unless --ckpt, for every
    --quantize x --kv x --batch x --prompt_len, the settings taken in turn in each of --repeats
    rounds (side by side on a busy machine; medians reported). Each run sets up the KV cache that
    --kv names, then times sample.generate's step (grammar and min-p draw included; ms per step,
    new tokens/s, and in the first round the time to its first new token) and a bare model step
    over the same cache, both at the context of generate's mean step (the prompt plus half the
    new tokens). The floor: the bytes a step reads (the weights at their stored width, without the
    embedding table, plus the cache's bytes per slot x the context) over the bandwidth a float32
    GEMV of the model's weight shapes reaches in this run."""
    import torch
    import model as M
    import quantize as Q
    import sample as S
    import tokenizer as T

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = S.pick_device(args.device)
        batches = [int(b) for b in args.batch.split(",")]
        lengths = [int(n) for n in args.prompt_len.split(",")]
        modes = args.quantize.split(",")
        kvs = args.kv.split(",")
    except (S.Fail, ValueError) as e:
        sys.exit(f"bench.py: {e}")
    if not set(modes) <= {"none", "int8", "int4"}:
        sys.exit(f"bench.py: --quantize {args.quantize}: none, int8 or int4")
    if not set(kvs) <= set(KV_NAMES):
        sys.exit(f"bench.py: --kv {args.kv}: {', '.join(KV_NAMES)}")
    if min(batches) < 1 or min(lengths) < 2 or args.tokens < 2:
        sys.exit("bench.py: --batch must be >= 1, --prompt_len and --tokens >= 2")
    dtype = S.pick_dtype(args.dtype, device)
    prompt, prompt_name = bench_prompt(args, T, max(lengths))
    models = {}
    for mode in modes:
        if args.ckpt:
            try:
                model = M.load_model(args.ckpt, device=device, dtype=dtype)
            except M.CheckpointError as e:
                sys.exit(f"bench.py: {e}")
        else:
            torch.manual_seed(0)
            with torch.device(device):
                model = M.Aria(M.PRESETS[args.preset])
            model = model.to(dtype).eval()
        models[mode] = Q.quantize(model, mode, args.group_size)
    cfg = models[modes[0]].config
    if max(lengths) + args.tokens > cfg.max_seq_len:
        sys.exit(f"bench.py: --prompt_len {max(lengths)} + --tokens {args.tokens} > the model's context "
                 f"({cfg.max_seq_len} tokens)")
    gpu = device == "cuda"
    for option in ("compile", "cuda_graph"):
        if getattr(args, option) and not gpu:
            print(f"note: --{option} applies to CUDA only; decoding eagerly on {device}")
    how = [n for n, on in (("torch.compile", args.compile), ("CUDA graph", args.cuda_graph)) if on and gpu]
    bw, shapes = gemv_bandwidth(cfg, device)
    name = args.ckpt or f"{args.preset} (random weights)"
    print(f"sample: {name}, {cfg.d_model}-wide, {cfg.n_layers} layers, {str(dtype).replace('torch.', '')}, "
          f"{device}: {device_name(device)}; {' + '.join(how) or 'eager'}")
    print(f"GEMV bandwidth {bw / 1e9:.1f} GB/s: float32 F.linear of a (1, d) input by the model's weight "
          "shapes, GB/s each: " + ", ".join(f"{o}x{i} (x{c}) {r / 1e9:.1f}" for o, i, c, r in shapes))
    print(f"prompt: the first {', '.join(map(str, lengths))} tokens of {prompt_name}, then {args.tokens} new "
          f"tokens per row; median of {args.repeats} runs, every setting in turn")
    print("floor = (weights at their stored width, no embedding table, + KV bytes per slot x context) "
          "/ GEMV bandwidth;\nmodel: a bare model(tok, input_pos) step, step: sample.generate's; "
          "both reading `context` slots")
    Run = collections.namedtuple("Run", "prompt batch mode kv")
    runs = [Run(P, B, mode, kv) for P in lengths for B in batches for mode in modes for kv in kvs]
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    first, ctx = {}, {}
    slot_bytes = {}
    steps = {r: [] for r in runs}
    bare = {r: [] for r in runs}
    for rep in range(args.repeats + 1):  # round 0 compiles, captures and packs; only its first token is kept
        for r in runs:
            m, st = models[r.mode], {}
            m.setup_cache(r.batch, r.prompt + args.tokens, dtype=S.kv_dtype(r.kv, m), device=device)
            S.generate(m, prompt[:r.prompt], n_variations=r.batch, length=args.tokens, device=device,
                       eos=False, seed=rep, compile=args.compile and gpu, cuda_graph=args.cuda_graph and gpu,
                       stats=st)
            ctx[r] = r.prompt + st["steps"] // 2  # generate's timed steps read this many slots on average
            slot_bytes[r] = cfg.n_layers * m.model.encode_layers[0].kv_cache.bytes_per_slot()
            tok = torch.full((r.batch, 1), prompt[r.prompt - 1], device=device)
            t = model_step_s(m, tok, ctx[r], max(8, args.tokens // 4), sync)
            if rep == 0:
                first[r] = st["first_token_s"]
            else:
                steps[r].append(st["step_s"])
                bare[r].append(t)
            for layer in m.model.encode_layers:  # one cache in memory at a time
                layer.kv_cache = None
    print(f"{'quantize':>8s} {'kv':>13s} {'batch':>5s} {'prompt':>6s} {'context':>7s} {'weights MB':>10s} "
          f"{'KV B/slot':>10s} {'KV MB':>7s} {'floor ms':>8s} {'model ms':>9s} {'share':>6s} {'step ms':>9s} "
          f"{'share':>6s} {'tokens/s':>9s} {'first ms':>9s}")
    weights = {mode: stored_bytes(m) for mode, m in models.items()}
    for r in runs:
        kv = slot_bytes[r] * ctx[r]
        floor = (weights[r.mode] + kv) / bw
        t_model = statistics.median(bare[r])
        t_step = statistics.median(steps[r])
        kv_name = str(S.kv_dtype(r.kv, models[r.mode])).replace("torch.", "")
        kv_name = f"auto:{kv_name}" if r.kv == "auto" else kv_name
        print(f"{r.mode:>8s} {kv_name:>13s} {r.batch:5d} {r.prompt:6d} {ctx[r]:7d} "
              f"{weights[r.mode] / 1e6:10.1f} "
              f"{slot_bytes[r]:10,d} {kv / 1e6:7.1f} {floor * 1e3:8.2f} {t_model * 1e3:9.2f} "
              f"{100 * floor / t_model:5.1f}% {t_step * 1e3:9.2f} {100 * floor / t_step:5.1f}% "
              f"{r.batch / t_step:9.1f} {first[r] * 1e3:9.1f}")


QUALITY_ROWS = 8  # windows decoded together with --kv: medium's float32 cache for 8 x 1024 slots is 1.6 GB


def position_scores(lr, lq, y):
    """Log-probabilities (..., V) of the float32 model (lr) and the one measured (lq), targets (...)
    -> per position: KL(float32 || measured) in nats, same top-1 (1.0 or 0.0), both losses. In
    float64: float32 rounds log-probabilities near -10 by 1e-6, above a good cache's KL."""
    kl = (lr.exp() * (lr - lq)).sum(-1)
    same = (lr.argmax(-1) == lq.argmax(-1)).float()
    return kl, same, -lq.gather(-1, y[..., None])[..., 0], -lr.gather(-1, y[..., None])[..., 0]


def bench_quality(args):
    """What --quantize and --kv cost: the model as sample.py runs it against the float32 one on the
    validation split of a prepared dataset (windows of --seq_len + 1 tokens, every position scored):
    mean KL(float32 || measured) of the next-token distributions, the share of positions where both
    rank the same token first, and the loss of both, overall and per kind of target token. The
    float32 model reads each window in one full forward. Without --kv the measured model prefills
    it through a cache of its weights' dtype (the weights alone); with --kv it decodes the window
    one position at a time through a cache storing --kv, as sampling does: every step reads the
    stored keys and values (QUALITY_ROWS windows at a time, each row its own cache)."""
    import json
    import numpy as np
    import torch
    import model as M
    import quantize as Q
    import tokenizer as T

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quantize == "none" and not args.kv:
        sys.exit("bench.py: --quantize none measures nothing without --kv")
    try:
        ref = M.load_model(args.ckpt)
        q = Q.quantize(M.load_model(args.ckpt), args.quantize, args.group_size)
        tokens = np.memmap(Path(args.data) / "val.bin", dtype=np.uint16, mode="r")
    except (M.CheckpointError, ValueError, OSError) as e:
        sys.exit(f"bench.py: {e}")
    if ref.lm_head is None:
        sys.exit(f"bench.py: {args.ckpt} has no LM head (heads: {', '.join(ref.heads)})")
    L = min(args.seq_len, ref.config.max_seq_len)
    n = min(args.windows, (len(tokens) - 1) // L)
    if n < 1:
        sys.exit(f"bench.py: {args.data}/val.bin has {len(tokens)} tokens, fewer than one window of {L + 1}")
    kinds = {"note": T.NOTE, "onset": T.ONSET, "dur": T.DUR}
    sums = {k: np.zeros(5) for k in ["all", *kinds, "<T>"]}  # positions, kl, same top-1, loss, loss float32
    token_class = torch.from_numpy(T.TOKEN_CLASS.astype(np.int64))

    def add(scores, y):  # scores: 4 x (N,) per position, y: (N,) targets
        cls = token_class[y]
        masks = {"all": torch.ones_like(y, dtype=torch.bool), **{k: cls == c for k, c in kinds.items()},
                 "<T>": y == T.SEG_ID}
        for k, m in masks.items():
            sums[k] += [int(m.sum()), *(float(s[m].sum()) for s in scores)]

    windows = [torch.from_numpy(tokens[w * L:(w + 1) * L + 1].astype(np.int64)) for w in range(n)]
    group = QUALITY_ROWS if args.kv else 1
    kv = getattr(torch, args.kv) if args.kv else None
    t0 = time.perf_counter()
    with torch.no_grad():
        for g in range(0, n, group):
            x = torch.stack(windows[g:g + group])  # (G, L+1)
            y = x[:, 1:]
            q.setup_cache(len(x), L, dtype=kv)
            if args.kv:  # the float32 trunk in one forward, its LM head position by position beside q's step
                h = ref.hidden(x[:, :-1])  # (G, L, d)
                per = []
                for t in range(L):
                    lq = torch.log_softmax(q(x[:, t:t + 1], input_pos=t)[:, 0].double(), -1)  # (G, V)
                    lr = torch.log_softmax(ref.lm_head(h[:, t]).double(), -1)
                    per.append(position_scores(lr, lq, y[:, t]))
                scores = [torch.stack(s, 1).flatten() for s in zip(*per)]  # 4 x (G * L,)
            else:
                lr = torch.log_softmax(ref(x[:, :-1]).double(), -1)  # (1, L, V)
                lq = torch.log_softmax(q(x[:, :-1], input_pos=0).double(), -1)
                scores = [s.flatten() for s in position_scores(lr, lq, y)]
            add(scores, y.flatten())
            done = g + len(x)
            print(f"  window {done}/{n}, {(time.perf_counter() - t0) / done:.1f} s each", file=sys.stderr,
                  flush=True)
    int4 = f" --group_size {args.group_size}" if args.quantize == "int4" else ""
    how = f"--kv {args.kv}, decoded position by position" if args.kv else "one prefill through the cache"
    print(f"quality: {args.ckpt}, --quantize {args.quantize}{int4}, {how}; {n} windows of {L} tokens of "
          f"{args.data}/val.bin")
    print(f"{'target':>8s} {'positions':>10s} {'KL nats':>9s} {'same top-1':>11s} {'loss':>8s} "
          f"{'loss fp32':>10s} {'change':>8s}")
    result = {"quantize": args.quantize, "group_size": args.group_size, "kv": args.kv, "windows": n,
              "seq_len": L}
    for k, (npos, kl, same, lq, lr) in sums.items():
        if npos:
            row = dict(positions=int(npos), kl=kl / npos, top1=same / npos, loss=lq / npos,
                       loss_float32=lr / npos)
            result[k] = row
            print(f"{k:>8s} {int(npos):10,d} {row['kl']:9.5f} {100 * row['top1']:10.2f}% {row['loss']:8.4f} "
                  f"{row['loss_float32']:10.4f} {100 * (row['loss'] / row['loss_float32'] - 1):+7.2f}%")
    print(json.dumps({**{k: result["all"][k] for k in ("kl", "top1", "loss", "loss_float32")}, **result}))


def rss_peak(reset=False):
    """This process's resident-set high-water mark in bytes (Linux /proc); reset=True restarts it
    from the current size first. None where /proc is missing."""
    try:
        if reset:
            Path("/proc/self/clear_refs").write_text("5")
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return None


def bench_train(args):
    """One optimizer step of --batch sequences as pretrain.py runs it (micro-batches and activation
    checkpointing from model.plan_batch, the chunked float32 loss model.LMLoss): ms/step, tokens/s,
    MFU, peak memory; --full_logits times the unchunked loss over all (B, T, V) logits in float32
    instead, --compare both in turn. The data loader's tokens/s with --data."""
    import contextlib
    from dataclasses import replace
    import torch
    import torch.nn.functional as F
    import model as M
    import training as TR
    device = TR.setup_distributed(args.device).device  # TF32 for float32 matmuls on CUDA, as the stages
    dtype = args.dtype if args.dtype != "auto" else "bfloat16" if device.type == "cuda" else "float32"
    torch.manual_seed(0)
    cfg = replace(M.PRESETS[args.preset], max_seq_len=max(args.seq_len, M.PRESETS[args.preset].max_seq_len))
    m = M.Aria(cfg).to(device).train()
    planned = TR.plan_batch(m.config, args.seq_len, args.batch, device, args.micro_batch,
                            args.grad_checkpoint, dtype == "bfloat16")
    micro, m.config.grad_checkpoint = planned.micro, planned.grad_ckpt
    plan = planned.line
    opt = TR.configure_optimizer(m, device_type=device.type)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16"
                else contextlib.nullcontext())
    batch = torch.randint(6, cfg.vocab_size, (args.batch, args.seq_len + 1), device=device)

    def full_logits_loss(b):  # unchunked: all (B, T, V) logits at once, then float32
        with autocast:
            logits = m(b[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), b[:, 1:].flatten())

    lm_loss = TR.LMLoss(m)

    def chunked_loss(b):
        with autocast:
            return lm_loss(b)
    fns = {"chunked": chunked_loss, "full": full_logits_loss}
    if device.type == "cuda" and args.compile:
        fns = {k: torch.compile(f) for k, f in fns.items()}
    loss_fn = fns["full" if args.full_logits else "chunked"]

    def step(fn=None):
        for i in range(0, args.batch, micro):
            ((fn or loss_fn)(batch[i:i + micro]) * micro / args.batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step(fns["chunked"])
        step(fns["full"] if args.compare else None)
    sync()
    if args.compare:  # both losses in this process, alternating step by step (VMs vary 2x between runs)
        times = {k: [] for k in fns}
        for r in range(args.steps):
            for k in (list(fns) if r % 2 else list(fns)[::-1]):
                times[k].append(timed(lambda: (step(fns[k]), sync()), 1))
        t = {k: statistics.median(v) for k, v in times.items()}
        print(f"train: {args.preset}, batch {args.batch} x {args.seq_len} ({plan}), {dtype}, "
              f"{device_name(device.type)}, {args.steps} alternating steps each: chunked loss "
              f"{t['chunked'] * 1e3:.0f} ms/step, full float32 logits {t['full'] * 1e3:.0f} ms/step; "
              f"chunked tokens/s = {t['full'] / t['chunked']:.3f}x the full loss's")
        return
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = rss_peak(reset=True)
    t = timed(lambda: (step(), sync()), args.steps)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else rss_peak() - base if base else None
    tok_s = args.batch * args.seq_len / t
    mfu = TR.estimate_mfu(cfg, args.seq_len, tok_s) if device.type == "cuda" else None
    peak_kind = "allocated" if device.type == "cuda" else "RSS growth in a step"
    print(f"train: {args.preset} ({m.num_params() / 1e6:.1f}M), batch {args.batch} x {args.seq_len} "
          f"({plan}), {dtype}, {'full float32 logits' if args.full_logits else 'chunked loss'}, "
          f"{device_name(device.type)}: "
          f"{t * 1e3:.0f} ms/step, {tok_s:,.0f} tokens/s" + (f", MFU {100 * mfu:.1f}%" if mfu else "")
          + (f", peak {peak_kind} {peak / 2**20:,.0f} MiB" if peak else ""))
    if args.data:
        import pretrain
        ds = pretrain.PackedWindows(args.data, "train", args.seq_len, 0, True)
        loader = torch.utils.data.DataLoader(ds, batch_size=args.batch, num_workers=args.workers,
                                             sampler=TR.StepSampler(0, args.batch, 1, 0, 1))
        it = iter(loader)
        next(it)
        n = max(4, args.steps)
        t0 = time.perf_counter()
        for _ in range(n):
            next(it)
        load_s = n * args.batch * args.seq_len / (time.perf_counter() - t0)
        print(f"data loader ({args.workers} workers, with augmentation): {load_s:,.0f} tokens/s "
              f"= {load_s / tok_s:.1f}x what the model consumes")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("tokenizer", help="tokenizer notes/s against mido's parse",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("paths", nargs="*", help="MIDI files or folders (default: ../shared/aria/midi)")
    p.add_argument("--limit", type=int, default=None, help="use at most this many files")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    p.add_argument("--pedal", action="store_true",
                   help="also each stage in pedal mode (official include_pedal), on the piano files it "
                        "accepts")
    p.set_defaults(fn=bench_tokenizer)
    p = sub.add_parser("sample", help="ms per decode step (the model's, sample.generate's) against the floor",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "medium"],
                   help="model shape (random weights) when no --ckpt")
    p.add_argument("--ckpt", default=None, help="a checkpoint instead of a preset")
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes (variations decoded together)")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per row")
    p.add_argument("--prompt_len", default="1024",
                   help="comma-separated prompt lengths in tokens (one performance's first tokens): "
                        "the context the steps read")
    p.add_argument("--prompt", default=None,
                   help="MIDI file for the prompt (default: ../shared/aria/midi/nocturne.mid, or for prompts "
                        "longer than its 3,036 tokens the first long enough ../shared/data/maestro_v2 file; "
                        "else made-up notes)")
    p.add_argument("--quantize", default="none",
                   help="comma-separated: none, int8, int4 (sample.py --quantize), measured side by side")
    p.add_argument("--kv", default="auto",
                   help="comma-separated: what the KV cache stores (sample.py --kv): auto, float32, "
                        "bfloat16, int8")
    p.add_argument("--group_size", type=int, default=64, help="int4: inputs per scale and offset")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of every setting, alternating (median)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto: cuda, else mps, else cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights; auto: bfloat16 on CUDA, float32 elsewhere")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--compile", action="store_true",
                   help="CUDA: torch.compile the model's forward (sample.py --compile)")
    p.add_argument("--cuda_graph", action="store_true",
                   help="CUDA: the decode step as one CUDA graph (sample.py --cuda_graph; experimental)")
    p.set_defaults(fn=bench_sample)
    p = sub.add_parser("quality", help="what --quantize and --kv cost: KL, top-1 agreement, loss vs float32",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True,
                   help="checkpoint with an LM head (official safetensors, ours, a folder)")
    p.add_argument("--data", required=True, help="a prepared dataset (prepare.py): its val.bin is scored")
    p.add_argument("--quantize", default="int8", choices=["none", "int8", "int4"],
                   help="the weights' quantization (none: with --kv, the cache alone)")
    p.add_argument("--kv", default=None, choices=["float32", "bfloat16", "int8"],
                   help="what the KV cache stores (sample.py --kv); windows then decoded position by "
                        "position, every step reading the cache; unset: one prefill through a cache of the "
                        "weights' dtype")
    p.add_argument("--group_size", type=int, default=64, help="int4: inputs per scale and offset")
    p.add_argument("--seq_len", type=int, default=1024,
                   help="tokens per window (capped at the model's context)")
    p.add_argument("--windows", type=int, default=16, help="windows scored, from the start of val.bin")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.set_defaults(fn=bench_quality)
    p = sub.add_parser("train", help="forward+backward tokens/s and MFU; the data loader's tokens/s too",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "medium"], help="model shape")
    p.add_argument("--seq_len", type=int, default=512,
                   help="tokens per sequence (8192 for the paper's medium)")
    p.add_argument("--batch", type=int, default=4,
                   help="sequences per optimizer step (paper §4.1: 16 per GPU)")
    p.add_argument("--micro_batch", type=int, default=0,
                   help="sequences per forward/backward (0: planned from the GPU's memory)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="bfloat16: matmuls under autocast, as pretrain.py on CUDA; auto: bfloat16 on CUDA")
    p.add_argument("--compile", type=int, default=1, help="torch.compile on CUDA (1/0)")
    p.add_argument("--grad_checkpoint", nargs="?", const="1", default="auto", choices=["auto", "0", "1"],
                   help="activation checkpointing (auto: only if no micro-batch fits without)")
    p.add_argument("--full_logits", action="store_true",
                   help="the unchunked loss: all (B, T, V) logits at once, in float32")
    p.add_argument("--compare", action="store_true",
                   help="time the chunked and the full-logits loss alternately in one process")
    p.add_argument("--data", default=None, help="a prepared dataset: also time the augmenting data loader")
    p.add_argument("--workers", type=int, default=2, help="data loader workers")
    p.set_defaults(fn=bench_train)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    args.fn(args)


if __name__ == "__main__":
    main()
