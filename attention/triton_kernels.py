"""Triton kernels of flash attention: forward, the Δ pre-pass, and the two backward kernels.

FlashAttention (Dao et al. 2022, "FlashAttention: Fast and Memory-Efficient Exact Attention with
IO-Awareness"; Dao 2023, "FlashAttention-2") computes ``softmax(q kᵀ · scale) v`` exactly
without ever storing the ``(i, j)`` score matrix:

* **Tiling.** One program owns a block of ``BLOCK_M`` query rows of one (batch, head). It walks
  over the keys ``BLOCK_N`` at a time; each step loads one key/value tile, forms the
  ``(BLOCK_M, BLOCK_N)`` scores in fast on-chip memory and throws them away after use.
* **Online softmax** (Milakov & Gimelshein 2018). Per row we keep the running max ``m`` and the
  running sum ``l = Σ exp(s - m)``, and an unnormalised output ``acc = Σ exp(s - m) v``. When a
  new tile raises the max to ``m'``, everything seen so far is rescaled by ``exp(m - m')``; at
  the end ``out = acc / l``. All of this is fp32, whatever the input dtype.
* **Log-sum-exp.** The forward stores one number per row, ``L = m + log l`` (the log of the
  softmax denominator). The backward needs the weights ``P = exp(s - L)`` again; recomputing
  them from ``q``, ``k`` and ``L`` costs one more matmul but keeps memory O(L) instead of O(L²),
  and on a GPU recomputation is cheaper than reading a stored ``P`` back from HBM.
* **Backward** (FlashAttention-2, Algorithm 2). With ``dP = dO vᵀ`` and
  ``Δ = rowsum(dO ∘ O)`` (= ``rowsum(P ∘ dP)``), the softmax gradient is
  ``dS = P ∘ (dP - Δ)``; then ``dV = Pᵀ dO``, ``dK = scale · dSᵀ q`` and
  ``dQ = scale · dS k``.
  ``dK``/``dV`` are sums over query rows, ``dQ`` a sum over key columns, so we use two kernels:
  one program per key block for ``dK, dV`` (looping over query blocks, and over the query heads
  that share the key/value head) and one per query block for ``dQ``. No atomics, so the result
  is deterministic.

Conventions shared by all kernels: tensors are ``(b, heads, length, d)`` addressed by explicit
strides; the head dim is padded to ``BLOCK_D`` (a power of two) with masked loads; query head
``h`` reads key/value head ``h // GROUP`` (grouped-query attention); ``CAUSAL`` lets query ``i``
see key ``j <= i + LK - LQ``; ``HAS_MASK`` reads a ``(b, LK)`` int8 key mask (1 = may attend).
A row that sees no key gets ``out = 0`` and ``L = +inf``, so its recomputed ``P`` is 0 and its
gradients are 0, never NaN. ``UPCAST`` converts matmul operands to fp32 before ``tl.dot``; the
adapter sets it when running in Triton's CPU interpreter, whose ``tl.dot`` is wrong for bf16.
``IEEE`` (set for fp32 inputs) asks for true fp32 matmuls; ``tl.dot``'s default on a GPU is TF32
(10-bit mantissa), which PyTorch's own fp32 matmuls do not use by default.
"""
import triton
import triton.language as tl


@triton.jit
def _mm(a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """``a @ b`` accumulated in fp32 (see ``UPCAST`` and ``IEEE`` in the module docstring)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _visible(offs_m, offs_n, b, KeyMask, stride_mb, stride_mn, LQ, LK,
             HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr):
    """``(BLOCK_M, BLOCK_N)`` booleans: may query ``offs_m`` attend to key ``offs_n``?"""
    ok = (offs_m[:, None] < LQ) & (offs_n[None, :] < LK)
    if HAS_MASK:
        km = tl.load(KeyMask + b * stride_mb + offs_n * stride_mn, mask=offs_n < LK, other=0)
        ok = ok & (km[None, :] != 0)
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None] + (LK - LQ))
    return ok


@triton.jit
def flash_fwd_kernel(
    Q, K, V, KeyMask, O, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mn,
    H, GROUP, LQ, LK, D, scale,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid ``(cdiv(LQ, BLOCK_M), b·h)``. Writes O ``(b, h, LQ, D)``, LSE ``(b·h, LQ)`` fp32."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < LQ
    d_ok = offs_d < D

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    hi = LK
    if CAUSAL:  # keys after the last row's diagonal are invisible to the whole block
        hi = tl.minimum(LK, start_m + BLOCK_M + LK - LQ)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < LK) & d_ok[None, :]
        k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn
                    + offs_d[None, :] * stride_kd, mask=kv_ok, other=0.0)
        s = _mm(q, tl.trans(k), UPCAST, IEEE) * scale  # (BLOCK_M, BLOCK_N) fp32
        ok = _visible(offs_m, offs_n, b, KeyMask, stride_mb, stride_mn, LQ, LK, HAS_MASK, CAUSAL)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # While a row has seen only masked keys m_new is -inf, and s - m_new would be NaN;
        # subtracting 0 instead gives exp(-inf) = 0, which is the right contribution.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn
                    + offs_d[None, :] * stride_vd, mask=kv_ok, other=0.0)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, UPCAST, IEEE)
        m_i = m_new

    empty = l_i == 0.0  # rows that may attend to nothing: output 0, L = +inf (P = 0 later)
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om
             + offs_d[None, :] * stride_od, out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh * LQ + offs_m, lse, mask=row_ok)


@triton.jit
def flash_bwd_delta_kernel(
    O, DO, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    H, LQ, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid ``(cdiv(LQ, BLOCK_M), b·h)``. Δ ``(b·h, LQ)`` fp32 = rowsum(O ∘ dO)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < LQ) & (offs_d[None, :] < D)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om
                + offs_d[None, :] * stride_od, mask=ok, other=0.0)
    do = tl.load(DO + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gm
                 + offs_d[None, :] * stride_gd, mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + bh * LQ + offs_m, delta, mask=offs_m < LQ)


@triton.jit
def flash_bwd_dkdv_kernel(
    Q, K, V, KeyMask, DO, LSE, Delta, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_mb, stride_mn,
    H, HK, GROUP, LQ, LK, D, scale,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid ``(cdiv(LK, BLOCK_N), b·hk)``. Writes contiguous dK, dV ``(b, hk, LK, D)``.

    A key/value head serves ``GROUP`` query heads, so its gradient sums over all of them.
    """
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    b = bhk // HK
    hk = bhk % HK
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_ok = (offs_n[:, None] < LK) & d_ok[None, :]
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn
                + offs_d[None, :] * stride_kd, mask=kv_ok, other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn
                + offs_d[None, :] * stride_vd, mask=kv_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    lo = 0
    if CAUSAL:  # query i first sees key start_n when i = start_n - (LK - LQ)
        lo = (tl.maximum(start_n - (LK - LQ), 0) // BLOCK_M) * BLOCK_M
    for g in range(0, GROUP):
        h = hk * GROUP + g
        for start_m in range(lo, LQ, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < LQ
            qo_ok = row_ok[:, None] & d_ok[None, :]
            q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
                        + offs_d[None, :] * stride_qd, mask=qo_ok, other=0.0)
            do = tl.load(DO + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gm
                         + offs_d[None, :] * stride_gd, mask=qo_ok, other=0.0)
            lse = tl.load(LSE + (b * H + h) * LQ + offs_m, mask=row_ok, other=float("inf"))
            delta = tl.load(Delta + (b * H + h) * LQ + offs_m, mask=row_ok, other=0.0)
            s = _mm(q, tl.trans(k), UPCAST, IEEE) * scale
            ok = _visible(offs_m, offs_n, b, KeyMask, stride_mb, stride_mn, LQ, LK,
                          HAS_MASK, CAUSAL)
            p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)  # the forward's weights, recomputed
            dv += _mm(tl.trans(p.to(do.dtype)), do, UPCAST, IEEE)
            dp = _mm(do, tl.trans(v), UPCAST, IEEE)
            ds = p * (dp - delta[:, None])
            dk += _mm(tl.trans(ds.to(q.dtype)), q, UPCAST, IEEE)

    dk = dk * scale
    out_off = (b * HK + hk) * LK * D + offs_n[:, None] * D + offs_d[None, :]
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def flash_bwd_dq_kernel(
    Q, K, V, KeyMask, DO, LSE, Delta, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_mb, stride_mn,
    H, GROUP, LQ, LK, D, scale,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid ``(cdiv(LQ, BLOCK_M), b·h)``. Writes contiguous dQ ``(b, h, LQ, D)``."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < LQ
    d_ok = offs_d < D
    qo_ok = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=qo_ok, other=0.0)
    do = tl.load(DO + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gm
                 + offs_d[None, :] * stride_gd, mask=qo_ok, other=0.0)
    lse = tl.load(LSE + bh * LQ + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + bh * LQ + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    hi = LK
    if CAUSAL:
        hi = tl.minimum(LK, start_m + BLOCK_M + LK - LQ)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < LK) & d_ok[None, :]
        k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn
                    + offs_d[None, :] * stride_kd, mask=kv_ok, other=0.0)
        v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn
                    + offs_d[None, :] * stride_vd, mask=kv_ok, other=0.0)
        s = _mm(q, tl.trans(k), UPCAST, IEEE) * scale
        ok = _visible(offs_m, offs_n, b, KeyMask, stride_mb, stride_mn, LQ, LK, HAS_MASK, CAUSAL)
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        dp = _mm(do, tl.trans(v), UPCAST, IEEE)
        ds = p * (dp - delta[:, None])
        dq += _mm(ds.to(k.dtype), k, UPCAST, IEEE)

    dq = dq * scale
    tl.store(DQ + bh * LQ * D + offs_m[:, None] * D + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=qo_ok)
