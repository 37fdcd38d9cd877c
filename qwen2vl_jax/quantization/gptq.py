"""Qwen's published GPTQ and AWQ Linears (`Qwen/Qwen2-VL-*-Instruct-GPTQ-Int4 / -Int8`, `-AWQ`), dequantized.

Pure NumPy: each function takes the stored tensors of one Linear and returns its weight `[O, I]` (PyTorch layout)
in fp32, which is exact: `(q - zero) * scale` with |q - zero| <= 255 (8 bits) and an fp16 scale (11 significant bits)
has at most 19 significant bits, so it fits fp32's 24 with no rounding. (The reference kernels compute the same
product in fp16, i.e. they round it once more; our fp32 weight cast to fp16 equals theirs bit for bit.)

GPTQ (`quant_method: gptq`, AutoGPTQ's / GPTQModel's `QuantLinear`; bits 2 / 4 / 8):

* `qweight` int32 `[I * bits / 32, O]`: 32 / bits input rows a word, row `r * (32 / bits) + j` in bits
  `[j * bits, (j + 1) * bits)` (first row in the low bits);
* `qzeros`  int32 `[G, O * bits / 32]`: the same packing along the output axis;
* `scales`  fp16  `[G, O]`;
* `g_idx`   int32 `[I]`: input column i belongs to group `g_idx[i]` (`i // group_size` unless the checkpoint was
  quantized with `desc_act`, "act-order"; it is always honoured here);
* weight `[o, i] = scales[g, o] * (q[i, o] - zero[g, o])`, `g = g_idx[i]`.

The zero point on disk: `checkpoint_format` "gptq" (v1, every AutoGPTQ checkpoint, Qwen's included) stores
`zero - 1`, so `zero = (stored + 1) & (2**bits - 1)` field by field (AutoGPTQ's reader; a symmetric checkpoint's
zero is `2**(bits - 1)`: stored 7 / 127); "gptq_v2" (GPTQModel's own) stores the zero itself. (GPTQModel converts v1
by adding 1 to the packed int32 word, which differs from the field-wise rule only where a stored field is all ones,
i.e. a zero of 0 -- which v1 cannot represent in the first place.)

AWQ (`quant_method: awq`, `version: gemm`, AutoAWQ's `WQLinear_GEMM`; 4 bits, `zero_point: true`):

* `qweight` int32 `[I, O / 8]`, `qzeros` int32 `[G, O / 8]`: eight outputs a word along the output axis, in AWQ's
  interleaved order: field k (bits `[4k, 4k + 4)`) of word c holds output `8c + AWQ_ORDER[k]`;
* `scales` fp16 `[G, O]`; groups are contiguous (`i // group_size`);
* weight `[o, i] = scales[g, o] * (q[i, o] - zero[g, o])`, `g = i // group_size` (AutoAWQ's `dequantize_gemm`).

Our own formats (`formats.py`) are symmetric, without zero points: int8 one scale per output channel, int4 in groups
with signed nibbles in [-8, 7]. Only one external case maps onto them without loss: a symmetric 4-bit GPTQ Linear
(zero 8 everywhere) with contiguous groups (`g_idx == i // group_size`), i.e. Qwen's GPTQ-Int4 -- `q - 8` is the
signed nibble and the fp16 scale is exact in fp32 (`gptq_to_int4`). GPTQ-Int8 has one scale per group of 128, not per
channel, and AWQ has zero points (q - zero spans [-15, 15]): neither is representable; they load exactly only as fp32
weights (`dequantize_*`), or approximately by quantizing those again (`formats.quantize_weight`).

Loading (`checkpoints/load.py` `external_model`) reads each quantized Linear's tensors together, per
`ExternalQuantization` (config.json's entry): `to_int4` where `exact_int4` (Qwen's GPTQ-Int4), else `dequantize`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .formats import QuantizationError

GPTQ_BITS = (2, 4, 8)
AWQ_BITS = (4,)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # field k of a word holds output 8c + AWQ_ORDER[k]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # output 8c + j is field AWQ_REVERSE_ORDER[j]
GPTQ_FORMATS = ("gptq", "gptq_v2")

GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx")  # beside an optional fp16 `bias`
AWQ_TENSORS = ("qweight", "qzeros", "scales")


# ----------------------------------------------------------------------------------------------- config.json
@dataclass(frozen=True)
class ExternalQuantization:
    """config.json's `quantization_config` of a GPTQ or AWQ checkpoint, checked against what this module reads.
    `skip`: module-name prefixes left in full precision (AWQ's `modules_to_not_convert`, e.g. `["visual"]`; AutoGPTQ
    writes none, and quantizes only the decoder layers' Linears)."""

    method: str  # "gptq" | "awq"
    bits: int
    group_size: int  # -1: one group (the whole input width)
    sym: bool
    desc_act: bool
    checkpoint_format: str  # "gptq" | "gptq_v2" (GPTQ), "gemm" (AWQ)
    skip: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, raw) -> ExternalQuantization:
        if not isinstance(raw, dict):
            raise QuantizationError(f"quantization_config must be an object, got {type(raw).__name__}")
        method = raw.get("quant_method")
        bits = raw.get("bits", raw.get("w_bit"))
        group = raw.get("group_size", raw.get("q_group_size"))
        if not isinstance(group, int) or isinstance(group, bool) or (group < 1 and group != -1):
            raise QuantizationError(f"quantization_config: group_size must be a positive integer or -1, got {group!r}")
        if method == "gptq":
            if bits not in GPTQ_BITS:
                raise QuantizationError(f"quantization_config: GPTQ bits {bits!r} is not one of {GPTQ_BITS}")
            fmt = raw.get("checkpoint_format", "gptq")
            if fmt not in GPTQ_FORMATS:
                raise QuantizationError(f"quantization_config: GPTQ checkpoint_format {fmt!r} is not one of "
                                        f"{GPTQ_FORMATS} (marlin / bitblas repackings are not read)")
            if raw.get("is_marlin_format"):  # AutoGPTQ <= 0.7's flag for its Marlin repacking
                raise QuantizationError("quantization_config: GPTQ is_marlin_format true (a Marlin repacking) is "
                                        "not read")
            return cls("gptq", bits, group, bool(raw.get("sym", True)), bool(raw.get("desc_act", False)), fmt,
                       tuple(raw.get("modules_to_not_convert") or ()))
        if method == "awq":
            if bits not in AWQ_BITS:
                raise QuantizationError(f"quantization_config: AWQ bits {bits!r} is not one of {AWQ_BITS}")
            version = str(raw.get("version", "gemm")).lower()
            if version != "gemm":
                raise QuantizationError(f"quantization_config: AWQ version {version!r} is not 'gemm' (GEMV / Marlin "
                                        "/ exllama packings are not read)")
            if raw.get("zero_point", True) is not True:
                raise QuantizationError("quantization_config: AWQ without zero points is not read")
            return cls("awq", bits, group, False, False, "gemm", tuple(raw.get("modules_to_not_convert") or ()))
        raise QuantizationError(f"quantization_config: quant_method {method!r} is neither 'gptq' nor 'awq'")

    def group(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def tensor_shapes(self, in_features: int, out_features: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """`{suffix: (shape, dtype)}` of one quantized Linear's stored tensors (bias, if any, aside)."""
        return packed_shapes(self.method, self.bits, in_features, out_features, self.group(in_features))

    @property
    def tensors(self) -> tuple[str, ...]:
        """The stored tensors' name suffixes (GPTQ's `g_idx` may be absent: contiguous groups)."""
        return GPTQ_TENSORS if self.method == "gptq" else AWQ_TENSORS

    def features(self, qweight_shape: tuple[int, ...]) -> tuple[int, int]:
        """`(in_features, out_features)` of the Linear whose `qweight` has this shape (GPTQ packs the input axis,
        AWQ the output axis)."""
        rows, cols = qweight_shape
        per_word = 32 // self.bits
        return (rows * per_word, cols) if self.method == "gptq" else (rows, cols * per_word)

    @property
    def exact_int4(self) -> bool:
        """Whether every Linear maps onto our int4 format losslessly (`gptq_to_int4`): symmetric 4-bit GPTQ without
        act-order, in contiguous groups of an even positive width (Qwen's GPTQ-Int4)."""
        return (self.method == "gptq" and self.bits == 4 and self.sym and not self.desc_act and self.group_size > 0
                and self.group_size % 2 == 0)

    def describe(self) -> str:
        """`GPTQ 4-bit (sym, groups of 128)`, for messages."""
        groups = "one group per row" if self.group_size == -1 else f"groups of {self.group_size}"
        flags = ("sym" if self.sym else "asym") + (", desc_act" if self.desc_act else "") if self.method == "gptq" \
            else "zero points"
        return f"{self.method.upper()} {self.bits}-bit ({flags}, {groups})"

    def dequantize(self, stored: dict[str, np.ndarray]) -> np.ndarray:
        """One Linear's exact fp32 weight `[O, I]` from its stored tensors (`{suffix: array}`)."""
        if self.method == "gptq":
            return dequantize_gptq(stored["qweight"], stored["qzeros"], stored["scales"], stored.get("g_idx"),
                                   bits=self.bits, checkpoint_format=self.checkpoint_format,
                                   group_size=self.group(self.features(stored["qweight"].shape)[0]))
        return dequantize_awq(stored["qweight"], stored["qzeros"], stored["scales"], group_size=self.group_size,
                              bits=self.bits)

    def to_int4(self, stored: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """One Linear in our int4 format, losslessly (`exact_int4` checkpoints): `(packed [O, I/2] uint8, scale
        [O, I/group] fp32)`. A Linear that contradicts the config (zero points other than 8 under `sym`, act-order
        groups without `desc_act`) raises `QuantizationError` naming the field."""
        if not self.exact_int4:
            raise QuantizationError(f"{self.describe()} has no exact int4 form")
        # the two facts the config vouches for, checked on the (small) zero points and group indices first
        if not np.all(unpack_gptq_zeros(stored["qzeros"], 4, self.checkpoint_format) == 8):
            raise QuantizationError("qzeros hold zero points other than 8, although quantization_config says "
                                    "sym: true")
        g_idx = stored.get("g_idx")
        if g_idx is not None and not np.array_equal(g_idx, np.arange(g_idx.size) // self.group_size):
            raise QuantizationError(f"g_idx is not i // {self.group_size} (act-order groups), although "
                                    "quantization_config says desc_act: false")
        packed, scale, _ = gptq_to_int4(stored["qweight"], stored["qzeros"], stored["scales"], g_idx, bits=4,
                                        checkpoint_format=self.checkpoint_format, group_size=self.group_size)
        return packed, scale


def packed_shapes(method: str, bits: int, in_features: int, out_features: int, group_size: int
                  ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The stored tensors of one `[O, I]` Linear: `{name suffix: (shape, dtype)}` (what a header check expects)."""
    I, O = in_features, out_features
    per_word = 32 // bits
    if I % group_size:
        raise QuantizationError(f"{method}: input width {I} is not a multiple of the group size {group_size}")
    G = I // group_size
    i32, f16 = np.dtype(np.int32), np.dtype(np.float16)
    if method == "gptq":
        if I % 32 or O % per_word:
            raise QuantizationError(f"gptq: a {O}x{I} Linear does not pack into 32-bit words at {bits} bits")
        return {"qweight": ((I // per_word, O), i32), "qzeros": ((G, O // per_word), i32), "scales": ((G, O), f16),
                "g_idx": ((I,), i32)}
    if method == "awq":
        if O % per_word:
            raise QuantizationError(f"awq: output width {O} is not a multiple of {per_word}")
        return {"qweight": ((I, O // per_word), i32), "qzeros": ((G, O // per_word), i32), "scales": ((G, O), f16)}
    raise QuantizationError(f"unknown method {method!r}")


# --------------------------------------------------------------------------------------------- unpacking
def _fields(words: np.ndarray, bits: int) -> np.ndarray:
    """`[..., 32 / bits]` unsigned fields of int32 words, the lowest bits first."""
    if words.dtype != np.int32:
        raise QuantizationError(f"packed tensors are int32, got {words.dtype}")
    shifts = np.arange(0, 32, bits, dtype=np.uint32)
    return ((words.view(np.uint32)[..., None] >> shifts) & np.uint32((1 << bits) - 1)).astype(np.uint8)


def unpack_gptq_weight(qweight: np.ndarray, bits: int) -> np.ndarray:
    """`qweight [I * bits / 32, O]` -> the unsigned integers `q [I, O]` (uint8)."""
    _check_bits(bits, GPTQ_BITS, "gptq")
    f = _fields(np.asarray(qweight), bits)  # [R, O, per_word]
    return np.swapaxes(f, 1, 2).reshape(-1, f.shape[1])


def unpack_gptq_zeros(qzeros: np.ndarray, bits: int, checkpoint_format: str = "gptq") -> np.ndarray:
    """`qzeros [G, O * bits / 32]` -> the zero points `[G, O]` (uint8), v1's `stored + 1` applied field by field."""
    _check_bits(bits, GPTQ_BITS, "gptq")
    if checkpoint_format not in GPTQ_FORMATS:
        raise QuantizationError(f"unknown GPTQ checkpoint_format {checkpoint_format!r}; expected one of {GPTQ_FORMATS}")
    f = _fields(np.asarray(qzeros), bits)
    z = f.reshape(f.shape[0], -1)
    if checkpoint_format == "gptq":
        z = ((z.astype(np.uint16) + 1) & ((1 << bits) - 1)).astype(np.uint8)
    return z


def unpack_awq(packed: np.ndarray, bits: int = 4) -> np.ndarray:
    """AWQ's `qweight [I, O / 8]` or `qzeros [G, O / 8]` -> `[rows, O]` (uint8) in output order."""
    _check_bits(bits, AWQ_BITS, "awq")
    f = _fields(np.asarray(packed), bits)[..., list(AWQ_REVERSE_ORDER)]
    return f.reshape(f.shape[0], -1)


def _check_bits(bits: int, allowed: tuple[int, ...], method: str) -> None:
    if bits not in allowed:
        raise QuantizationError(f"{method}: {bits} bits is not one of {allowed}")


def _group_index(g_idx, in_features: int, groups: int, group_size: int | None) -> np.ndarray:
    if g_idx is None:
        if group_size is None:
            group_size = in_features // groups
        g_idx = np.arange(in_features) // group_size
    g_idx = np.asarray(g_idx)
    if g_idx.shape != (in_features,):
        raise QuantizationError(f"g_idx has shape {g_idx.shape}, expected ({in_features},)")
    if g_idx.size and (g_idx.min() < 0 or g_idx.max() >= groups):
        raise QuantizationError(f"g_idx holds groups outside [0, {groups})")
    return g_idx.astype(np.intp)


# ------------------------------------------------------------------------------------------- dequantization
def dequantize_gptq(qweight, qzeros, scales, g_idx=None, *, bits: int, checkpoint_format: str = "gptq",
                    group_size: int | None = None) -> np.ndarray:
    """A GPTQ Linear's exact fp32 weight `[O, I]` (`g_idx` None: contiguous groups of `group_size`, by default
    I / G)."""
    q = unpack_gptq_weight(qweight, bits)  # [I, O]
    z = unpack_gptq_zeros(qzeros, bits, checkpoint_format)  # [G, O]
    scales = np.asarray(scales)
    I, O = q.shape
    if z.shape != scales.shape or scales.shape[1] != O:
        raise QuantizationError(f"gptq: qweight unpacks to {q.shape}, qzeros to {z.shape}, scales are {scales.shape}")
    g = _group_index(g_idx, I, scales.shape[0], group_size)
    w = (q.astype(np.int16) - z[g].astype(np.int16)).astype(np.float32) * scales[g].astype(np.float32)  # [I, O]
    return np.ascontiguousarray(w.T)


def dequantize_awq(qweight, qzeros, scales, *, group_size: int, bits: int = 4) -> np.ndarray:
    """An AWQ (GEMM) Linear's exact fp32 weight `[O, I]` (`group_size` -1: one group)."""
    q = unpack_awq(qweight, bits)  # [I, O]
    z = unpack_awq(qzeros, bits)  # [G, O]
    scales = np.asarray(scales)
    I, O = q.shape
    if z.shape != scales.shape or scales.shape[1] != O:
        raise QuantizationError(f"awq: qweight unpacks to {q.shape}, qzeros to {z.shape}, scales are {scales.shape}")
    group = I if group_size == -1 else group_size
    if I % group or I // group != scales.shape[0]:
        raise QuantizationError(f"awq: {scales.shape[0]} groups do not cover {I} inputs in groups of {group}")
    g = np.arange(I) // group
    w = (q.astype(np.int16) - z[g].astype(np.int16)).astype(np.float32) * scales[g].astype(np.float32)
    return np.ascontiguousarray(w.T)


# --------------------------------------------------------------------------------- into our own int4 format
def gptq_to_int4(qweight, qzeros, scales, g_idx=None, *, bits: int = 4, checkpoint_format: str = "gptq",
                 group_size: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """A symmetric 4-bit GPTQ Linear with contiguous groups in our int4 format, losslessly: `(packed [O, I/2]
    uint8 (low nibble first), scale [O, G] fp32, group)`, whose `formats.dequantize` is `dequantize_gptq`'s weight
    exactly. `group_size`: the config's (checked against the tensors; None: I / G). Raises `QuantizationError` for
    anything that has no exact int4 form (other bits, zero points other than 8, act-order groups)."""
    if bits != 4:
        raise QuantizationError(f"gptq: only 4-bit GPTQ maps onto int4 ({bits}-bit has no exact int4 form)")
    q = unpack_gptq_weight(qweight, 4)  # [I, O]
    z = unpack_gptq_zeros(qzeros, 4, checkpoint_format)  # [G, O]
    scales = np.asarray(scales)
    I, O = q.shape
    G = scales.shape[0]
    if z.shape != (G, O) or scales.shape != (G, O) or I % G:
        raise QuantizationError(f"gptq: qweight unpacks to {q.shape}, qzeros to {z.shape}, scales are {scales.shape}")
    group = I // G
    if group_size is not None and group_size != group:
        raise QuantizationError(f"gptq: {G} groups of {I} inputs are not groups of {group_size}")
    if group % 2:
        raise QuantizationError(f"gptq: int4 groups need an even width, got {group}")
    if not np.all(z == 8):
        raise QuantizationError("gptq: asymmetric zero points (not all 8) have no exact int4 form")
    if g_idx is not None and not np.array_equal(np.asarray(g_idx), np.arange(I) // group):
        raise QuantizationError("gptq: act-order groups (g_idx != i // group_size) have no exact int4 form")
    signed = (q.T.astype(np.int16) - 8).astype(np.uint8) & 0xF  # [O, I], two's-complement nibbles
    packed = signed[:, 0::2] | (signed[:, 1::2] << 4)
    return np.ascontiguousarray(packed.astype(np.uint8)), np.ascontiguousarray(scales.T.astype(np.float32)), group
