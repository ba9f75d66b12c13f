"""What one offloaded decoder layer saves for backward, derived by hand (the byte oracle of the
activation-memory tests: test_tokenwise.py, test_activation_plan.py)."""

from __future__ import annotations

import torch


def dims(model):
    parts = model.layer_parts[0]
    return dict(
        h=model.config.hidden_size,
        n_heads=parts.n_heads,
        n_kv=parts.n_kv_heads,
        head_dim=parts.head_dim,
        ffn=parts.gate_proj.out_features,
        dtype=parts.q_proj.weight.dtype,
    )


def skeletal_bytes_per_token(h, n_heads, n_kv, head_dim, ffn, dtype):
    """(whole, rows): bytes per token of one offloaded layer's skeletal activations.

    whole (offloaded in full): layer input x [h], attention output [n_heads * head_dim] and its
    logsumexp [n_heads] (float32, float64 for float64 inputs).

    rows (the first a token rows offloaded, the rest recomputed), read off what autograd saves:
      HF RMSNorm: x32 = x.to(float32); var = x32.pow(2).mean(-1); y = x32 * rsqrt(var + eps);
        out = weight * y.to(dtype). pow and mul save x32 [4h] (the input itself when dtype is
        float32 and .to is a no-op: for the input norm that is x, already offloaded whole);
        rsqrt saves its output [4] (a [t, 1] float32 column); ``weight *`` saves y.to(dtype)
        [e*h] (float32: the mul output y itself, 4h); the next linears save the norm output [e*h].
      q/k/v projections: their input is the norm output (above); RoPE saves only cos/sin (shared
        tables, not per layer); the attention core saves q, k, v after RoPE [e*head_dim*(n + 2kv)]
        and out + lse (whole). o_proj saves a view of out (whole).
      post-attention norm: as above, but its input r = x + o_proj(out) is a fresh row tensor, so
        in float32 it counts too.
      MLP: gate output (SiLU input), SiLU output and up output (the mul's operands) and their
        product (down_proj's input): 4 tensors of [e*ffn].
    """
    e = dtype.itemsize
    lse = torch.promote_types(dtype, torch.float32).itemsize
    whole = e * h + e * n_heads * head_dim + lse * n_heads
    fp32 = dtype == torch.float32

    def rms_norm(input_is_whole: bool) -> int:
        x32 = 0 if fp32 and input_is_whole else 4 * h
        y = 4 * h if fp32 else e * h  # fp32: mul output; else its cast to dtype
        return x32 + 4 + y + e * h  # + rsqrt column + norm output

    rows = rms_norm(True) + e * head_dim * (n_heads + 2 * n_kv) + rms_norm(False) + 4 * e * ffn
    return whole, rows


def plain_layer_bytes_per_token(h, n_heads, n_kv, head_dim, ffn, dtype):
    """What the plain model saves per layer: the rows, attention out + lse, and x only in float32
    (where pow saves the layer input itself; otherwise it saves the float32 copy, already in rows)."""
    whole, rows = skeletal_bytes_per_token(h, n_heads, n_kv, head_dim, ffn, dtype)
    x = dtype.itemsize * h
    return rows + whole - x + (4 * h if dtype == torch.float32 else 0)
