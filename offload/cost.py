"""The token-wise alpha formula (one place for it; ``profile.resolve_alpha`` applies it).

MEMO's rule: offload as many token rows as the copy link can move while the layer computes, and
no more than the host tier holds:

    (S_whole + alpha * S_rows) / B  <=  T_layer                 (copies hide behind compute)
    n_offloaded * (S_whole + alpha * S_rows)  <=  M_host        (host/file tier capacity)

S_whole: bytes offloaded whole per layer (layer input, attention output, logsumexp);
S_rows: bytes of the other saved tensors of one layer over all t rows; B: copy bandwidth
(bytes/s); T_layer: one layer's forward time.
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
) -> float:
    """Largest alpha in [0, 1] meeting both constraints (0 when even the whole tensors miss the time)."""
    if n_offloaded == 0 or row_bytes == 0:
        return 1.0
    if n_offloaded * whole_bytes > host_budget_bytes:
        raise ConfigError(
            f"the host tier needs {n_offloaded * whole_bytes / 2**30:.2f} GiB just for layer inputs and attention "
            f"outputs but activation.host_budget_bytes allows {host_budget_bytes / 2**30:.2f} GiB; raise it, use "
            "activation.tier=file, or raise activation.keep_last"
        )
    time_alpha = (layer_forward_s * copy_bytes_per_s - whole_bytes) / row_bytes
    memory_alpha = (host_budget_bytes / n_offloaded - whole_bytes) / row_bytes
    return max(0.0, min(1.0, time_alpha, memory_alpha))


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
