"""What the two remaining leads for a faster training step are worth, measured in isolation:

1. **The head products in another precision.** A cached step makes four products with the
   ``[V, d]`` head at its counted positions (student and teacher logits, ``∂L/∂h``, ``∂L/∂W``);
   kdbench makes them in float32 (kdbench/losses.py ``_logits``: CSD's residuals need more than
   bf16's three digits). Arms: float32 as kdbench does; bf16 operands and output, as the baseline
   loop (benchmarks/landed_loop.py) and TRL do under autocast (the casts of the float32 weight
   counted); bf16 operands with float32 output through oneDNN's ``fp32_precision = "bf16"``; and
   "bf16x3" (hi/lo splits, three products, float32 output), which would keep float32-class
   accuracy. Each arm's largest error against float64 is printed beside its time.
2. **Attention over a packed row.** transformers masks a packed row's attention with a
   block-diagonal causal mask over the whole ``L × L`` square; the alternative scatters the
   sequences into a right-padded ``[B, H, T, D]`` batch, runs causal attention without a mask,
   and gathers back. Forward + backward of one layer's attention (9 heads of 64, 3 KV heads,
   bf16 where native), 8 sequences of micro-like lengths.

Run alone: ``.venv/bin/python benchmarks/probe_step_leads.py`` (results: docs/performance.md,
"What the two remaining leads are worth").
"""

from __future__ import annotations

import random
import time

from common import machine  # noqa: F401  (sets sys.path, preloads the allocator)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kdbench.device import cpu_has_native_bf16  # noqa: E402


def ms(fn, repeats: int = 10) -> float:
    for _ in range(2):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1e3


def onednn_bf16(fn):
    """Run ``fn`` with float32 matmuls computed by oneDNN from bf16 operands (float32 output)."""
    mk = torch.backends.mkldnn.matmul
    before = mk.fp32_precision
    mk.fp32_precision = "bf16"
    try:
        return fn()
    finally:
        mk.fp32_precision = before


def split(x):
    hi = x.bfloat16()
    return hi.float(), (x - hi.float()).bfloat16().float()


def x3(a, b):
    """``a @ b`` from bf16 hi/lo parts: hi·hi + hi·lo + lo·hi, float32 output."""
    (ah, al), (bh, bl) = split(a), split(b)
    return onednn_bf16(lambda: ah @ bh + (ah @ bl + al @ bh))


def head_products(n: int = 152, d: int = 576, vocab: int = 49152) -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(vocab, d, generator=g) * 0.05
    grad = torch.randn(n, vocab, generator=g) * 1e-4
    h_t, w_t = torch.randn(n, d, generator=g).bfloat16(), w.bfloat16()  # the teacher side: bf16 already

    def fp32():
        F.linear(h, w), F.linear(h_t.float(), w_t.float()), grad @ w, torch.zeros(vocab, d).addmm_(grad.t(), h)

    def bf16():
        wb = w.bfloat16()
        F.linear(h.bfloat16(), wb), F.linear(h_t, w_t), grad.bfloat16() @ wb
        torch.zeros(vocab, d).add_(grad.t().bfloat16() @ h.bfloat16())

    def fp32_out():
        onednn_bf16(lambda: (F.linear(h, w), F.linear(h_t.float(), w_t.float()), grad @ w,
                             torch.zeros(vocab, d).addmm_(grad.t(), h)))

    def bf16x3():
        x3(h, w.t()), onednn_bf16(lambda: h_t.float() @ w_t.float().t()), x3(grad, w)
        torch.zeros(vocab, d).add_(x3(grad.t(), h))

    exact = h.double() @ w.double().t()
    errors = {"float32 (kdbench)": F.linear(h, w), "bf16 (landed loop, TRL)": F.linear(h.bfloat16(), w.bfloat16()),
              "bf16 operands, float32 output": onednn_bf16(lambda: F.linear(h, w)), "bf16x3": x3(h, w.t())}
    print(f"head products at {n} counted positions x {vocab} x {d} (student and teacher logits, dL/dh, dL/dW):")
    for (name, out), fn in zip(errors.items(), (fp32, bf16, fp32_out, bf16x3)):
        err = float((out.double() - exact).abs().max())
        print(f"  {name:32s} {ms(fn):7.1f} ms   max |error| of the logits {err:.1e} (largest logit {float(exact.abs().max()):.1f})")


def attention(lengths: list[int], heads: int = 9, kv_heads: int = 3, dim: int = 64) -> None:
    dtype = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    n, total, longest = len(lengths), sum(lengths), max(lengths)
    g = torch.Generator().manual_seed(0)

    def leaf(h):
        return torch.randn(1, h, total, dim, generator=g).to(dtype).requires_grad_(True)

    q, k, v = leaf(heads), leaf(kv_heads), leaf(kv_heads)
    seq = torch.repeat_interleave(torch.arange(n), torch.tensor(lengths))
    mask = ((seq[:, None] == seq[None, :]) & torch.ones(total, total, dtype=torch.bool).tril())[None, None]
    where = torch.cat([torch.arange(m) + i * longest for i, m in enumerate(lengths)])

    def expand(x):
        return x.repeat_interleave(heads // kv_heads, 1)

    def packed():
        F.scaled_dot_product_attention(q, expand(k), expand(v), attn_mask=mask).sum().backward()

    def pad(x):  # [1, H, total, D] -> [n, H, longest, D], right-padded
        out = x.new_zeros(heads, n * longest, dim).index_copy(1, where, x[0])
        return out.view(heads, n, longest, dim).transpose(0, 1)

    def padded():
        o = F.scaled_dot_product_attention(pad(q), pad(expand(k)), pad(expand(v)), is_causal=True)
        o.transpose(0, 1).reshape(heads, n * longest, dim).index_select(1, where).sum().backward()

    print(f"one layer's attention, forward + backward, {n} sequences of {lengths} tokens ({total} packed), {dtype}:")
    a, b = ms(packed), ms(padded)
    print(f"  packed row, block-diagonal causal mask  {a:6.2f} ms")
    print(f"  right-padded batch, causal, no mask      {b:6.2f} ms   ({b / a:.2f}x)")


def main() -> None:
    print(machine())
    head_products()
    rng = random.Random(0)
    attention([rng.randint(25, 110) for _ in range(8)])
    print("command: .venv/bin/python benchmarks/probe_step_leads.py")


if __name__ == "__main__":
    main()
