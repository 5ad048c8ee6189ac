"""
The performance figures that README reports, one subcommand per component.

    python bench.py tokenizer [FILES_OR_DIRS...] [--pedal]   # notes/s: mido parse vs parse+tokenize, etc.
    python bench.py train --preset tiny --data data/synthetic   # a training step: tokens/s, MFU, peak memory; loader
    python bench.py sample --preset medium --quantize none,int8,int4   # ms/step, tokens/s, share of the bandwidth floor
    python bench.py sample [--preset tiny|small|medium] [--ckpt X] [--batch 1,8] [--prompt_len 1024] [--cuda_graph]
    python bench.py quality --ckpt out/pretrain --data data/real --quantize int4   # KL, top-1, loss vs float32

Each prints a small table and the median over --repeats runs of the whole file set.
This is a benchmark, not a test: run it on a quiet machine.
"""
import argparse
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
        files += sorted(x for x in p.rglob("*") if x.suffix.lower() in (".mid", ".midi")) if p.is_dir() else [p]
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
    n_tokens = f"{sum(map(len, ids)):,} tokens" + (f" ({sum(map(len, ped)):,} in pedal mode)" if args.pedal else "")
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
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def read_bandwidth(device, nbytes):
    """Bytes/s of reading nbytes once (a sum over a buffer larger than any cache; best of 5):
    the rate at which a decode step can stream its weights and KV cache."""
    import torch
    x = torch.ones(nbytes // 4, device=device)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    best = min(timed(lambda: (x.sum(), sync()), 1) for _ in range(5))
    return nbytes / best


def bench_prompt(args, T):
    """--prompt_len tokens of a real performance (--prompt, else a reference file when
    ../shared is there), or of made-up notes; `prefix <S> body`, no <E>."""
    path = Path(args.prompt) if args.prompt else SHARED / "aria" / "midi" / "nocturne.mid"
    if path.is_file():
        ids, name = T.tokenize(str(path), dim=False, eos=False), path.name
    else:
        notes = [(i * 120, i * 120 + 400, 48 + (i * 7) % 36, 40 + (i * 13) % 80, 0) for i in range(args.prompt_len)]
        ids, name = T.tokenize(T.load_midi(T.notes_to_midi(notes, {0: 0})), dim=False, eos=False), "made-up notes"
    if len(ids) < args.prompt_len:
        sys.exit(f"bench.py: {name} has {len(ids)} tokens, fewer than --prompt_len {args.prompt_len}")
    return ids[:args.prompt_len], name


def bench_sample(args):
    """sample.generate's decode step (grammar and min-p sampling included) after a --prompt_len
    prompt, random weights unless --ckpt, for each --quantize and --batch, alternating the
    settings over --repeats runs: ms per step and new tokens/s (medians), the time from the start
    of the first run (right after loading) to its first new token, and the floor: the bytes a
    step streams (every weight but the embedding table, at its stored width, plus the KV cache
    slots read) over the measured read bandwidth."""
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
        modes = args.quantize.split(",")
        assert set(modes) <= {"none", "int8", "int4"}, f"--quantize {args.quantize}: none, int8 or int4"
    except (S.Fail, ValueError, AssertionError) as e:
        sys.exit(f"bench.py: {e}")
    dtype = S.pick_dtype(args.dtype, device)
    prompt, prompt_name = bench_prompt(args, T)
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
    name = args.ckpt or f"{args.preset} (random weights)"
    gpu = device == "cuda"
    for option in ("compile", "cuda_graph"):
        if getattr(args, option) and not gpu:
            print(f"note: --{option} applies to CUDA only; decoding eagerly on {device}")
    how = [n for n, on in (("torch.compile", args.compile), ("CUDA graph", args.cuda_graph)) if on and gpu]
    bw = read_bandwidth(device, (1 << 30))
    cfg = models[modes[0]].config
    print(f"sample: {name}, {cfg.d_model}-wide, {cfg.n_layers} layers, {str(dtype).replace('torch.', '')}, "
          f"{device}: {device_name(device)}; {' + '.join(how) or 'eager'}")
    print(f"read bandwidth {bw / 1e9:.1f} GB/s (sum over 1 GiB); prompt {len(prompt)} tokens ({prompt_name}), "
          f"then {args.tokens} new tokens per row; median of {args.repeats}")
    print(f"{'quantize':>8s} {'batch':>5s} {'ms/step':>9s} {'new tokens/s':>13s} {'per row':>9s} {'first token':>14s} "
          f"{'weights MB':>11s} {'KV MB':>7s} {'floor ms':>9s} {'share of floor':>15s}")
    runs = [(mode, B) for B in batches for mode in modes]
    first, steps = {}, {r: [] for r in runs}
    for rep in range(args.repeats + 1):  # the first round: compiles, captures, packs; its first token is reported
        for mode, B in runs:
            st = {}
            S.generate(models[mode], prompt, n_variations=B, length=args.tokens, device=device, eos=False, seed=rep,
                       compile=args.compile and gpu, cuda_graph=args.cuda_graph and gpu, stats=st)
            if rep == 0:
                first[mode, B] = st["first_token_s"]
            else:
                steps[mode, B].append(st["step_s"])
    for mode, B in runs:
        m = models[mode]
        weights = sum(t.numel() * t.element_size() for k, t in m.state_dict().items() if "tok_embeddings" not in k)
        ctx = len(prompt) + args.tokens / 2  # slots read per step, on average
        kv = 2 * cfg.n_layers * B * cfg.d_model * ctx * m.model.tok_embeddings.weight.element_size()
        floor, step = (weights + kv) / bw, statistics.median(steps[mode, B])
        print(f"{mode:>8s} {B:5d} {step * 1e3:9.2f} {B / step:13.1f} {1 / step:9.1f} {first[mode, B] * 1e3:11.1f} ms "
              f"{weights / 1e6:11.1f} {kv / 1e6:7.1f} {floor * 1e3:9.2f} {100 * floor / step:14.1f}%")


def bench_quality(args):
    """What --quantize costs: the quantized model against the float32 one on the validation split
    of a prepared dataset (windows of --seq_len + 1 tokens, every position scored): mean KL(float32
    || quantized) of the next-token distributions, the share of positions where both rank the same
    token first, and the validation loss of both, overall and per kind of target token. The
    quantized model runs as sample.py runs it: a prefill through the KV cache."""
    import json
    import numpy as np
    import torch
    import model as M
    import quantize as Q
    import tokenizer as T

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        ref = M.load_model(args.ckpt)
        q = Q.quantize(M.load_model(args.ckpt), args.quantize, args.group_size)
        tokens = np.memmap(Path(args.data) / "val.bin", dtype=np.uint16, mode="r")
    except (M.CheckpointError, ValueError, OSError) as e:
        sys.exit(f"bench.py: {e}")
    L = min(args.seq_len, ref.config.max_seq_len)
    n = min(args.windows, (len(tokens) - 1) // L)
    if n < 1:
        sys.exit(f"bench.py: {args.data}/val.bin has {len(tokens)} tokens, fewer than one window of {L + 1}")
    kinds = {"note": T.NOTE, "onset": T.ONSET, "dur": T.DUR}
    sums = {k: np.zeros(5) for k in ["all", *kinds, "<T>"]}  # positions, kl, same top-1, loss, loss float32
    q.setup_cache(1, L)
    t0 = time.perf_counter()
    with torch.no_grad():
        for w in range(n):
            x = torch.from_numpy(tokens[w * L:(w + 1) * L + 1].astype(np.int64))[None]  # (1, L+1)
            lr = torch.log_softmax(ref(x[:, :-1]).float(), -1)[0]  # (L, V)
            lq = torch.log_softmax(q(x[:, :-1], input_pos=0).float(), -1)[0]
            y = x[0, 1:]
            kl = (lr.exp() * (lr - lq)).sum(-1)
            same = lr.argmax(-1) == lq.argmax(-1)
            nll_q, nll_r = -lq.gather(1, y[:, None])[:, 0], -lr.gather(1, y[:, None])[:, 0]
            cls = torch.from_numpy(T.TOKEN_CLASS.astype(np.int64))[y]
            masks = {"all": torch.ones_like(same), **{k: cls == c for k, c in kinds.items()}, "<T>": y == T.SEG_ID}
            for k, m in masks.items():
                sums[k] += [int(m.sum()), float(kl[m].sum()), int(same[m].sum()), float(nll_q[m].sum()), float(nll_r[m].sum())]
            print(f"  window {w + 1}/{n}, {(time.perf_counter() - t0) / (w + 1):.1f} s each", file=sys.stderr, flush=True)
    print(f"quality: {args.ckpt}, --quantize {args.quantize}" + (f" --group_size {args.group_size}" if args.quantize == "int4" else "")
          + f", {n} windows of {L} tokens of {args.data}/val.bin")
    print(f"{'target':>8s} {'positions':>10s} {'KL nats':>9s} {'same top-1':>11s} {'loss':>8s} {'loss fp32':>10s} {'change':>8s}")
    result = {"quantize": args.quantize, "group_size": args.group_size, "windows": n, "seq_len": L}
    for k, (npos, kl, same, lq, lr) in sums.items():
        if npos:
            row = dict(positions=int(npos), kl=kl / npos, top1=same / npos, loss=lq / npos, loss_float32=lr / npos)
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
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return None


def bench_train(args):
    """One optimizer step of --batch sequences as pretrain.py runs it (micro-batches and activation
    checkpointing from model.plan_batch, the chunked float32 loss model.LMLoss): ms/step, tokens/s,
    MFU, peak memory; --full_logits times the old loss over the full (B, T, V) float32 logits beside
    it. The data loader's tokens/s with --data."""
    import contextlib
    from dataclasses import replace
    import torch
    import torch.nn.functional as F
    import model as M
    import training as TR
    device = TR.setup_distributed(args.device).device  # TF32 for float32 matmuls on CUDA, as the stage scripts
    dtype = args.dtype if args.dtype != "auto" else "bfloat16" if device.type == "cuda" else "float32"
    torch.manual_seed(0)
    cfg = replace(M.PRESETS[args.preset], max_seq_len=max(args.seq_len, M.PRESETS[args.preset].max_seq_len))
    m = M.Aria(cfg).to(device).train()
    micro, m.config.grad_checkpoint, _, plan = TR.plan_batch(m.config, args.seq_len, args.batch, device, args.micro_batch,
                                                         args.grad_checkpoint, dtype == "bfloat16")
    opt = TR.configure_optimizer(m, device_type=device.type)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16"
                else contextlib.nullcontext())
    batch = torch.randint(6, cfg.vocab_size, (args.batch, args.seq_len + 1), device=device)

    def full_logits_loss(b):  # the loss before issue 21: all (B, T, V) logits, then float32
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
        step(fns["chunked"]), step(fns["full"]) if args.compare else step()
    sync()
    if args.compare:  # both losses in this process, alternating step by step (VMs vary 2x between runs)
        times = {k: [] for k in fns}
        for r in range(args.steps):
            for k in (list(fns) if r % 2 else list(fns)[::-1]):
                times[k].append(timed(lambda: (step(fns[k]), sync()), 1))
        t = {k: statistics.median(v) for k, v in times.items()}
        print(f"train: {args.preset}, batch {args.batch} x {args.seq_len} ({plan}), {dtype}, {device_name(device.type)}, "
              f"{args.steps} alternating steps each: chunked loss {t['chunked'] * 1e3:.0f} ms/step, full float32 logits "
              f"{t['full'] * 1e3:.0f} ms/step; chunked tokens/s = {t['full'] / t['chunked']:.3f}x the full loss's")
        return
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = rss_peak(reset=True)
    t = timed(lambda: (step(), sync()), args.steps)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else rss_peak() - base if base else None
    tok_s = args.batch * args.seq_len / t
    mfu = TR.estimate_mfu(cfg, args.seq_len, tok_s) if device.type == "cuda" else None
    print(f"train: {args.preset} ({m.num_params() / 1e6:.1f}M), batch {args.batch} x {args.seq_len} ({plan}), {dtype}, "
          f"{'full float32 logits' if args.full_logits else 'chunked loss'}, {device_name(device.type)}: "
          f"{t * 1e3:.0f} ms/step, {tok_s:,.0f} tokens/s" + (f", MFU {100 * mfu:.1f}%" if mfu else "")
          + (f", peak {'allocated' if device.type == 'cuda' else 'RSS growth in a step'} {peak / 2**20:,.0f} MiB" if peak else ""))
    if args.data:
        import pretrain
        ds = pretrain.PackedWindows(args.data, "train", args.seq_len, 0, True)
        loader = torch.utils.data.DataLoader(ds, batch_size=args.batch, sampler=TR.StepSampler(0, args.batch, 1, 0, 1),
                                             num_workers=args.workers)
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
                   help="also each stage in pedal mode (official include_pedal), on the piano files it accepts")
    p.set_defaults(fn=bench_tokenizer)
    p = sub.add_parser("sample", help="new tokens/s of sample.py's decode loop",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "medium"],
                   help="model shape (random weights) when no --ckpt")
    p.add_argument("--ckpt", default=None, help="a checkpoint instead of a preset")
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes (variations decoded together)")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per row")
    p.add_argument("--prompt_len", type=int, default=1024, help="prompt tokens: the context every step attends to")
    p.add_argument("--prompt", default=None,
                   help="MIDI file for the prompt (default: ../shared/aria/midi/nocturne.mid, else made-up notes)")
    p.add_argument("--quantize", default="none",
                   help="comma-separated: none, int8, int4 (sample.py --quantize), measured side by side")
    p.add_argument("--group_size", type=int, default=64, help="int4: inputs per scale and offset")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of every setting, alternating (median)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA, float32 elsewhere")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--compile", action="store_true",
                   help="CUDA: torch.compile the model's forward (sample.py --compile)")
    p.add_argument("--cuda_graph", action="store_true",
                   help="CUDA: the decode step as one CUDA graph (sample.py --cuda_graph; experimental)")
    p.set_defaults(fn=bench_sample)
    p = sub.add_parser("quality", help="what --quantize costs: KL, top-1 agreement and loss against float32",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint with an LM head (official safetensors, ours, a folder)")
    p.add_argument("--data", required=True, help="a prepared dataset (prepare.py): its val.bin is scored")
    p.add_argument("--quantize", default="int8", choices=["int8", "int4"], help="the quantization to measure")
    p.add_argument("--group_size", type=int, default=64, help="int4: inputs per scale and offset")
    p.add_argument("--seq_len", type=int, default=1024, help="tokens per window (capped at the model's context)")
    p.add_argument("--windows", type=int, default=16, help="windows scored, from the start of val.bin")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.set_defaults(fn=bench_quality)
    p = sub.add_parser("train", help="forward+backward tokens/s and MFU; the data loader's tokens/s beside it",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "medium"], help="model shape")
    p.add_argument("--seq_len", type=int, default=512, help="tokens per sequence (8192 for the paper's medium)")
    p.add_argument("--batch", type=int, default=4, help="sequences per optimizer step (paper §4.1: 16 per GPU)")
    p.add_argument("--micro_batch", type=int, default=0, help="sequences per forward/backward (0: planned from the GPU's memory)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="bfloat16: matmuls under autocast, as pretrain.py on CUDA; auto: bfloat16 on CUDA")
    p.add_argument("--compile", type=int, default=1, help="torch.compile on CUDA (1/0)")
    p.add_argument("--grad_checkpoint", nargs="?", const="1", default="auto", choices=["auto", "0", "1"],
                   help="activation checkpointing (auto: only if no micro-batch fits without)")
    p.add_argument("--full_logits", action="store_true", help="the loss over all (B, T, V) float32 logits (before issue 21)")
    p.add_argument("--compare", action="store_true", help="time the chunked and the full-logits loss alternately in one process")
    p.add_argument("--data", default=None, help="a prepared dataset: also time the augmenting data loader")
    p.add_argument("--workers", type=int, default=2, help="data loader workers")
    p.set_defaults(fn=bench_train)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    args.fn(args)


if __name__ == "__main__":
    main()
