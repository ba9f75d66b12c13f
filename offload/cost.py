"""The token-wise alpha formula (one place for it; ``profile.resolve_alpha`` applies it).

MEMO's rule: offload as many token rows as the copy link can move while the layer computes, and
no more than the host tier holds:

    (S_whole + alpha * S_rows) / B  <=  T_layer                 (copies hide behind compute)
    n_offloaded * (S_whole + alpha * S_rows)  <=  M_host        (host/file tier capacity)

S_whole: bytes offloaded whole per layer (layer input, attention output, logsumexp);
S_rows: bytes of the other saved tensors of one layer over all t rows; B: copy bandwidth
(bytes/s); T_layer: one layer's forward time.

A tiled layer (``activation.tile_rows``) waits for a head tile's copies two tiles later and reads
a head tile back one tile ahead of its backward (offload/tokenwise.py), so little of a row's copy
hides: measured behind emulated links of 0.3-5 GB/s (docs/benchmarks.md, the link scan), the
forward exposed nearly all of the rows' writes and the backward the part of their reads longer
than one tile's row-wise compute. With s the bytes of all rows, R their row-wise forward (their
recompute) and, on a CPU device, M the bandwidth of a copy into the tier (the CPU itself copies:
once out, once back), offloading costs about s/B + max(0, s/B - R) + 2 s/M and recomputing R, both
linear in alpha: the cheaper is taken for every row (alpha 1 up to the tier budget, or 0).
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
    host_copy_bytes_per_s: float | None = None,
) -> float:
    """Largest alpha in [0, 1] meeting both constraints (0 when even the whole tensors miss the time).
    ``tiles`` > 1 (the layer's tile count) with ``rowwise_forward_s`` (the row-wise parts' forward
    over all rows): the tiled rule of the module docstring decides the time part
    (``host_copy_bytes_per_s``: M, None where a copy engine other than the CPU copies)."""
    if n_offloaded == 0 or row_bytes == 0:
        return 1.0
    if n_offloaded * whole_bytes > host_budget_bytes:
        raise ConfigError(
            f"the host tier needs {n_offloaded * whole_bytes / 2**30:.2f} GiB just for layer inputs and attention "
            f"outputs but activation.host_budget_bytes allows {host_budget_bytes / 2**30:.2f} GiB; raise it, use "
            "activation.tier=file, or raise activation.keep_last"
        )
    time_alpha = (layer_forward_s * copy_bytes_per_s - whole_bytes) / row_bytes
    if tiles > 1 and rowwise_forward_s is not None:  # every row costs the same: all rows or none
        offload_s = row_offload_seconds(row_bytes, rowwise_forward_s, copy_bytes_per_s, host_copy_bytes_per_s)
        time_alpha = 1.0 if offload_s < rowwise_forward_s else 0.0
    memory_alpha = (host_budget_bytes / n_offloaded - whole_bytes) / row_bytes
    return max(0.0, min(1.0, time_alpha, memory_alpha))


def row_offload_seconds(
    row_bytes: int, rowwise_forward_s: float, copy_bytes_per_s: float, host_copy_bytes_per_s: float | None
) -> float:
    """What offloading all the rows of a tiled layer costs the step (the module docstring):
    the exposed write and read, and the CPU's own copies; recomputing them costs ``rowwise_forward_s``."""
    copy_s = row_bytes / copy_bytes_per_s
    cpu_s = 2 * row_bytes / host_copy_bytes_per_s if host_copy_bytes_per_s else 0.0
    return copy_s + max(0.0, copy_s - rowwise_forward_s) + cpu_s


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
