"""The format registry and exact numpy reference rounding.

Every number format onnxfp8 can quantize to is a :class:`Format`: a frozen
description (bits, bias, range, special values, ONNX dtype) plus the exact
arithmetic the rest of the package and the tests rely on:

``round``
    float32 -> float32 values on the format's grid: round to nearest, ties to
    even, with subnormals, NaN kept, and either saturation to ``+-max`` or
    IEEE-like overflow (``inf`` if the format has infinities, NaN otherwise).
``encode`` / ``decode``
    grid values <-> the numpy array that stores them (ml_dtypes FP8 dtypes for
    formats ONNX knows, raw ``uint8`` bit codes for the emulated E3M4, ``int8``).
``quantize`` / ``dequantize`` / ``fake_quant``
    the numpy twins of ONNX ``QuantizeLinear`` / ``DequantizeLinear`` with a zero
    point of 0 (``x / scale`` and ``q * scale`` computed in float32, per tensor
    or per channel). ``tests/test_formats.py`` pins them bit for bit to
    onnxruntime.
``scale_for``
    ``amax / max`` that is always a usable scale.

The rounding is generic (it only uses the exponent/mantissa bits, the bias and
whether the format has infinities) and vectorised, and does *not* use ml_dtypes:
ml_dtypes is the test oracle.

How the rounding works: for ``a = |x|`` take the binary exponent
``E = floor(log2 a)`` from ``np.frexp``, clamp it below at the smallest normal
exponent ``1 - bias`` (that clamp is what makes subnormals come out right), and
round ``a`` to a multiple of ``2**(E - mantissa_bits)``::

    q = rint(ldexp(a, mantissa_bits - E))      # exact: scaling by a power of two
    y = ldexp(q, E - mantissa_bits)            # exact, or +inf on float32 overflow

``np.rint`` rounds half to even, and since ``q`` is an integer below
``2**(mantissa_bits + 1)`` "even" is the last mantissa bit: this is RNE on the
grid extended without an upper bound. A carry can move ``y`` into the next
binade and past ``max`` (e4m3: 480, 512; e5m2: 65536); everything above ``max``
is then saturated or turned into the overflow value. Because rounding is
monotone this equals rounding of the clipped input.

The two FP8 special-value layouts, derived from ``has_inf``:

* IEEE-like (``has_inf``, e5m2): exponent field all ones is reserved, mantissa 0
  is infinity, anything else NaN.
  ``max = (2 - 2**-M) * 2**(2**Eb - 2 - bias)``.
* "FN" (no infinity, e4m3 and the FP8 paper's e3m4): only exponent and mantissa
  all ones (``S.1111.111`` / ``S.111.1111``) is NaN, the rest of the top binade
  holds finite values. ``max = (2 - 2**(1 - M)) * 2**(2**Eb - 1 - bias)``.

E3M4 follows the FP8 paper (arXiv 2309.14592): bias 3, no infinity, max 30.
``ml_dtypes.float8_e3m4`` is a different (IEEE-style, max 15.5, NaN code 0x78)
format; both agree on ``|x| < 15.75``.

Pinned facts (tests/test_formats.py): ml_dtypes rounds 464 to 448 in E4M3FN (a
tie, and 448 has the even mantissa); only ``x > 464`` becomes NaN without
saturation. onnxruntime's CPU QuantizeLinear (opset 19/21) divides ``x / scale``
(not ``x * (1 / scale)``), rounds FP8 exactly like ``round`` here, and with
saturate=1 turns ``+-inf`` into ``+-max`` for E4M3FN *and* E5M2. For int8 it turns
NaN into -128 on x86 (implementation-defined; ``encode`` stores 0).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import ml_dtypes
import numpy as np
from onnx import TensorProto

__all__ = [
    "Format",
    "FORMATS",
    "E4M3",
    "E5M2",
    "E3M4",
    "INT8",
    "get_format",
    "format_names",
    "SCALE_MIN",
]

_F32 = np.float32

#: The smallest scale :meth:`Format.scale_for` returns: the smallest *normal*
#: float32, ``2**-126``. It is a normal number (no denormal slow paths, not flushed
#: by FTZ/DAZ), its reciprocal ``2**126`` is finite, and ``q * SCALE_MIN`` is a
#: finite (possibly subnormal) float32 for every code. ``x / SCALE_MIN`` can
#: overflow to ``inf`` for ``|x| >= 4``; that is harmless, as ``quantize``
#: saturates it to ``+-max`` just as QuantizeLinear does. Such a scale only arises
#: for ``amax < max * 2**-126``, i.e. for a tensor that is zero for all purposes.
SCALE_MIN = float(np.finfo(np.float32).tiny)


@dataclass(frozen=True)
class Format:
    """An 8-bit number format and its exact reference arithmetic.

    All results are float32 (``round``, ``decode``, ``dequantize``,
    ``fake_quant``, ``scale_for``) or the format's ``storage_dtype``
    (``encode``, ``quantize``). Inputs are cast to float32 first (``float64``
    inputs are therefore rounded twice: to float32, then to the format).
    """

    name: str
    kind: str  # "float" or "int"
    exponent_bits: int
    mantissa_bits: int
    bias: int
    max: float
    min_normal: float
    min_subnormal: float
    has_inf: bool
    nan: str
    onnx_dtype: Optional[int]
    storage_dtype: type
    description: str

    # ------------------------------------------------------------------ facts
    @property
    def emulated(self) -> bool:
        """True when ONNX has no dtype for the format (E3M4): Q/DQ must be emulated."""
        return self.onnx_dtype is None

    @property
    def is_float(self) -> bool:
        return self.kind == "float"

    @property
    def qmin(self) -> float:
        """Lower end of the QuantizeLinear saturation range: ``-max``, or -128 for int8."""
        return -128.0 if self.kind == "int" else -self.max

    @property
    def qmax(self) -> float:
        """Upper end of the QuantizeLinear saturation range (== ``max``)."""
        return self.max

    @property
    def has_nan(self) -> bool:
        return self.kind == "float"

    # --------------------------------------------------------------- rounding
    def round(self, x, saturate: bool = True) -> np.ndarray:
        """Round ``x`` (cast to float32) to the nearest value of the format, ties to even.

        Float formats: subnormals are produced, NaN stays NaN (with its sign),
        ``+-0`` keep their sign. With ``saturate=True`` every result beyond
        ``+-max`` (including ``+-inf``) becomes ``+-max``; with
        ``saturate=False`` it becomes ``+-inf`` for formats with infinities and
        NaN for the others (this is what a plain ml_dtypes ``astype`` does).

        int8: ``np.rint`` (half to even) and clip to ``[-128, 127]`` whatever
        ``saturate`` says; NaN stays NaN here (``encode`` stores it as 0).
        """
        x = np.asarray(x, dtype=_F32)
        if self.kind == "int":
            with np.errstate(invalid="ignore"):
                return np.asarray(np.clip(np.rint(x), _F32(-128.0), _F32(127.0)), dtype=_F32)
        m = self.mantissa_bits
        emin = 1 - self.bias
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            a = np.abs(x)
            _, e = np.frexp(a)  # a = f * 2**e, 0.5 <= f < 1 (e == 0 for 0, inf, NaN)
            exp = np.maximum(e - 1, np.int32(emin)).astype(np.int32)
            q = np.rint(np.ldexp(a, (m - exp).astype(np.int32)))
            y = np.ldexp(q, (exp - m).astype(np.int32))  # may overflow to inf: fine
            y = np.copysign(y, x)
            fmax = _F32(self.max)
            if saturate:
                y = np.clip(y, -fmax, fmax)
            else:
                over = np.abs(y) > fmax  # False for NaN
                if np.any(over):
                    special = _F32(np.inf) if self.has_inf else _F32(np.nan)
                    y = np.where(over, np.copysign(special, y), y)
        return np.asarray(y, dtype=_F32)

    # ------------------------------------------------------- storage / codes
    def encode(self, values) -> np.ndarray:
        """Store grid values (the output of :meth:`round`) in ``storage_dtype``.

        e4m3/e5m2: ml_dtypes arrays; e3m4: ``uint8`` codes ``S.EEE.MMMM`` (bias 3,
        NaN -> 0x7F / 0xFF by sign); int8: ``int8`` (NaN -> 0).
        Values that are not on the grid are rounded as by
        ``round(values, saturate=False)`` (int8: saturating), never wrapped.
        """
        v = np.asarray(values, dtype=_F32)
        if self.kind == "int":
            r = self.round(v)
            return np.where(np.isnan(r), _F32(0), r).astype(np.int8)
        if self.storage_dtype is np.uint8:
            return _encode_codes(self, self.round(v, saturate=False))
        with np.errstate(invalid="ignore", over="ignore"):
            return v.astype(self.storage_dtype)

    def decode(self, stored) -> np.ndarray:
        """``storage_dtype`` array -> float32 values.

        Float formats also accept raw ``uint8`` bit codes (and e3m4 always takes
        them); int8 takes any integer array holding values in ``[-128, 127]``.
        """
        s = np.asarray(stored)
        if self.kind == "int":
            return s.astype(_F32)
        if self.storage_dtype is not np.uint8 and s.dtype == self.storage_dtype:
            return s.astype(_F32)
        if s.dtype == np.uint8 or s.dtype == np.int8:
            codes = s.view(np.uint8)
        elif s.dtype.kind in "iu":
            if s.size and (s.min() < 0 or s.max() > 255):
                raise ValueError(f"{self.name} codes must lie in [0, 255]")
            codes = s.astype(np.uint8)
        else:
            raise TypeError(f"cannot decode a {s.dtype} array as {self.name} storage")
        return _code_table(self)[codes]

    def code_table(self) -> np.ndarray:
        """float32 value of each of the 256 codes (NaN where NaN).

        For int8 the index is the code as ``uint8``: ``table[0:128] = 0..127``,
        ``table[128:256] = -128..-1``.
        """
        return _code_table(self).copy()

    def finite_values(self) -> np.ndarray:
        """Sorted distinct finite values of the format (float32, ``-0`` dropped)."""
        t = _code_table(self)
        return np.unique(t[np.isfinite(t)] + _F32(0.0))

    # ----------------------------------------------------------- quantization
    def _scale(self, scale, ndim: int, shape, axis) -> np.ndarray:
        s = np.asarray(scale, dtype=_F32)
        if s.ndim == 0:
            return s
        if s.ndim != 1:
            raise ValueError(f"scale must be a scalar or 1-D, got shape {s.shape}")
        if axis is None:
            if s.size == 1:
                return s.reshape(())
            raise ValueError("a per-channel (1-D) scale needs an axis")
        if not -ndim <= axis < ndim:
            raise ValueError(f"axis {axis} out of range for a {ndim}-D tensor")
        axis = axis % ndim
        if shape[axis] != s.size:
            raise ValueError(
                f"scale has {s.size} entries but axis {axis} has length {shape[axis]}"
            )
        bshape = [1] * ndim
        bshape[axis] = s.size
        return s.reshape(bshape)

    def quantize(self, x, scale, axis: Optional[int] = None) -> np.ndarray:
        """QuantizeLinear with zero point 0 (saturating): ``encode(round(x / scale))``.

        ``x`` and ``scale`` are cast to float32 and divided in float32. ``scale``
        is a scalar or a 1-D per-channel scale applied along ``axis``.
        """
        x = np.asarray(x, dtype=_F32)
        s = self._scale(scale, x.ndim, x.shape, axis)
        with np.errstate(over="ignore", divide="ignore", invalid="ignore", under="ignore"):
            y = x / s
            if self.kind == "float" and self.storage_dtype is not np.uint8:
                # ml_dtypes' cast rounds to nearest even with subnormals; clipping first is saturation (a value
                # in (max, max + ulp/2) rounds to max either way; NaN and -0 pass through). 8x faster than
                # round() + encode() (frexp/ldexp): 4 s of a BERT-base quantize.
                fmax = _F32(self.max)
                return np.clip(y, -fmax, fmax).astype(self.storage_dtype)
        return self.encode(self.round(y, saturate=True))

    def dequantize(self, q, scale, axis: Optional[int] = None) -> np.ndarray:
        """DequantizeLinear with zero point 0: ``decode(q) * scale`` in float32."""
        v = self.decode(q)
        s = self._scale(scale, v.ndim, v.shape, axis)
        with np.errstate(over="ignore", invalid="ignore", under="ignore"):
            return np.asarray(v * s, dtype=_F32)

    def fake_quant(self, x, scale, axis: Optional[int] = None) -> np.ndarray:
        """``dequantize(quantize(x, scale, axis), scale, axis)``: Q->DQ in float32."""
        return self.dequantize(self.quantize(x, scale, axis), scale, axis)

    def scale_for(self, amax) -> np.ndarray:
        """Scale mapping ``amax`` onto ``max``: ``amax / max`` in float32.

        Always a positive, finite, normal float32:

        * amax that is 0, negative, NaN or +-inf -> 1.0 (nothing sensible to
          fit; 1.0 leaves values where they are);
        * amax so small that ``amax / max`` is 0 or a float32 denormal ->
          :data:`SCALE_MIN` (``2**-126``, the smallest normal float32);
        * amax beyond the float32 range (float64 input) -> treated as
          float32 max.
        """
        with np.errstate(over="ignore", invalid="ignore"):  # signalling NaNs warn on cast
            a64 = np.asarray(amax, dtype=np.float64)
            valid = np.isfinite(a64) & (a64 > 0)
            a32 = np.minimum(np.where(valid, a64, 1.0), float(np.finfo(_F32).max)).astype(_F32)
            s = a32 / _F32(self.max)
        s = np.where(valid, np.maximum(s, _F32(SCALE_MIN)), _F32(1.0))
        return np.asarray(s, dtype=_F32)

    def __str__(self) -> str:
        return self.name


# ---------------------------------------------------------------------------
# Code tables and bit-level encoding, generic over the float layouts.


def _float_code_values(fmt: Format) -> np.ndarray:
    """float32 value of every 8-bit code of a float format, from its bit layout."""
    eb, m, bias = fmt.exponent_bits, fmt.mantissa_bits, fmt.bias
    codes = np.arange(256, dtype=np.int32)
    sign = (codes >> (eb + m)) & 1
    field = (codes >> m) & ((1 << eb) - 1)
    mant = codes & ((1 << m) - 1)
    top = (1 << eb) - 1
    mag = np.where(
        field == 0,
        np.ldexp(mant.astype(np.float64), 1 - bias - m),
        np.ldexp(((1 << m) + mant).astype(np.float64), field - bias - m),
    )
    if fmt.has_inf:
        mag = np.where(field == top, np.where(mant == 0, np.inf, np.nan), mag)
    else:
        mag = np.where((field == top) & (mant == (1 << m) - 1), np.nan, mag)
    return np.where(sign == 1, -mag, mag).astype(_F32)


@functools.lru_cache(maxsize=None)
def _code_table(fmt: Format) -> np.ndarray:
    if fmt.kind == "int":
        t = np.arange(256, dtype=np.uint8).view(np.int8).astype(_F32)
    else:
        t = _float_code_values(fmt)
    t.setflags(write=False)
    return t


def _encode_codes(fmt: Format, y: np.ndarray) -> np.ndarray:
    """uint8 bit codes of float32 values already on ``fmt``'s grid (any float layout)."""
    eb, m, bias = fmt.exponent_bits, fmt.mantissa_bits, fmt.bias
    y = np.asarray(y, dtype=_F32)
    sign = np.signbit(y).astype(np.uint8) << np.uint8(eb + m)
    a = np.abs(y)
    nan = np.isnan(a)
    inf = np.isinf(a)
    finite = ~(nan | inf)
    a = np.where(finite, a, _F32(0))
    _, e = np.frexp(a)
    exp = (e - 1).astype(np.int32)
    normal = a >= _F32(fmt.min_normal)
    field = np.where(normal, exp + bias, 0)
    mant = np.where(
        normal,
        np.ldexp(a, (m - exp).astype(np.int32)) - _F32(1 << m),
        np.ldexp(a, np.int32(m + bias - 1)),
    )
    mag = (field.astype(np.int32) << m) | mant.astype(np.int32)
    top = (1 << eb) - 1
    if fmt.has_inf:
        nan_code, inf_code = (top << m) | (1 << (m - 1)), top << m
    else:
        nan_code, inf_code = (top << m) | ((1 << m) - 1), (top << m) | ((1 << m) - 1)
    mag = np.where(nan, nan_code, np.where(inf, inf_code, mag))
    return (mag.astype(np.uint8) | sign).astype(np.uint8)


# ---------------------------------------------------------------------------
# The registry.

E4M3 = Format(
    name="e4m3",
    kind="float",
    exponent_bits=4,
    mantissa_bits=3,
    bias=7,
    max=448.0,
    min_normal=2.0**-6,
    min_subnormal=2.0**-9,
    has_inf=False,
    nan="S.1111.111",
    onnx_dtype=TensorProto.FLOAT8E4M3FN,
    storage_dtype=ml_dtypes.float8_e4m3fn,
    description="OCP FP8 E4M3 (ONNX FLOAT8E4M3FN): no infinity, max 448",
)

E5M2 = Format(
    name="e5m2",
    kind="float",
    exponent_bits=5,
    mantissa_bits=2,
    bias=15,
    max=57344.0,
    min_normal=2.0**-14,
    min_subnormal=2.0**-16,
    has_inf=True,
    nan="S.11111.xx (xx != 00)",
    onnx_dtype=TensorProto.FLOAT8E5M2,
    storage_dtype=ml_dtypes.float8_e5m2,
    description="OCP FP8 E5M2 (ONNX FLOAT8E5M2): IEEE-like with infinities, max 57344",
)

E3M4 = Format(
    name="e3m4",
    kind="float",
    exponent_bits=3,
    mantissa_bits=4,
    bias=3,
    max=30.0,
    min_normal=2.0**-2,
    min_subnormal=2.0**-6,
    has_inf=False,
    nan="S.111.1111 (single)",
    onnx_dtype=None,
    storage_dtype=np.uint8,
    description="FP8 E3M4 of arXiv 2309.14592: no infinity, max 30; emulated (uint8 codes, no ONNX dtype)",
)

INT8 = Format(
    name="int8",
    kind="int",
    exponent_bits=0,
    mantissa_bits=7,
    bias=0,
    max=127.0,
    min_normal=1.0,
    min_subnormal=1.0,
    has_inf=False,
    nan="none",
    onnx_dtype=TensorProto.INT8,
    storage_dtype=np.int8,
    description="INT8 symmetric (zero point 0): scale = amax/127, saturates to [-128, 127], half to even",
)

FORMATS: dict[str, Format] = {f.name: f for f in (E4M3, E5M2, E3M4, INT8)}

_ALIASES = {
    "e4m3": "e4m3",
    "e4m3fn": "e4m3",
    "fp8_e4m3": "e4m3",
    "fp8_e4m3fn": "e4m3",
    "fp8e4m3": "e4m3",
    "float8e4m3fn": "e4m3",
    "float8_e4m3fn": "e4m3",
    "e5m2": "e5m2",
    "fp8_e5m2": "e5m2",
    "fp8e5m2": "e5m2",
    "float8e5m2": "e5m2",
    "float8_e5m2": "e5m2",
    "e3m4": "e3m4",
    "fp8_e3m4": "e3m4",
    "fp8e3m4": "e3m4",
    "float8e3m4": "e3m4",
    "int8": "int8",
}


def format_names() -> list[str]:
    """Canonical format names, in registry order."""
    return list(FORMATS)


def get_format(name) -> Format:
    """Look a format up by name or alias (case-insensitive). A Format is returned as is."""
    if isinstance(name, Format):
        return name
    key = name.strip().lower() if isinstance(name, str) else None
    if key not in _ALIASES:
        raise ValueError(f"unknown format '{name}'; choose one of {', '.join(FORMATS)}")
    return FORMATS[_ALIASES[key]]


# -- the model's own float types -------------------------------------------------------------------
def np_dtype(dtype) -> np.dtype:
    """numpy dtype of a numpy dtype-like or an ONNX element type (an int: ml_dtypes types for FP8 / BF16)."""
    if isinstance(dtype, (int, np.integer)) and not isinstance(dtype, bool):
        import onnx

        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(dtype)))
    return np.dtype(dtype)


def is_float_dtype(dtype) -> bool:
    """True for the types a model computes in: float16/32/64 and bfloat16 (ml_dtypes, numpy kind 'V', which
    ``kind == 'f'`` misses). False for integers, bool, strings, and FP8 data (already quantized)."""
    d = np_dtype(dtype)
    return d.kind == "f" or d == np.dtype(ml_dtypes.bfloat16)
