"""
The Aria transformer: a small, flat PyTorch reimplementation.

Aria ("Scaling Self-Supervised Representation Learning for Symbolic Piano Performance", ISMIR 2025,
§3.2) is a LLaMA-3.2-style decoder with a few changes: pre-LN with nn.LayerNorm (bias, eps 1e-5),
full multi-head attention with a fused bias-free QKV projection, RoPE theta=500000 in the
rotate-half layout, SwiGLU FFN, final LayerNorm, untied heads. One trunk serves every use:

    lm       lm_head            (B, T, vocab)  next-token logits (pretraining, generation)
    emb      emb_head           (B, T, E)      contrastive embedding, read at <E>
    cls      class_head         (B, T, C)      classifier logits, read at <E>
    adapter  embedding_adapter  E -> d         conditions the LM on an embedding

Parameter names are the official ones (EleutherAI/aria @ b0486c8, aria/model.py and
aria/inference/model_cuda.py): official safetensors load unchanged.
Sections: config and presets; the network (rope, Block, Transformer: the network ends there);
the KV cache for decoding; the heads (Aria); loading and saving checkpoints. The helpers the
training loops call in one line are in training.py.
"""
import json
import os
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import tokenizer

VOCAB_SIZE = tokenizer.VOCAB_SIZE  # 17727, the official AbsTokenizer vocabulary
ROPE_THETA = 500000.0
HEAD_DIM = 64  # official head width; used to guess n_heads when no config is given


# -----------------------------------------------------------------------------
# config


@dataclass
class ModelConfig:
    # field names, order and defaults match the official ModelConfig (aria/model.py),
    # so official JSON configs load and ours load in the official code
    d_model: int
    n_heads: int
    n_layers: int
    ff_mult: int = 4
    drop_p: float = 0.0  # unused, as in the official code
    max_seq_len: int = 8192
    grad_checkpoint: bool = False
    resid_dropout: float = 0.0
    vocab_size: int = VOCAB_SIZE
    class_size: int | None = None
    emb_size: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


PRESETS = {
    # official aria-medium: 658,538,496 parameters with lm_head, 64-wide heads (paper §3.2)
    "medium": ModelConfig(d_model=1536, n_heads=24, n_layers=16, max_seq_len=8192),
    # GPT-2-small shape, ~137M parameters: about 1/5 of medium's compute per
    # token, for pretraining experiments on one GPU in a day
    "small": ModelConfig(d_model=768, n_heads=12, n_layers=12, max_seq_len=8192),
    # CPU demos and tests; 64-wide heads so shape inference (load_model) still works
    "tiny": ModelConfig(d_model=128, n_heads=2, n_layers=4, max_seq_len=2048),
}

# head kind -> official attribute (and state-dict prefix)
HEAD_ATTRS = {"lm": "lm_head", "emb": "emb_head", "cls": "class_head", "adapter": "embedding_adapter"}
OUTPUT_HEADS = ("lm", "emb", "cls")  # preference order for the default head


# -----------------------------------------------------------------------------
# layers


def rope(pos, head_dim):
    """cos, sin of the RoPE angles at positions pos (T,) or (B, T) -> (..., T, Dh/2), float32. Computed
    at every call (a few tiny kernels): no float32 table to keep when the model is cast to bf16."""
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, head_dim, 2, device=pos.device).float() / head_dim))
    angle = pos.float()[..., None] * inv_freq
    return angle.cos(), angle.sin()


def apply_rope(x, cos, sin):
    # x: (B, T, H, Dh); cos/sin broadcast as (B|1, T, 1, Dh/2). Rotate-half layout
    # (HF Llama convention), computed in float32 as in official training.
    h = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :h], xf[..., h:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


class Block(nn.Module):
    """Pre-LN block: x + drop(attn(norm1(x))), then x + drop(ffn(norm2(x)))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        d, hidden = cfg.d_model, cfg.ff_mult * cfg.d_model
        self.n_heads, self.head_dim = cfg.n_heads, d // cfg.n_heads
        self.mixed_qkv = nn.Linear(d, 3 * d, bias=False)
        self.att_proj_linear = nn.Linear(d, d, bias=False)
        self.ff_gate_proj = nn.Linear(d, hidden, bias=False)
        self.ff_up_proj = nn.Linear(d, hidden, bias=False)
        self.ff_down_proj = nn.Linear(hidden, d, bias=False)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)
        # "layerwise dropout": 0 at the first layer rising linearly to resid_dropout
        # at the last (classifier finetune, paper §4.1: 0.2; official aria/model.py)
        self.dropout = nn.Dropout(cfg.resid_dropout * layer_idx / max(1, cfg.n_layers - 1))
        self.kv_cache: KVCache | None = None

    def attention(self, x, cos, sin, pos=None, kv_len=None, mask=None):
        B, T, C = x.shape
        q, k, v = self.mixed_qkv(x).chunk(3, dim=-1)  # 3 x (B, T, C), order q|k|v
        q = apply_rope(q.view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(B, T, self.n_heads, self.head_dim), cos, sin)
        v = v.view(B, T, self.n_heads, self.head_dim)
        q = q.transpose(1, 2)  # (B, H, T, Dh)
        k = k.transpose(1, 2)
        v = v.transpose(1, 2)
        if pos is None:
            # no padding/document mask, as in official training; flash kernel on CUDA
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif T == 1 and self.kv_cache.compact:  # one token reads a compact cache as it is stored
            y = self.kv_cache.attend_one(q, pos, k, v, kv_len, mask).to(x.dtype)
        else:  # attend over the filled cache: causal for a prefill from 0, no mask for one aligned token
            k, v = self.kv_cache.update(pos, k, v, kv_len)  # (B, H, kv_len, Dh)
            causal = isinstance(pos, int) and pos == 0 and T > 1
            y = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask, is_causal=causal)
            y = y.to(x.dtype)
        return self.att_proj_linear(y.transpose(1, 2).reshape(B, T, C))

    def forward(self, x, cos, sin, pos=None, kv_len=None, mask=None):
        x = x + self.dropout(self.attention(self.norm1(x), cos, sin, pos, kv_len, mask))
        h = self.norm2(x)
        return x + self.dropout(self.ff_down_proj(F.silu(self.ff_gate_proj(h)) * self.ff_up_proj(h)))


class Transformer(nn.Module):
    """The trunk (official `Transformer`): token embedding, blocks, final LayerNorm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.d_model % cfg.n_heads == 0, "d_model must be divisible by n_heads"
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encode_layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.out_layer_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, h, input_pos=None, kv_len=None):
        """h: (B, T, d) input embeddings -> (B, T, d) after out_layer_norm. With a KV cache
        (setup_cache), input_pos says where the T tokens go and attention reads only the filled
        slots: an int s puts every row at s..s+T-1 and reads slots [0, s+T) (a prefill from 0 is
        causal, one token needs no mask); a (T,) or (B, T) tensor puts each row at its own
        positions and reads slots [0, kv_len) (default: all) with a mask, static shapes for CUDA
        graphs. Stale slots (right padding of a shorter row) lie after the row's position and are
        overwritten before they become visible."""
        B, T, _ = h.shape
        mask = pos = None
        if input_pos is None and T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} > max_seq_len {self.cfg.max_seq_len}")
        if input_pos is not None:
            cache = self.encode_layers[0].kv_cache
            if cache is None:
                raise RuntimeError("input_pos needs a KV cache: call setup_cache() first")
            if isinstance(input_pos, int):
                pos, kv_len = input_pos, input_pos + T
                if input_pos + T > cache.k.shape[2]:
                    raise ValueError(f"positions up to {input_pos + T} > cache length {cache.k.shape[2]}")
                if input_pos > 0 and T > 1:  # (T, s+T): query i sees slots up to s+i
                    slots = torch.arange(kv_len, device=h.device)
                    mask = slots <= slots[input_pos:, None]
            else:
                pos = input_pos if input_pos.dim() == 2 else input_pos[None].expand(B, T)  # (B, T)
                kv_len = kv_len or cache.k.shape[2]
                mask = torch.arange(kv_len, device=h.device) <= pos[:, None, :, None]  # (B, 1, T, kv_len)
        start = pos if isinstance(pos, int) else 0
        rope_pos = torch.arange(start, start + T, device=h.device)[None] if not torch.is_tensor(pos) else pos
        cos, sin = rope(rope_pos, self.cfg.d_model // self.cfg.n_heads)
        cos, sin = cos[:, :, None], sin[:, :, None]  # (B|1, T, 1, Dh/2)
        use_ckpt = self.cfg.grad_checkpoint and self.training and torch.is_grad_enabled()
        for layer in self.encode_layers:
            if use_ckpt:  # recompute the block in backward: activation memory of one block
                h = checkpoint(layer, h, cos, sin, pos, kv_len, mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, pos, kv_len, mask)
        return self.out_layer_norm(h)


# -----------------------------------------------------------------------------
# The KV cache: what decoding keeps of the past


class KVCache:
    """Static (B, H, L, Dh) key/value buffers in the model's dtype, written in place, read only up
    to the filled length. quantize.CompactKVCache stores bf16 or int8 instead (setup_cache)."""
    compact = False  # True: a decode step calls attend_one, which reads the stored bytes as they are

    def __init__(self, shape, dtype, device):
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.rows = torch.arange(shape[0], device=device)[:, None]  # (B, 1)

    def bytes_per_slot(self) -> int:
        """Bytes one cached position takes (K and V, every row and head)."""
        return 2 * self.k[:, :, 0].numel() * self.k.element_size()

    def update(self, pos, k, v, kv_len):
        """k, v: (B, H, T, Dh) written at pos, an int s (every row at s..s+T-1: a slice copy)
        or a (B, T) tensor (each row at its own positions); -> the first kv_len slots of each.
        Both writes stay in place under torch.compile (scatter_ would copy the whole cache)."""
        if isinstance(pos, int):
            self.k[:, :, pos:pos + k.shape[2]] = k
            self.v[:, :, pos:pos + k.shape[2]] = v
        else:  # index_put_ over (B, T) -> indexes (B, T, H, Dh)
            self.k[self.rows, :, pos] = k.transpose(1, 2).to(self.k.dtype)
            self.v[self.rows, :, pos] = v.transpose(1, 2).to(self.v.dtype)
        return self.k[:, :, :kv_len], self.v[:, :, :kv_len]


# -----------------------------------------------------------------------------
# The heads: the trunk plus lm / emb / cls heads and the embedding adapter (official class names)


class Aria(nn.Module):
    """Trunk `self.model` plus any of lm_head / emb_head / class_head / embedding_adapter.
    `heads` lists kinds from HEAD_ATTRS; the first output head is forward's default; None picks
    cls if class_size, else emb if emb_size, else lm. The official classes are ("lm",), ("emb",),
    ("cls",), and ("lm", "adapter") for LM_CND; emb_head and the adapter share emb_size."""

    def __init__(self, config: ModelConfig, heads=None):
        super().__init__()
        cfg = self.config = replace(config)
        heads = heads or (("cls",) if cfg.class_size else ("emb",) if cfg.emb_size else ("lm",))
        if not any(h in OUTPUT_HEADS for h in heads) or not set(heads) <= set(HEAD_ATTRS):
            raise ValueError(f"heads={tuple(heads)}: expected kinds from {tuple(HEAD_ATTRS)}, "
                             "one an output head")
        self.model = Transformer(cfg)
        sizes = {"lm": cfg.vocab_size, "emb": cfg.emb_size, "cls": cfg.class_size, "adapter": cfg.emb_size}
        for kind, attr in HEAD_ATTRS.items():  # fresh heads: PyTorch's default init
            if kind in heads and not sizes[kind]:
                field = "class_size" if kind == "cls" else "emb_size"
                raise ValueError(f"{kind} head needs a size ({field})")
            shape = (sizes[kind], cfg.d_model) if kind == "adapter" else (cfg.d_model, sizes[kind])
            setattr(self, attr, nn.Linear(*shape, bias=False) if kind in heads else None)
        self.default_head = next(h for h in heads if h in OUTPUT_HEADS)

    @property
    def pedal(self) -> bool:
        """The model speaks the pedal vocabulary (<PED_ON>/<PED_OFF>, the official demo's): every
        script tokenizes for it with tokenizer's pedal=True."""
        return self.config.vocab_size == tokenizer.PEDAL_VOCAB_SIZE

    @property
    def heads(self) -> tuple:
        return tuple(k for k, a in HEAD_ATTRS.items() if getattr(self, a) is not None)

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        n += sum(q.n_out * q.n_in for q in self.modules() if hasattr(q, "qweight"))  # quantize.QLinear
        return n - self.model.tok_embeddings.weight.numel() if exclude_embedding else n

    def hidden(self, ids, emb=None, input_pos=None, kv_len=None):
        """Final-LayerNorm output. ids: (B, T) -> (B, T, d), or (B, T-1, d) with emb."""
        h = self.model.tok_embeddings(ids)  # (B, T, d)
        if emb is not None:
            if self.embedding_adapter is None:
                raise ValueError("emb given but the model has no embedding_adapter")
            # official TransformerLM_CND: the adapted embedding takes position 0 and
            # the last token falls off, so the output stays aligned with the targets
            c = self.embedding_adapter(emb.to(self.embedding_adapter.weight.dtype))[:, None]  # (B, 1, d)
            return self.model(torch.cat([c.to(h.dtype), h[:, :-1]], dim=1))[:, 1:]
        if self.embedding_adapter is not None and self.training:
            # DDP needs every parameter in the graph; official code does the same
            h = h + 0.0 * self.embedding_adapter.weight.sum()
        return self.model(h, input_pos, kv_len)

    def forward(self, ids, emb=None, input_pos=None, head=None, out_pos=None, kv_len=None):
        """ids (B, T) -> default (or `head`) output at every position: LM logits
        (B, T, V), embeddings (B, T, E) or class logits (B, T, C); T-1 positions
        with emb. out_pos (B,) gathers one position per row first -> (B, out):
        the <E> position for emb/cls, the last prompt token after a prefill. input_pos and
        kv_len: KV-cache decoding (Transformer.forward)."""
        h = self.hidden(ids, emb, input_pos, kv_len)
        if out_pos is not None:
            h = h[torch.arange(h.shape[0], device=h.device), out_pos]  # (B, d)
        kind = head or self.default_head
        if kind not in OUTPUT_HEADS or getattr(self, HEAD_ATTRS[kind]) is None:
            raise ValueError(f"model has no {kind!r} head (has {self.heads})")
        proj = getattr(self, HEAD_ATTRS[kind])
        if kind == "lm":
            return proj(h)
        # emb/cls read-outs run in the weights' dtype even under autocast: embeddings of an
        # undertrained trunk differ by less than bf16's resolution (cosines ~0.9999), and a
        # bf16 head would round those differences, and their gradients, away
        with torch.autocast(h.device.type, enabled=False):
            return proj(h.to(proj.weight.dtype))

    def setup_cache(self, batch_size: int, max_seq_len: int | None = None, dtype=None, device=None):
        """Preallocate static per-layer K/V buffers (B, H, L, Dh), gpt-fast style (official
        aria/inference/model_cuda.py keeps one too). dtype: the weights' (default: exact), or a
        compact torch.bfloat16 / torch.int8 (KVCache). Then, for prompts of lengths n (B,)
        right-padded to (B, P) (sample.py does exactly this):
            logits = model(prompt, input_pos=0, out_pos=n - 1)  # (B, V), causal over the prompt
            loop: logits = model(tok[:, None], input_pos=pos[:, None], kv_len=max(n) + i)[:, 0]
        or, when every row is at the same position p (one prompt, several variations), the
        mask-free model(tok[:, None], input_pos=p)."""
        cfg, w = self.config, self.model.tok_embeddings.weight
        L = max_seq_len or cfg.max_seq_len
        if L > cfg.max_seq_len:
            raise ValueError(f"cache length {L} > max_seq_len {cfg.max_seq_len}")
        cache = KVCache
        if (dtype or w.dtype) != w.dtype:  # a compact cache, a sampling-time quantization
            import quantize
            cache = quantize.CompactKVCache
        for layer in self.model.encode_layers:
            layer.kv_cache = cache((batch_size, cfg.n_heads, L, cfg.d_model // cfg.n_heads),
                                   dtype or w.dtype, device or w.device)


# -----------------------------------------------------------------------------
# checkpoints: our own .pt files, official safetensors, folders


def vocab_hash(vocab_size):
    """The tokenizer vocabulary a model of this size speaks: 17727 ids, or 17729 with the pedal."""
    return tokenizer.PEDAL_VOCAB_HASH if vocab_size == tokenizer.PEDAL_VOCAB_SIZE else tokenizer.VOCAB_HASH


def data_vocab(folder, model=None) -> int:
    """The vocabulary size a prepared dataset (prepare.py, meta.json) was tokenized for; with a
    model, a CheckpointError unless the model speaks it (a pedal dataset needs a pedal model)."""
    meta = json.loads((Path(folder) / "meta.json").read_text())
    sizes = {tokenizer.VOCAB_HASH: VOCAB_SIZE, tokenizer.PEDAL_VOCAB_HASH: tokenizer.PEDAL_VOCAB_SIZE}
    size = sizes.get(meta["vocab_hash"])
    if size is None:
        raise CheckpointError(f"{folder} was tokenized with another vocabulary (hash {meta['vocab_hash']})")
    if model is not None and model.config.vocab_size != size:
        kinds = {VOCAB_SIZE: "the default vocabulary", tokenizer.PEDAL_VOCAB_SIZE: "the pedal vocabulary"}
        speaks = model.config.vocab_size
        flag = "without" if size > VOCAB_SIZE else "with"
        raise CheckpointError(f"{folder} holds {kinds[size]} ({size} ids) but the model speaks "
                              f"{kinds.get(speaks, 'another')} ({speaks}): prepare the data {flag} --pedal, "
                              "or use a matching model")
    return size


class CheckpointError(Exception):
    """A checkpoint could not be found, read, or does not fit the model."""


def _normalize_keys(sd: dict) -> dict:
    # compiled models add `_orig_mod.`; DDP/accelerate wrappers add one leading component
    # (official aria/model.py convert_cp_from_safetensors strips it)
    sd = {k.replace("_orig_mod.", ""): v for k, v in sd.items()}
    wrapped = any(k.endswith(".model.tok_embeddings.weight") for k in sd)
    if "model.tok_embeddings.weight" not in sd and wrapped:
        sd = {k.split(".", 1)[-1]: v for k, v in sd.items()}
    return sd


def resolve_checkpoint(path) -> Path:
    """A file is returned as is. A folder gives its ckpt.pt (ours), else model.safetensors
    (official), else its only *.pt or *.safetensors file."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such file or directory")
    found = [f for f in (p / "ckpt.pt", p / "model.safetensors") if f.is_file()]
    found = found or sorted(p.glob("*.pt")) + sorted(p.glob("*.safetensors"))
    if len(found) == 1 or (found and found[0].name in ("ckpt.pt", "model.safetensors")):
        return found[0]
    raise CheckpointError(f"{p}: cannot pick a checkpoint ({len(found) or 'no'} *.pt / *.safetensors files, "
                          "none named ckpt.pt or model.safetensors)")


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a checkpoint file into a dict with at least "model" (a state dict).
    .pt files are read with torch.load(weights_only=True) only: no pickled code."""
    p = resolve_checkpoint(path)
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CheckpointError(f"{p}: reading .safetensors needs `pip install safetensors`") from None
        try:
            return {"model": load_file(str(p), device=str(map_location))}
        except Exception as e:
            raise CheckpointError(f"{p}: not a readable safetensors file ({e})") from None
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{p}: not a checkpoint (torch.load weights_only: {msg})") from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        return ckpt
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return {"model": ckpt}  # a bare state dict
    raise CheckpointError(f"{p}: not a checkpoint (no 'model' state dict inside)")


def _config_for(p: Path, ckpt: dict, sd: dict, overrides: dict) -> ModelConfig:
    """The checkpoint's own config, else X.json / config.json beside it (official format; its
    vocabulary size, which official configs leave out, from the tensors), else one inferred from
    the tensor shapes (64-wide heads). A JSON without d_model (the demo's tokenizer config.json,
    include_pedal) only says which vocabulary the weights must have."""
    j = next((f for f in (p.with_suffix(".json"), p.parent / "config.json") if f.is_file()), None)
    try:
        own = isinstance(ckpt.get("config"), dict)
        extra = json.loads(j.read_text()) if j is not None and not own else {}
    except ValueError as e:
        raise CheckpointError(f"{j}: not a JSON config ({e})") from None
    rows = sd["model.tok_embeddings.weight"].shape[0] if "model.tok_embeddings.weight" in sd else VOCAB_SIZE
    if '"include_pedal": true' in json.dumps(extra) and rows != tokenizer.PEDAL_VOCAB_SIZE:
        raise CheckpointError(f"{j} asks for the pedal vocabulary ({tokenizer.PEDAL_VOCAB_SIZE} tokens), "
                              f"the weights have {rows}")
    if isinstance(ckpt.get("config"), dict):
        cfg = ModelConfig.from_dict(ckpt["config"])
    elif "d_model" in extra:
        try:
            cfg = ModelConfig.from_dict({"vocab_size": rows, **extra})
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{j}: not a model config ({e})") from None
    else:
        if "model.tok_embeddings.weight" not in sd:
            raise CheckpointError(f"{p}: no model.tok_embeddings.weight, not an Aria checkpoint")
        vocab, d = sd["model.tok_embeddings.weight"].shape
        layers = {int(k.split(".")[2]) for k in sd if k.startswith("model.encode_layers.")}
        gate = sd.get("model.encode_layers.0.ff_gate_proj.weight")
        emb = sd.get("emb_head.weight", sd.get("embedding_adapter.weight", torch.empty(0, 0)).T)
        cfg = ModelConfig(d_model=d, n_heads=max(1, d // HEAD_DIM), n_layers=max(layers, default=-1) + 1,
                          ff_mult=gate.shape[0] // d if gate is not None else 4, vocab_size=vocab,
                          class_size=sd["class_head.weight"].shape[0] if "class_head.weight" in sd else None,
                          emb_size=emb.shape[0] or None)
        if vocab not in (VOCAB_SIZE, tokenizer.PEDAL_VOCAB_SIZE) and overrides.get("vocab_size") != vocab:
            raise CheckpointError(f"{p}: vocabulary size {vocab}, expected {VOCAB_SIZE} (the tokenizer's) "
                                  f"or {tokenizer.PEDAL_VOCAB_SIZE} (its pedal mode)")
        if "n_heads" not in overrides:  # cannot be read from weights
            warnings.warn(f"{p}: no config found beside it; assuming {HEAD_DIM}-wide heads "
                          f"(n_heads={cfg.n_heads}). Pass n_heads=... if that is wrong.")
    return replace(cfg, **overrides)


def load_model(path, device="cpu", dtype=torch.float32, strict=True, heads=None, **overrides) -> Aria:
    """Load an Aria model in eval mode from a .pt (ours), an official .safetensors,
    or a folder (see resolve_checkpoint). Heads are those present in the file, unless
    `heads` is given: then missing heads are freshly initialised and unrequested ones are
    dropped ("init from pretrained LM, replace head"). `overrides` change config
    fields (e.g. resid_dropout=0.2, grad_checkpoint=True, emb_size=512). The trunk
    is always loaded strictly; strict=False only tolerates unknown extra tensors."""
    p = resolve_checkpoint(path)
    ckpt = load_checkpoint(p, map_location="cpu")
    sd = _normalize_keys(ckpt["model"])
    cfg = _config_for(p, ckpt, sd, overrides)
    if heads is None:  # (a quantized lm_head has lm_head.qweight)
        heads = tuple(k for k in HEAD_ATTRS if any(n.startswith(HEAD_ATTRS[k] + ".") for n in sd))
        if not any(h in OUTPUT_HEADS for h in heads):
            raise CheckpointError(f"{p}: no head tensors (lm_head/emb_head/class_head); pass heads=...")
    if ckpt.get("vocab_hash") not in (None, vocab_hash(cfg.vocab_size)):
        warnings.warn(f"{p}: saved with vocabulary hash {ckpt['vocab_hash']}, current tokenizer has "
                      f"{vocab_hash(cfg.vocab_size)}; token ids may mean different things")
    try:
        with torch.device("meta"):  # no time or memory wasted on an init we overwrite
            model = Aria(cfg, heads)
            if ckpt.get("quantized"):  # saved by quantize.py: the same layers, loaded as they are
                import quantize
                quantize.quantize(model, **ckpt["quantized"])
    except (ValueError, AssertionError) as e:
        raise CheckpointError(f"{p}: config does not make a model ({e})") from None
    expected = model.state_dict()
    fresh = [k for k in expected if k not in sd]
    missing = [k for k in fresh if k.split(".")[0] not in HEAD_ATTRS.values()]
    if missing:
        raise CheckpointError(f"{p}: missing tensors {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    unexpected = [k for k in sd if k not in expected and k.split(".")[0] not in HEAD_ATTRS.values()]
    if unexpected and strict:
        more = " ..." if len(unexpected) > 4 else ""
        raise CheckpointError(f"{p}: unexpected tensors {unexpected[:4]}{more}")
    for k, t in expected.items():
        if k in sd and tuple(sd[k].shape) != tuple(t.shape):
            what = " (vocabulary size)" if k in ("model.tok_embeddings.weight", "lm_head.weight") else ""
            raise CheckpointError(f"{p}: {k} has shape {tuple(sd[k].shape)}, "
                                  f"config expects {tuple(t.shape)}{what}")
    model.load_state_dict({k: sd[k] for k in expected if k in sd}, strict=False, assign=True)
    for k in fresh:  # requested heads the checkpoint lacks: real default init
        head = getattr(model, k.split(".")[0])
        head.to_empty(device="cpu")
        head.reset_parameters()
    return model.to(device=device, dtype=dtype).eval()


def atomic_write(path, write):
    """write(f) into PATH.tmp, then rename it over PATH."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # a crash leaves the old file or the new one, never half of one


def save_checkpoint(path, model, **extra):
    """torch.save a plain dict {model, config, heads, vocab_hash, **extra} atomically.
    extra: optimizer state dict, step, rng tensors, vars(args), ..."""
    m = getattr(model, "module", model)  # DDP's; a compiled model passes attributes through
    if {"model", "config", "heads", "vocab_hash", "quantized"} & set(extra):
        raise ValueError(f"reserved checkpoint keys in {sorted(extra)}")
    ckpt = {"model": {k.replace("_orig_mod.", ""): v for k, v in m.state_dict().items()},
            "config": asdict(m.config), "heads": list(m.heads), "vocab_hash": vocab_hash(m.config.vocab_size),
            "quantized": getattr(m, "quantized", None), **extra}
    atomic_write(path, lambda f: torch.save(ckpt, f))


def export_safetensors(model, path, dtype=None):
    """Write the official layout (model.*, head keys) plus X.json with the official
    ModelConfig fields, loadable by the official code and by load_model."""
    try:
        from safetensors.torch import save
    except ImportError:
        raise RuntimeError("export_safetensors needs `pip install safetensors`") from None
    m, path = getattr(model, "module", model), Path(path)
    sd = {k.replace("_orig_mod.", ""): (v.to(dtype) if dtype else v).detach().cpu().contiguous().clone()
          for k, v in m.state_dict().items()}
    atomic_write(path, lambda f: f.write(save(sd, metadata={"format": "pt"})))
    cfg = {k: v for k, v in asdict(m.config).items() if v is not None}
    json_bytes = (json.dumps(cfg, indent=1) + "\n").encode()
    atomic_write(path.with_suffix(".json"), lambda f: f.write(json_bytes))
