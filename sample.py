"""
Sample piano continuations from an Aria language model (paper §4: 45-second continuations of
15-second prompts). "Official" below means EleutherAI/aria @ b0486c8, aria/inference/.

    python sample.py prompt.mid --ckpt model.safetensors   # official aria-medium-gen (+ model.json beside it)
    python sample.py prompt.mid                             # latest checkpoint in out/pretrain
    python sample.py --ckpt out/pretrain --variations 4     # from scratch: piano prefix, <S>
    python sample.py prompt.mid --end --plot --continuation_only
    python sample.py prompt.mid --quantize int8 --stream --port "Synth"   # a CPU, heard as it is written

Writes OUT/<prompt stem>_<i>.mid (prompt + continuation; --continuation_only: the continuation
alone, from 0 s) and OUT/<prompt stem>_<i>.json (settings, checkpoint, counts, ids, tokens/s).
Top to bottom: the draw (official sample_cuda.py: temperature, top-k, top-p, min-p), decoding in
gpt-fast's shape (prefill, one step, the loop; grammar.py constrains each step), the CUDA-graph
and compile plumbing, output, the CLI (shared with live.py).
"""
import argparse
import functools
import json
import math
import os
import sys
import time
import warnings
from collections import namedtuple
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import grammar as G
import model as M
import player as P
import quantize as Q
import tokenizer as T

DEFAULT_CKPT = "out/pretrain"   # where the README quick start `python pretrain.py` trains into
FORCE_END_WINDOW = 130          # official force_end (sample_cuda.py): the last 130 positions
CHECK_DONE_EVERY = 64           # steps between "all rows finished?" checks (a host sync)
KV_BUCKET = 256                 # cache slots read per step rounded up to this under CUDA graphs / compile
# --seconds with --end: <D> comes END_CUE_TOKENS before the end, at the row's own ms per token so
# far, from a prior of PRIOR_TOKENS tokens at PRIOR_MS_PER_TOKEN (30 tokens/s) while it has few
END_CUE_TOKENS = 100            # as the generative finetune placed <D> (paper §3.2)
PRIOR_TOKENS = 50
PRIOR_MS_PER_TOKEN = 33
# --kv auto with quantized weights: the fastest measured on a CPU (docs/performance.md: not yet a compact one)
KV_AUTO_QUANTIZED = "float32"
Split = namedtuple("Split", "prompt new programs")  # split_notes: a row's notes, in ms

# -----------------------------------------------------------------------------
# Sampling: how one token is drawn from the logits


@dataclass
class Sampling:
    """How tokens are drawn and where a row ends. sample.py and live.py build one from their options
    (add_sampling_args, each with its own defaults); generate takes one, or its fields as keywords."""
    temp: float = 0.98            # official default; 0 = greedy
    min_p: float = 0.035          # official default: drop tokens below min_p x the most likely one
    top_p: float | None = None    # None or 1 = off
    top_k: int = 0                # 0 = off
    seed: int = 0                 # seeds a torch.Generator on the device: same seed, same tokens
    end: bool = False             # force_end: <D> in a row's last FORCE_END_WINDOW positions
    seconds: float | None = None  # music to add: <E> after the first event this long after the prompt
    grammar: bool = True          # only tokens that can legally come next (Grammar); False = official
    eos: bool = True              # False: <E> is never sampled (a forced end still comes)
    dim: bool = True              # False: <D> is never sampled (force_end still places it)
    min_onset_ms: int = 0         # no new onset before this in the prompt's last segment (live.py)
    max_onset_ms: int | None = None  # the first note's onset at most this after its segment's start (live)


def pick(logits, temp, top_k=0, top_p=None, min_p=0.0, generator=None):
    """(B, V) logits (-inf where banned) -> (B,) ids. Order: temperature, top-k, top-p,
    min-p, then a draw, all without a host sync. The draw inverts the cumulative
    distribution with one uniform per row: on CPU several times cheaper than a Gumbel-max
    draw (V uniforms, two logs and an argmax per row) or torch.multinomial."""
    x = logits.float()
    if temp == 0:
        return x.argmax(-1)
    x = x / temp
    best = x.max(-1, keepdim=True)  # (B, 1): the most likely token survives every filter
    if top_k and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        srt, idx = x.sort(-1, descending=True)
        p = srt.softmax(-1)
        srt = srt.masked_fill(p.cumsum(-1) - p > top_p, float("-inf"))  # keeps the token crossing top_p
        x = torch.full_like(x, float("-inf")).scatter(-1, idx, srt)
    # e = p / p_max, 0 where min-p drops it (p < min_p * p_max) or banned; the clamp keeps
    # exp off its slow path for -inf on CPU and does not change what is dropped
    floor = min_p or 1e-30
    e = torch.threshold((x - best.values).clamp_min_(math.log(floor) - 1).exp_(), floor, 0.0)
    cdf = e.cumsum(-1)  # (B, V), unnormalised; the total is >= 1
    r = cdf[:, -1:] * (1 - torch.rand(cdf.shape[0], 1, generator=generator, device=x.device))  # in (0, total]
    tok = torch.searchsorted(cdf, r)  # (B, 1) first i with cdf_i >= r, so e_i > 0
    # a parallel cumsum (CUDA) may round out of order; never let that pick a dropped token
    return torch.where(e.gather(1, tok) > 0, tok, best.indices)[:, 0]


# -----------------------------------------------------------------------------
# Decoding, in gpt-fast's shape: prefill, one decode step, the loop (generate)


class Decoder:
    """B rows continued together, all on the device: seq (B, P + length) holds each prompt, then its new
    tokens; pos (B,) where each row's next token goes; the grammar state; the seeded generator. step(i)
    makes token i of every row with no host sync and no branch on a tensor's value (a CUDA graph)."""

    def __init__(self, model, rows, length, s: Sampling, device, forward, bucket):
        P = max(len(r) for r in rows)
        self.model, self.s = model, s
        self.forward = forward
        self.P, self.length = P, length
        self.g = G.Grammar(rows, device, eos=s.eos, dim=s.dim, min_onset_ms=s.min_onset_ms,
                           max_onset_ms=s.max_onset_ms, V=model.config.vocab_size)  # checks the prompts
        self.t_prompt = self.g.time_ms()  # (B,) each row's last prompt onset
        self.until = None if s.seconds is None else self.t_prompt + round(s.seconds * 1000)
        self.gen = torch.Generator(device=device).manual_seed(s.seed)
        self.seq = torch.tensor([r + [T.PAD_ID] * (P + length - len(r)) for r in rows], device=device)
        self.n = torch.tensor([len(r) for r in rows], device=device)  # (B,) prompt lengths
        self.pos = self.n.clone()  # the step feeds the token before pos
        self.end_from = self.n + length - FORCE_END_WINDOW  # (B,) first position of the force_end window
        # Attention reads only the filled cache. Eager decoding of rows at one position passes that
        # position as an int: exact length, no mask. Otherwise (rows at different positions, a CUDA
        # graph, torch.compile) positions are a tensor and the read length is rounded up to `bucket`
        # slots, so shapes stay static for a whole bucket: one graph per bucket.
        self.exact = len({len(r) for r in rows}) == 1 and bucket == 1
        self.bucket = bucket

    def prefill(self, start=0):
        """The prompts but their last tokens (the first step feeds those) into the cache, from `start`."""
        if start < self.P - 1:
            self.model(self.seq[:, start:self.P - 1], input_pos=start, out_pos=torch.zeros_like(self.n))

    def read_len(self, i):  # cache slots step i reads
        return min(self.P + self.length, -(-(self.P + i) // self.bucket) * self.bucket)

    def step(self, i):
        """Token i of every row (<P> past <E>), in place on the buffers."""
        s, g = self.s, self.g
        pos = self.pos
        prev = pos[:, None] - 1  # (B, 1)
        if self.exact:
            logits = self.forward(self.model, self.seq.gather(1, prev), self.P - 1 + i, None)  # (B, V)
        else:
            logits = self.forward(self.model, self.seq.gather(1, prev), prev, self.read_len(i))
        if s.grammar:
            logits = logits + g.bias()
        tok = pick(logits, s.temp, s.top_k, s.top_p, s.min_p, self.gen)  # (B,)
        # not a dur or an onset: an event starts here (or a special token)
        boundary = (tok < T.DUR_START) | (tok >= T.PED_ON_ID)
        if s.end:  # official rule: the first token at an event boundary, in the last 130 positions
            late = pos >= self.end_from
            if self.until is not None:  # or END_CUE_TOKENS before `until`, at the row's own ms per token
                so_far = g.time_ms() - self.t_prompt + PRIOR_TOKENS * PRIOR_MS_PER_TOKEN
                ms_per_token = so_far // (pos - self.n + PRIOR_TOKENS)
                late = late | (g.time_ms() >= self.until - END_CUE_TOKENS * ms_per_token)
            tok = torch.where(boundary & ~g.dim_used & late, T.DIM_ID, tok)
        if self.until is not None:  # <E> after the first event that starts at `until`
            tok = torch.where(boundary & g.at_event & (g.time_ms() >= self.until), T.EOS_ID, tok)
        tok = torch.where(g.done, T.PAD_ID, tok)
        self.seq.scatter_(1, pos[:, None], tok[:, None])
        g.advance(tok)
        pos.add_(1)


@torch.no_grad()
def generate(model, prompts, n_variations=1, length=2048, sampling=None, *, device=None, stats=None,
             progress=None, on_step=None, prefilled=0, compile=False, cuda_graph=False, **sampling_kwargs):
    """Continue prompts; -> one full token list per row (prompt + new tokens, cut after <E>).

    prompts:      one prompt (ids, `prefix <S> body`, no <E>) or several (lists of ids, a 2-D tensor),
                  each sampled n_variations times, all rows as one batch
    length:       new tokens at most, capped by the model's max_seq_len minus the longest prompt
    sampling:     a Sampling; its fields may also come as keywords (temp=0, seed=3, end=True ...)
    device:       where to run (the model is moved there); default: where the model is
    stats:        a dict to fill with timings and counts
    progress:     called as progress(steps_done, length) at most every 10 s
    on_step:      called as on_step(i, tokens) with each step's new token per row (a host read per
                  step: streaming, live.py); returning True stops
    prefilled:    the KV cache already holds the first `prefilled` tokens of the (one) prompt
    compile, cuda_graph: torch.compile the model call, record the step as CUDA graphs (_forward_fn, _capture)
    """
    s = replace(sampling or Sampling(), **sampling_kwargs)
    ids = [p.tolist() if hasattr(p, "tolist") else p for p in prompts]  # rows of tensors, numpy arrays
    prompts = ids if ids and isinstance(ids[0], (list, tuple)) else [ids]
    rows = [[int(i) for i in p] for p in prompts for _ in range(n_variations)]
    if n_variations < 1 or not all(rows):
        raise ValueError("need n_variations >= 1 and non-empty prompts")
    V = model.config.vocab_size
    if V not in (T.VOCAB_SIZE, T.PEDAL_VOCAB_SIZE):
        raise ValueError(f"model vocabulary {V}: the tokenizer has {T.VOCAB_SIZE} "
                         f"(or {T.PEDAL_VOCAB_SIZE} with the pedal)")
    if getattr(model, "lm_head", None) is None:
        raise ValueError(f"the model has no LM head (heads: {model.heads})")
    emb = model.model.tok_embeddings.weight  # never quantized: its dtype is the model's
    device = torch.empty(0, device=device if device is not None else emb.device).device
    model = model.to(device)
    B, P = len(rows), max(len(p) for p in rows)
    length = min(length, model.config.max_seq_len - P)
    if length < 1:
        raise ValueError(f"prompt of {P} tokens leaves no room in the model's context "
                         f"({model.config.max_seq_len} tokens)")
    if prefilled and (B > 1 or prefilled >= P):
        raise ValueError(f"prefilled={prefilled}: needs one row, and fewer than its {P} prompt tokens")
    _sync(device)
    t0 = time.perf_counter()
    forward = _forward_fn(compile, cuda_graph, device)
    dec = Decoder(model, rows, length, s, device, forward, KV_BUCKET if cuda_graph or compile else 1)
    _ensure_cache(model, B, P + length, emb.dtype, device, keep=prefilled > 0)
    dec.prefill(prefilled)
    _sync(device)
    t1 = time.perf_counter()
    run = _graphed(dec, device) if cuda_graph else dec.step
    new = torch.arange(B, device=device)  # (B,) row index: seq[new, pos - 1] is each row's newest token
    run(0)
    stop = on_step is not None and on_step(0, dec.seq[new, dec.pos - 1].tolist())
    _sync(device)
    t_first = t_shown = time.perf_counter()
    steps = 1
    while steps < length and not stop:
        if steps % CHECK_DONE_EVERY == 0 or on_step is not None:
            if bool(dec.g.done.all()):  # the one host sync of the loop
                break
            if progress is not None and time.perf_counter() - t_shown > 10:
                t_shown = time.perf_counter()
                progress(steps, length)
        run(steps)
        if on_step is not None:
            stop = on_step(steps, dec.seq[new, dec.pos - 1].tolist())
        steps += 1
    out = dec.seq.tolist()  # the one big copy to the host
    t2 = time.perf_counter()

    results = [r[:len(p) + steps] for r, p in zip(out, rows)]
    results = [r[:r.index(T.EOS_ID) + 1] if T.EOS_ID in r else r for r in results]
    if stats is not None:
        n_new = sum(len(r) - len(p) for r, p in zip(results, rows))
        stats.update(prefill_s=t1 - t0, first_token_s=t_first - t0, decode_s=t2 - t1, steps=steps,
                     step_s=(t2 - t_first) / max(steps - 1, 1), new_tokens=n_new,
                     tokens_per_s=n_new / (t2 - t0),
                     decode_tokens_per_s=B * steps / (t2 - t1), device=str(device),
                     dtype=str(emb.dtype).replace("torch.", ""))
    return results


def _ensure_cache(model, batch, length, dtype, device, keep=False):
    # reuse KV buffers that fit, whatever they store (setup_cache's dtype: --kv; compiled code keeps
    # pointing at them; a longer one may hold a prefill); stale slots are overwritten before being read
    kv = model.model.encode_layers[0].kv_cache
    if kv is not None and (kv.k.shape[0], kv.k.device) == (batch, device) and kv.k.shape[2] >= length:
        return
    if keep:
        raise ValueError("prefilled: the model's KV cache does not hold that prefill "
                         "(call setup_cache first)")
    model.setup_cache(batch, length, dtype=dtype, device=device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -----------------------------------------------------------------------------
# torch.compile and CUDA graphs: the same step, recorded or compiled (CUDA; same tokens as eager)


def _forward(model, tok, pos, kv_len):
    return model(tok, input_pos=pos, kv_len=kv_len)[:, 0]  # (B, 1) ids at positions pos -> (B, V) logits


_compiled = {}


def _forward_fn(compile, cuda_graph, device):
    """The decode step's model call, eager or torch.compile'd (once per options: a fresh
    torch.compile recompiles); dynamo cannot trace the draw's seeded torch.Generator. True:
    inductor on CUDA (else eager), without cuda_graph also with its own CUDA graphs (mode=
    "reduce-overhead"), which cannot nest in ours. A dict: torch.compile(**dict) anywhere."""
    if compile is True and device.type == "cuda":
        compile = dict(fullgraph=True, mode=None if cuda_graph else "reduce-overhead")
    if not isinstance(compile, dict):
        return _forward
    key = tuple(sorted(compile.items()))
    if key not in _compiled:
        _compiled[key] = torch.compile(_forward, **compile)
    fn = _compiled[key]
    if compile.get("mode") != "reduce-overhead":
        return fn

    def marked(*args):
        torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs may be overwritten now
        return fn(*args)
    return marked


def _graphed(dec, device):
    """i -> dec.step(i), replayed from the CUDA graph of step i's read length (recorded the first
    time that length comes up, which also makes token i)."""
    graphs = {}

    def run(i):
        if dec.read_len(i) in graphs:
            return graphs[dec.read_len(i)]()
        graphs[dec.read_len(i)] = _capture(lambda: dec.step(i), dec.gen, device)
    return run


def _capture(step, gen, device):
    """Run `step` once on a side stream (PyTorch's recipe before a capture: lazy inits,
    inductor's compile), which makes the token, then record it as a CUDA graph and return the
    replay; recording runs no kernels. The seeded generator is registered with the graph, so
    each replay reads its seed and offset on the device and advances it as an eager call would:
    graph and eager draw the same numbers (tests/test_cuda.py)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(gen)
    with torch.cuda.graph(graph):
        step()
    return graph.replay


# -----------------------------------------------------------------------------
# Output: MIDI files, JSON sidecars, piano rolls



def split_notes(row, n_prompt):
    """(prompt notes, continuation notes, channel programs) of a full row, in ms. The
    continuation's onsets count from its segment, so it is decoded together with the
    prompt (which supplies the prefix, <S> and the <T>s before it)."""
    notes, programs = T.detokenize_notes(row)
    k = len(T.detokenize_notes(row[:n_prompt])[0])  # an event cut by the prompt's end counts as new
    return Split(notes[:k], notes[k:], programs)


def continuation_midi(row, n_prompt):
    """The continuation alone as a mido.MidiFile, moved so that its first note starts at 0."""
    part = split_notes(row, n_prompt)
    t0 = min((n[0] for n in part.new), default=0)
    return T.notes_to_midi([(s - t0, e - t0, p, v, c) for s, e, p, v, c in part.new], part.programs)


def plot_roll(prompt_notes, new_notes, path, title):
    """A piano-roll PNG, prompt and continuation in two colours. False if no matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(14, 5))
    parts = ((prompt_notes, "tab:blue", "prompt"), (new_notes, "tab:orange", "continuation"))
    for notes, color, label in parts:
        if notes:
            ax.barh([n[2] for n in notes], [(n[1] - n[0]) / 1000 for n in notes],
                    left=[n[0] / 1000 for n in notes], height=0.8, color=color, label=label)
    ax.set(xlabel="time (s)", ylabel="MIDI pitch", title=title)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# -----------------------------------------------------------------------------
# CLI


class Fail(Exception):
    """A one-line error for the user (exit status 1, no traceback)."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 1, like every other bad input
        raise Fail(message)


def add_model_args(ap):
    """The options that pick and run the model (sample.py and live.py)."""
    ap.add_argument("--ckpt", default=DEFAULT_CKPT,
                    help="checkpoint: official .safetensors (config X.json beside it, or inferred), "
                         "our .pt, or a folder (its latest checkpoint)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                    help="auto: cuda, else mps, else cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="weights and KV cache; auto: bfloat16 on CUDA, float32 elsewhere")
    ap.add_argument("--quantize", default="none", choices=["none", "int8", "int4"],
                    help="weights of the blocks and LM head at load: int8 per output channel, int4 in "
                         "groups; CPU: about 4x faster decoding (docs/performance.md); elsewhere "
                         "dequantized in the matmul")
    ap.add_argument("--group_size", type=int, default=64, help="int4: inputs per scale and offset")
    ap.add_argument("--kv", default="auto", choices=["auto", "float32", "bfloat16", "int8"],
                    help="what the KV cache stores: auto = the weights' dtype (exact) for float weights, "
                         f"{KV_AUTO_QUANTIZED} with --quantize (measured fastest: docs/performance.md); "
                         "bfloat16 halves its bytes, int8 (a scale per token and head) quarters them")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads; 0 = torch's default (on a busy 2-core machine 1 is often "
                         "faster)")
    ap.add_argument("--compile", action="store_true",
                    help="CUDA: torch.compile the model's forward (inductor; without --cuda_graph also "
                         "its CUDA graphs); the first step pays for compiling")
    ap.add_argument("--cuda_graph", action="store_true",
                    help="CUDA: record the decode step as CUDA graphs (one per 256 cache slots read) "
                         "and replay "
                         "them (same tokens as without; experimental: not yet run on a GPU)")


def add_sampling_args(ap, **defaults):
    """How tokens are drawn (sample.py and live.py; `defaults` overrides sample.py's own, by
    field name). sampling_from_args(a) turns the parsed options into a Sampling."""
    d = {**vars(Sampling()), **defaults}
    ap.add_argument("--temp", type=float, default=d["temp"], help="temperature in [0, 2]; 0 = greedy")
    ap.add_argument("--min_p", type=float, default=d["min_p"],
                    help="drop tokens less likely than min_p x the most likely one; 0 = off")
    ap.add_argument("--top_p", type=float, default=d["top_p"],
                    help="nucleus sampling in (0, 1]; unset or 1 = off")
    ap.add_argument("--top_k", type=int, default=d["top_k"],
                    help="keep only the k most likely tokens; 0 = off")
    ap.add_argument("--seed", type=int, default=d["seed"],
                    help="seeds the sampler: same seed, checkpoint and device give byte-identical MIDI")
    ap.add_argument("--end", action="store_true",
                    help="steer toward an ending: <D> in the last 130 positions, or ~100 tokens before "
                         "--seconds "
                         "(official force_end; a generatively finetuned model then ends with <E>)")
    ap.add_argument("--no_grammar", action="store_true",
                    help="sample from the whole vocabulary, as the official code does (output may not "
                         "decode)")
    ap.add_argument("--seconds", type=float, default=d["seconds"],
                    help="end each continuation after this much music (<E> after the first note "
                         "starting later)")


def sampling_from_args(a, **fields) -> Sampling:
    """The parsed options as a Sampling; `fields` set the ones a script decides itself."""
    s = Sampling(temp=a.temp, min_p=a.min_p, top_p=a.top_p, top_k=a.top_k, seed=a.seed, end=a.end,
                 seconds=a.seconds, grammar=not a.no_grammar)
    return replace(s, **fields)


def build_parser():
    ap = Parser(prog="sample.py",
                description="Continue a MIDI prompt (or start from scratch) with an Aria model.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("prompt", nargs="?", default=None,
                    help="MIDI file to continue; leave out to generate from scratch (piano prefix, <S>)")
    ap.add_argument("--out", default="samples", help="output folder")
    ap.add_argument("--prompt_seconds", type=float, default=15.0,
                    help="continue the notes that start in the first this many seconds (paper §4)")
    ap.add_argument("--variations", type=int, default=1,
                    help="continuations, sampled as one batch (the paper's listening test used 8 per prompt)")
    ap.add_argument("--length", type=int, default=2048,
                    help="new tokens at most (official default); capped by the model's context minus the "
                         "prompt")
    add_model_args(ap)
    add_sampling_args(ap)
    ap.add_argument("--stream", action="store_true",
                    help="print each new note (and pedal change) as a JSON line the moment it is decoded")
    ap.add_argument("--port", default=None,
                    help="also play the first continuation on this MIDI output port in real time, from "
                         "the end "
                         "of the prompt (needs python-rtmidi; `python live.py --list` names the ports)")
    ap.add_argument("--continuation_only", action="store_true",
                    help="write only the continuation, moved to start at 0 s")
    ap.add_argument("--plot", action="store_true", help="also write a piano-roll PNG (needs matplotlib)")
    return ap


def check_args(a):
    problems = [
        (a.prompt_seconds <= 0, f"--prompt_seconds must be > 0 (got {a.prompt_seconds:g})"),
        (a.variations < 1, f"--variations must be >= 1 (got {a.variations})"),
        (a.length < 1, f"--length must be >= 1 (got {a.length})"),
        (not 0 <= a.temp <= 2, f"--temp must be in [0, 2] (got {a.temp:g})"),
        (not 0 <= a.min_p < 1, f"--min_p must be in [0, 1) (got {a.min_p:g})"),
        (a.top_p is not None and not 0 < a.top_p <= 1, f"--top_p must be in (0, 1] (got {a.top_p})"),
        (a.top_k < 0, f"--top_k must be >= 0 (got {a.top_k})"),
        (a.threads < 0, f"--threads must be >= 0 (got {a.threads})"),
        (a.seconds is not None and a.seconds <= 0, f"--seconds must be > 0 (got {a.seconds})"),
    ]
    for bad, msg in problems:
        if bad:
            raise Fail(msg)


def pick_device(name):
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        return next(d for d, ok in available.items() if ok)
    if not available[name]:
        raise Fail(f"--device {name}: not available on this machine")
    return name


def kv_dtype(name, model):
    """--kv -> the KV cache's dtype: the weights' own unless asked (or auto with quantized weights,
    whose tokens change anyway)."""
    if name == "auto":
        name = KV_AUTO_QUANTIZED if getattr(model, "quantized", None) else None
    return getattr(torch, name) if name else model.model.tok_embeddings.weight.dtype


def pick_dtype(name, device):
    if name == "auto":
        return torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def load_prompt(a, pedal=False):
    """The prompt's ids, in the model's vocabulary (pedal: the demo checkpoint's)."""
    if a.prompt is None:
        return [T.INSTRUMENT_PREFIX_ID["piano"], T.BOS_ID]
    try:
        ids = T.prompt(a.prompt, a.prompt_seconds, pedal=pedal)
    except T.TokenizerError as e:
        raise Fail(str(e)) from None
    if not any(T.TOKEN_CLASS[i] in (T.NOTE, T.DRUM) for i in ids):
        raise Fail(f"{a.prompt}: no notes start in the first {a.prompt_seconds:g} s; raise --prompt_seconds, "
                   "or leave out the prompt to generate from scratch")
    return ids


def load_lm(a, device, dtype):
    path = None
    try:
        path = M.resolve_checkpoint(a.ckpt)
        model = M.load_model(path, device=device, dtype=dtype)
    except M.CheckpointError as e:
        if path is None and a.ckpt == DEFAULT_CKPT:
            raise Fail(f"no checkpoint at {DEFAULT_CKPT} — run `python pretrain.py` first or pass "
                       "--ckpt") from None
        raise Fail(str(e)) from None
    if "lm" not in model.heads:
        raise Fail(f"{path}: no LM head (it has {', '.join(model.heads)}): sampling needs a generative "
                   "checkpoint (aria-medium-gen / -base, or one from pretrain.py)")
    done = getattr(model, "quantized", None)
    if a.quantize != "none" and done and done["mode"] != a.quantize:
        raise Fail(f"{path}: already quantized to {done['mode']}; leave out --quantize {a.quantize}")
    try:
        Q.quantize(model, "none" if done else a.quantize, a.group_size)
    except ValueError as e:
        raise Fail(f"--quantize {a.quantize} --group_size {a.group_size}: {e}") from None
    return model, path


def main(argv=None):
    warnings.formatwarning = lambda msg, *rest, **kw: f"warning: {msg}\n"
    try:
        return run(argv)
    except Fail as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # --stream's reader left (`| head`): stop quietly, as a Unix tool does
        quiet_stdout()
        return 1


def quiet_stdout():
    """Point stdout at /dev/null after its pipe closed, so the flush at exit stays silent."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def run(argv=None):
    a = build_parser().parse_args(argv)
    check_args(a)
    log = functools.partial(print, file=sys.stderr) if a.stream else print  # --stream: stdout is JSON lines
    if a.threads:
        torch.set_num_threads(a.threads)
    device = pick_device(a.device)
    dtype = pick_dtype(a.dtype, device)
    for option in ("compile", "cuda_graph"):
        if getattr(a, option) and device != "cuda":
            log(f"note: --{option} applies to CUDA only; decoding eagerly on {device}")
    model, ckpt_path = load_lm(a, device, dtype)
    ids = load_prompt(a, model.pedal)
    name = Path(a.prompt).stem if a.prompt else "scratch"
    what = f"{a.prompt}, first {a.prompt_seconds:g} s" if a.prompt else "from scratch"
    log(f"prompt: {what}: {len(ids)} tokens, {len(T.detokenize_notes(ids)[0])} notes")
    log(f"model: {ckpt_path}, {model.num_params() / 1e6:.1f}M parameters, {device} "
          f"{str(dtype).replace('torch.', '')}" + (", pedal tokens" if model.pedal else "")
          + (f", {a.quantize} weights" if a.quantize != "none" else "")
          + f", {str(kv_dtype(a.kv, model)).replace('torch.', '')} KV cache")
    length = min(a.length, model.config.max_seq_len - len(ids))
    if length < 1:
        raise Fail(f"the prompt has {len(ids)} tokens, the model's context is {model.config.max_seq_len}; "
                   "use a shorter --prompt_seconds")
    if length < a.length:
        log(f"note: --length {a.length} capped at {length} (context {model.config.max_seq_len} "
              f"minus the {len(ids)}-token prompt)")

    model.setup_cache(a.variations, len(ids) + length, dtype=kv_dtype(a.kv, model), device=device)
    stats, gpu = {}, device == "cuda"
    on_step = finish = None
    if a.stream or a.port:  # notes as they are decoded: JSON lines, the first row played in real time
        try:
            last_ms = G.prompt_info(ids, model.config.vocab_size).last_ms
            on_step, finish = P.stream_notes(ids, a.variations, a.stream, a.port, last_ms)
        except P.LiveError as e:
            raise Fail(str(e)) from None
    try:
        rows = generate(model, ids, a.variations, length, sampling_from_args(a), device=device, stats=stats,
                        progress=lambda steps, total: log(f"  {steps}/{total} steps", flush=True),
                        on_step=on_step, compile=a.compile and gpu, cuda_graph=a.cuda_graph and gpu)
    finally:
        error = finish and finish()  # the last notes play out, then all off
    if error:
        raise Fail(f"{a.port}: {error}")
    log(f"generated {stats['new_tokens']} new tokens ({a.variations} x up to {length}) in "
          f"{stats['prefill_s'] + stats['decode_s']:.2f} s: {stats['tokens_per_s']:.1f} tokens/s; first new "
          f"token after {stats['first_token_s']:.2f} s, then {stats['step_s'] * 1e3:.2f} ms per step")

    out = Path(a.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for i, row in enumerate(rows, 1):
            stem = out / f"{name}_{i}"
            old, new = split_notes(row, len(ids))[:2]
            midi = continuation_midi(row, len(ids)) if a.continuation_only else T.detokenize(row)
            M.atomic_write(f"{stem}.mid", lambda f: midi.save(file=f))  # a crash never leaves half a file
            side = {
                "midi": f"{stem}.mid", "prompt": a.prompt,
                "prompt_seconds": a.prompt_seconds if a.prompt else None,
                "checkpoint": str(ckpt_path), "variation": i, "seed": a.seed, "ended": row[-1] == T.EOS_ID,
                "n_prompt_tokens": len(ids), "n_new_tokens": len(row) - len(ids),
                "n_prompt_notes": len(old), "n_new_notes": len(new),
                "continuation_only": a.continuation_only, "tokens_per_s": round(stats["tokens_per_s"], 2),
                "decode_tokens_per_s": round(stats["decode_tokens_per_s"], 2),
                "device": stats["device"], "dtype": stats["dtype"], "length": length,
                "settings": vars(a), "ids": row,
            }
            M.atomic_write(f"{stem}.json", lambda f: f.write(json.dumps(side).encode() + b"\n"))
            written = [f"{stem}.mid", f"{stem}.json"]
            if a.plot and plot_roll(old, new, f"{stem}.png", f"{name} #{i} (seed {a.seed})"):
                written.append(f"{stem}.png")
            elif a.plot and i == 1:
                log("note: matplotlib is not installed; no piano roll written (pip install matplotlib)")
            end = "ends with <E>" if side["ended"] else "no <E>"
            log(f"wrote {', '.join(written)}: {len(new)} new notes, {side['n_new_tokens']} new tokens, {end}")
    except OSError as e:
        raise Fail(f"{out}: cannot write ({e.strerror or e})") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
