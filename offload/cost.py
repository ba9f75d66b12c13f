"""The token-wise alpha formula (one place for it; ``profile.resolve_alpha`` applies it).

MEMO's rule: offload as many token rows as the copy link can move while the layer computes, and
no more than the host tier holds:

    (S_whole + alpha * S_rows) / B  <=  T_layer                 (copies hide behind compute)
    n_offloaded * (S_whole + alpha * S_rows)  <=  M_host        (host/file tier capacity)

S_whole: bytes offloaded whole per layer (layer input, attention output, logsumexp);
S_rows: bytes of the other saved tensors of one layer over all t rows; B: copy bandwidth
(bytes/s); T_layer: one layer's forward time.

A tiled layer (``activation.tile_rows``) waits for a head tile's copies two tiles later and reads
a head tile back one tile ahead of its backward (offload/tokenwise.py), so a row's copy hides
behind about one tile of row-wise compute, not behind the whole layer: with R the row-wise
forward time of one row (its recompute), a row's write is exposed by max(0, s/B - R) and its read
by max(0, s/B - 2R) (the backward is about twice the forward), s the row's bytes. Offloading a row
then costs its exposed copy time and recomputing it costs R, and both grow linearly with alpha: the
cheaper one is taken for every row (alpha 1 up to the tier budget, or 0). Measured behind emulated
links of 0.3-5 GB/s (docs/benchmarks.md, the link scan): offloaded head tiles are exposed long
before the layer-level rule says.
"""

from __future__ import annotations

from longtrain.config_checks import ConfigError


def tokenwise_alpha(
    whole_bytes: int,
    row_bytes: int,
    layer_forward_s: float,
    copy_bytes_per_s: float,
    n_offloaded: int,
    host_budget_bytes: int,
    tiles: int = 1,
    rowwise_forward_s: float | None = None,
) -> float:
    """Largest alpha in [0, 1] meeting both constraints (0 when even the whole tensors miss the time).
    ``tiles`` > 1 (the layer's tile count) with ``rowwise_forward_s`` (the row-wise parts' forward
    over all rows): the tiled rule of the module docstring decides the time part."""
    if n_offloaded == 0 or row_bytes == 0:
        return 1.0
    if n_offloaded * whole_bytes > host_budget_bytes:
        raise ConfigError(
            f"the host tier needs {n_offloaded * whole_bytes / 2**30:.2f} GiB just for layer inputs and attention "
            f"outputs but activation.host_budget_bytes allows {host_budget_bytes / 2**30:.2f} GiB; raise it, use "
            "activation.tier=file, or raise activation.keep_last"
        )
    time_alpha = (layer_forward_s * copy_bytes_per_s - whole_bytes) / row_bytes
    if tiles > 1 and rowwise_forward_s is not None:
        exposed = exposed_row_copy_s(row_bytes, rowwise_forward_s, copy_bytes_per_s)
        if exposed > 0.0:  # every offloaded row costs copy time: offload all rows or none
            time_alpha = 1.0 if exposed < rowwise_forward_s else 0.0
    memory_alpha = (host_budget_bytes / n_offloaded - whole_bytes) / row_bytes
    return max(0.0, min(1.0, time_alpha, memory_alpha))


def exposed_row_copy_s(row_bytes: int, rowwise_forward_s: float, copy_bytes_per_s: float) -> float:
    """Copy time of a tiled layer's rows (all t, write and read) that one tile of row-wise compute
    does not hide; its recompute would take ``rowwise_forward_s``."""
    copy_s = row_bytes / copy_bytes_per_s
    return max(0.0, copy_s - rowwise_forward_s) + max(0.0, copy_s - 2 * rowwise_forward_s)


# The offloaded head ends on a multiple of ROW_ALIGN rows (unless it is the whole sequence). CPU BLAS
# kernels compute a matmul in tiles of a few rows and the last, partial tile by other code: measured
# with MKL on an AMD EPYC, float64 ``linear(x[a:], w)`` equals ``linear(x, w)[a:]`` bit for bit only
# when a is a multiple of 4. Cutting on a tile boundary makes every recomputed row the float the
# forward produced, so token-wise gradients equal plain autograd's exactly on such machines.
ROW_ALIGN = 8


def split_row(alpha: float, t: int) -> int:
    """a: rows [0, a) of every row tensor are offloaded, rows [a, t) recomputed.

    round(alpha * t) cut down to a multiple of ROW_ALIGN (never up: alpha's budgets are upper bounds),
    except that a whole sequence stays whole (alpha 1 recomputes nothing)."""
    a = int(round(alpha * t))
    return t if a >= t else a - a % ROW_ALIGN


def offloaded_bytes(whole_bytes: int, row_bytes: int, alpha: float, t: int, n_offloaded: int) -> int:
    """Host/file bytes after forward for ``alpha``: the rows are cut at a = split_row(alpha, t)."""
    a = split_row(alpha, t)
    return n_offloaded * (whole_bytes + (row_bytes // t) * a if t else 0)
