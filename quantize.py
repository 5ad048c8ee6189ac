"""
Quantization for sampling. Weights (sample.py / bench.py / live.py --quantize): the blocks' linears
and the LM head of an Aria model (model.py) stored as int8, one scale per output channel, or int4,
a scale and offset per group of inputs, as gpt-fast does. Decoding one token streams every weight
once, so on a CPU the step time is the bytes read: 4x fewer at int8, 8x fewer at int4.

    import model as M, quantize as Q
    m = Q.quantize(M.load_model("model.safetensors"), "int4")     # in place; any checkpoint
    M.save_checkpoint("medium_int4.pt", m)                        # loads back quantized, no re-quantizing

Which kernel runs is chosen by measurement (README, Performance): on CPU, int8 goes through fbgemm's
dynamic int8 x int8 kernel (it also quantizes the activations, per row; VNNI) and int4 through
`_weight_int4pack_mm_for_cpu` (bf16 activations). Elsewhere (CUDA, MPS) a QLinear multiplies by its
dequantized weight, which torch.compile fuses (not yet measured on a GPU).

The KV cache (--kv, CompactKVCache): bf16, or int8 with a scale per token and head, so a decode
step at a long context reads a half or a quarter of float32's bytes.
"""
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F


def _cpu_has_vnni():
    try:  # without VNNI, fbgemm sums u8 x s8 pairs in int16, which saturates unless inputs use 7 bits
        with open("/proc/cpuinfo") as f:
            return any("vnni" in line for line in f if line.startswith("flags"))
    except OSError:
        return False


def _fbgemm_prepack(qweight, scale):
    """fbgemm's packed int8 weight, or None where torch has no fbgemm (ARM) or no longer has
    quantized tensors (deprecated in torch.ao; the kernel is still the fastest measured)."""
    if not any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm")):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            zero = torch.zeros_like(scale, dtype=torch.long)
            qw = torch._make_per_channel_quantized_tensor(qweight, scale.double(), zero, 0)
            return torch.ops.quantized.linear_prepack(qw, None)
    except (AttributeError, RuntimeError):
        return None


VNNI = _cpu_has_vnni()


class QLinear(nn.Module):
    """A bias-free nn.Linear with its weight stored in int8 (a float32 scale per output channel)
    or int4 (two per byte; a bf16 scale and offset per `group_size` inputs: w = (q - 8) s + z,
    tinygemm's convention). dequantize() is its float twin. On CPU it runs the fastest stock
    kernels measured (README, Performance): int8 through fbgemm's dynamic int8 x int8 kernel,
    which quantizes the activations on the fly (each row to its own range; `_weight_int8pack_mm`,
    weight-only, on CPUs without fbgemm), int4 through `_weight_int4pack_mm_for_cpu` with bf16
    activations. Elsewhere the float twin's matmul, which torch.compile fuses with the dequantization."""

    def __init__(self, n_out, n_in, bits=8, group_size=64):
        super().__init__()
        if bits not in (4, 8) or bits == 4 and n_in % group_size:
            raise ValueError(f"int{bits} with groups of {group_size} does not fit {n_in} inputs")
        self.n_out, self.n_in = n_out, n_in
        self.bits, self.group_size = bits, group_size
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(n_out, n_in, dtype=torch.int8))
            self.register_buffer("scale", torch.ones(n_out, 1))
        else:
            rows = -(-n_out // 16) * 16  # the int4 kernel wants rows % 16 == 0 (the LM head has 17727)
            self.register_buffer("qweight", torch.zeros(rows, n_in // 2, dtype=torch.uint8))
            self.register_buffer("scale", torch.ones(rows, n_in // group_size, dtype=torch.bfloat16))
            self.register_buffer("zero", torch.zeros(rows, n_in // group_size, dtype=torch.bfloat16))
        self._packed = None  # the CPU kernel's weight layout, made at the first CPU call

    @torch.no_grad()
    def quantize_(self, w):
        """Set the stored weight from a float (n_out, n_in) weight; round to nearest."""
        w = w.float()
        if self.bits == 8:
            s = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
            self.qweight.copy_(torch.round(w / s).clamp_(-127, 127))
            self.scale.copy_(s)
        else:
            w = F.pad(w, (0, 0, 0, self.qweight.shape[0] - w.shape[0])).unflatten(1, (-1, self.group_size))
            lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
            s = ((hi - lo).clamp_min(1e-12) / 15).bfloat16().float()  # q from the rounded s, z: least error
            z = (lo + 8 * s).bfloat16().float()
            q = torch.round((w - z) / s + 8).clamp_(0, 15).to(torch.uint8).flatten(1)  # (rows, n_in)
            self.qweight.copy_(q[:, 0::2] | q[:, 1::2] << 4)
            self.scale.copy_(s[..., 0])
            self.zero.copy_(z[..., 0])
        self._packed = None
        return self

    def _int4(self):
        """(rows, n_in) values 0..15."""
        return torch.stack([self.qweight & 15, self.qweight >> 4], -1).flatten(1)

    def dequantize(self):
        """The float32 (n_out, n_in) weight this layer multiplies by."""
        if self.bits == 8:
            return self.qweight.float() * self.scale
        q = self._int4().float().unflatten(1, (-1, self.group_size))
        w = (q - 8) * self.scale[..., None].float() + self.zero[..., None].float()
        return w.flatten(1)[:self.n_out]

    def forward(self, x):
        if x.device.type != "cpu":
            return F.linear(x, self.dequantize().to(x.dtype))
        x2 = x.reshape(-1, x.shape[-1]).float()  # (M, n_in)
        if self._packed is None:
            if self.bits == 4:
                sz = torch.stack([self.scale, self.zero], -1).transpose(0, 1)  # (groups, rows, 2)
                sz = sz.bfloat16().contiguous()
                self._packed = (torch.ops.aten._convert_weight_to_int4pack_for_cpu(self._int4().int(), 1), sz)
            else:
                packed = _fbgemm_prepack(self.qweight, self.scale[:, 0].float())
                self._packed = self.scale[:, 0].bfloat16() if packed is None else packed
        if self.bits == 4:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.bfloat16(), self._packed[0], self.group_size,
                                                           self._packed[1])[:, :self.n_out]
        elif torch.is_tensor(self._packed):  # no fbgemm: weight-only, bf16 activations
            y = torch.ops.aten._weight_int8pack_mm(x2.bfloat16(), self.qweight, self._packed)
        elif x2.shape[0] == 1:
            y = torch.ops.quantized.linear_dynamic(x2, self._packed, not VNNI)
        else:  # fbgemm quantizes the whole input to one range: scale the rows alike first
            r = x2.abs().amax(-1, keepdim=True).clamp_min_(1e-12)
            y = torch.ops.quantized.linear_dynamic(x2 / r, self._packed, not VNNI) * r
        return y.to(x.dtype).reshape(*x.shape[:-1], self.n_out)


QUANTIZED = ("mixed_qkv", "att_proj_linear", "ff_gate_proj", "ff_up_proj", "ff_down_proj")


def quantize(model, mode, group_size=64):
    """Replace the blocks' linears and the LM head by QLinear, in place; mode "int8" or "int4"
    ("none": unchanged). The embedding table (read one row per token) and the one-position
    emb/cls heads stay as they are. Returns the model (eval mode)."""
    if mode == "none":
        return model
    bits = {"int8": 8, "int4": 4}[mode]
    if getattr(model, "quantized", None):
        raise ValueError(f"the model is already quantized ({model.quantized['mode']})")
    layers = [(blk, name) for blk in model.model.encode_layers for name in QUANTIZED]
    layers += [(model, "lm_head")] if model.lm_head is not None else []
    for parent, name in layers:
        lin = getattr(parent, name)
        with torch.device(lin.weight.device):
            q = QLinear(lin.out_features, lin.in_features, bits, group_size)
        setattr(parent, name, q if lin.weight.is_meta else q.quantize_(lin.weight))
    model.quantized = {"mode": mode, "group_size": group_size}
    return model.eval()


# -----------------------------------------------------------------------------
# The KV cache


class CompactKVCache:
    """A KV cache stored in fewer bytes than the model computes in: bf16/fp16, or int8 with one
    float32 scale per token and head (each 64-value row to its own range: llama.cpp's q8_0 cache,
    vLLM's fp8 cache), a quarter of float32's bytes. A prefill attends over the dequantized
    prefix in float32; a decode step goes through attend_one, which reads the stored bytes once
    (dequantizing inside the dot products, compiled on CPU)."""
    compact = True

    def __init__(self, shape, dtype, device):
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.rows = torch.arange(shape[0], device=device)[:, None]  # (B, 1)
        self.int8 = dtype == torch.int8
        if self.int8:
            self.k_scale = torch.zeros(shape[:3], device=device)  # (B, H, L)
            self.v_scale = torch.zeros_like(self.k_scale)

    def bytes_per_slot(self) -> int:
        """Bytes one cached position takes (K and V with their scales, every row and head)."""
        rows = self.k[:, :, 0, 0].numel()  # B x H
        return 2 * rows * (self.k.shape[-1] * self.k.element_size() + (4 if self.int8 else 0))

    def _store(self, dst, scale, pos, x):
        """x (B, H, T, Dh) into dst at pos: an int s (every row at s..s+T-1: a slice copy) or a (B, T)
        tensor (index_put_ over (B, T) -> (B, T, H, Dh)). Both stay in place under torch.compile
        (scatter_ would copy the whole cache)."""
        if self.int8:
            s = x.float().abs().amax(-1).clamp_min(1e-12) / 127  # (B, H, T)
            x = torch.round(x.float() / s[..., None]).to(torch.int8)
        if isinstance(pos, int):
            dst[:, :, pos:pos + x.shape[2]] = x
            if self.int8:
                scale[:, :, pos:pos + x.shape[2]] = s
        else:
            dst[self.rows, :, pos] = x.transpose(1, 2).to(dst.dtype)
            if self.int8:
                scale[self.rows, :, pos] = s.transpose(1, 2)

    def update(self, pos, k, v, kv_len):
        """Write k, v (B, H, T, Dh) at pos; -> the first kv_len slots of each, dequantized to float32
        (a prefill: computing in float32 costs nothing there, and what is stored stays compact)."""
        self._store(self.k, getattr(self, "k_scale", None), pos, k)
        self._store(self.v, getattr(self, "v_scale", None), pos, v)
        if self.int8:
            return (self.k[:, :, :kv_len].float() * self.k_scale[:, :, :kv_len, None],
                    self.v[:, :, :kv_len].float() * self.v_scale[:, :, :kv_len, None])
        return self.k[:, :, :kv_len].float(), self.v[:, :, :kv_len].float()

    def attend_one(self, q, pos, k, v, kv_len, mask=None):
        """One query per row on a compact cache: write k, v (B, H, 1, Dh) at pos, then attention of
        q (B, H, 1, Dh) over the first kv_len slots (mask (B, 1, 1, kv_len) or None) -> (B, H, 1, Dh)
        float32, reading each stored byte once."""
        self._store(self.k, getattr(self, "k_scale", None), pos, k)
        self._store(self.v, getattr(self, "v_scale", None), pos, v)
        scales = (self.k_scale[:, :, :kv_len], self.v_scale[:, :, :kv_len]) if self.int8 else (None, None)
        return _attend_one(q.float(), self.k[:, :, :kv_len], self.v[:, :, :kv_len], *scales, mask)


def _attend_one_eager(q, k, v, k_scale, v_scale, mask):
    """softmax(q k^T / sqrt(Dh)) v for q (B, H, 1, Dh), dequantizing as it reads: per token and
    head scales multiply the scores (keys) and the probabilities (values), so the int8 values
    themselves are never scaled into a float copy. Float32 arithmetic throughout."""
    s = (k.float() * q).sum(-1) * q.shape[-1] ** -0.5  # (B, H, L)
    if k_scale is not None:
        s = s * k_scale
    if mask is not None:
        s = s.masked_fill(~mask[:, :, 0], float("-inf"))
    p = torch.softmax(s, -1)
    if v_scale is not None:
        p = p * v_scale
    return (p[..., None] * v.float()).sum(-2, keepdim=True)  # (B, H, 1, Dh)


_COMPILED = {}


def _attend_one(q, k, v, k_scale, v_scale, mask):
    """_attend_one_eager, compiled by inductor on CPU: its C++ loops read the compact cache once,
    where the eager ops write and read float copies. Eager elsewhere, with ARIA_KV_COMPILE=0, or
    when compiling fails (no C++ compiler: one warning, once)."""
    if q.device.type == "cpu" and os.environ.get("ARIA_KV_COMPILE", "1") != "0" and "off" not in _COMPILED:
        if "fn" not in _COMPILED:
            _COMPILED["fn"] = torch.compile(_attend_one_eager, dynamic=True)
        try:
            return _COMPILED["fn"](q, k, v, k_scale, v_scale, mask)
        except Exception as e:  # a missing compiler shows up only at the first call
            _COMPILED["off"] = True
            warnings.warn(f"compact KV cache: compiled attention unavailable ({type(e).__name__}); "
                          "decoding with eager ops (slower)")
    return _attend_one_eager(q, k, v, k_scale, v_scale, mask)
