"""Low-rank deltas token by token in Triton (BGMV, as punica / vLLM / SGLang do at decode).

    v = shrink_rows_triton(x, A, rank, token_slot, n_splits, ranks_out=ranks)  # one launch
    expand_rows_triton(y, v, B, rank, scale, token_slot, slice_sizes, token_rank=ranks)

(triton_lowrank_stages.py runs them for an adapted module: in a row, or around its matmul.)

Each shrink program reads its token's slot from `token_slot` on the device and that slot's
exact rank per slice from `rank` (writing it to `ranks` for the expand, which then need not
wait for the slot to find it): no host-side grouping (kernels/segment_meta.py) and no
device->host read, so a decode step that calls these can be captured in a CUDA graph and
replayed for any mix of adapters. One launch covers every slice of a fused projection (q/k/v,
gate/up) and every adapter of the step. The semantics are reference.lowrank_delta_reference's
loop.

The shrink may split the input dimension over several programs (`n_splits`, for the few-token
steps where one program per (token, slice) leaves the GPU idle); its output holds one partial
sum per split, which the expand adds up, deterministically. The bottleneck's `b_down` and
activation therefore act in the expand, on the summed shrink.

Both kernels have two forms of the same sums: one tile of every rank up to R_max, masked past
the slot's own (the default), or, with RANK_CHUNK set, a loop over the slot's own rank that
many at a time, so a rank-8 slot costs one small step and the registers do not grow with
R_max. The shrink has a third: with SHRINK_RANK_GRID set, a token's ranks are spread over
programs of that many each. Which is faster where is for the GPU to say
(bench/decode_kernels.py --lora-tiles); the kernel tests run every form.

Imported lazily, like triton_shrink.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .activation import activation_code
from .lora_tiles import Tiles
from .tiling import cdiv, pow2_at_least
from .triton_combine import add as _add
from .triton_expand import _slice_offsets
from .triton_shrink import activate

# Tiles where a launch is given none (bench/decode_kernels.py --lora-tiles times others on the
# GPU; lora_tiles.TileTable holds the fastest per module shape on a device)
SHRINK_BLOCK_K = 128  # input columns per step of the shrink's loop, at most
SHRINK_WARPS = 4
EXPAND_BLOCK_N = 64  # output columns per expand program
EXPAND_WARPS = 4
# Ranks a step of a loop over each slot's own rank, in both kernels; 0: every rank up to R_max
# in one tile (masked past the slot's rank), the tile's registers sized for R_max.
RANK_CHUNK = 0
# Fused projections whose slices differ in width (qkv under GQA): the expand's programs are
# the slices' own column tiles, each program's slice and columns worked out from its id and the
# slices' bounds (arguments, not a table to load first), instead of every slice at the widest
# one's tile count (at 8B, qkv's k and v are a quarter of q: half of those programs only exit).
FLAT_TILES = True
FLAT_MAX_SLICES = 3  # the bounds the kernel takes (qkv's three slices)
# The shrink's programs a launch aims at: its input dimension is split until (tokens x slices
# x rank groups x splits) reaches this, each split at least two BLOCK_Ks of columns.
SHRINK_PROGRAMS = 256
# Ranks a shrink program takes (0: all of its slot's): with it set, a token's rank rows are
# spread over programs of that many rows each, those past the slot's rank only writing zeros.
# Programs then read the same bytes whatever their slot's rank (a rank-64 token's program is no
# longer 8 times a rank-8 one's, the launch's tail), and more programs share the reads with
# fewer splits of the input, whose partial sums every expand program adds up.
SHRINK_RANK_GRID = 0
# The shrink writes each (slice, token)'s rank, and the expand reads it there, where it need
# not wait for the token's slot first: one dependent load fewer before an expand program can
# read B (slot -> rank -> B otherwise), for kernels bound by latency more than bandwidth.
TOKEN_RANKS = True


@triton.jit
def _shrink_rows_kernel(
    x_ptr,  # [T, in]
    a_ptr,  # [n_slices, S, R_max, in]
    v_ptr,  # [n_splits, n_slices, T, R_max] float32, every entry written
    token_slot_ptr,  # [T] int, -1 = no adapter
    rank_ptr,  # [n_slices, S] int32
    token_rank_ptr,  # [n_slices, T] int32, each token's rank written (STORE_RANKS)
    K,  # in
    k_per_split,  # input columns per split, a multiple of BLOCK_K
    R_MAX_STORE,  # R_max: ranks are clamped to it so a bad rank cannot read out of bounds
    stride_xt,
    stride_xk,
    stride_ai,
    stride_as,
    stride_ar,
    stride_ak,
    stride_vp,
    stride_vi,
    stride_vt,
    stride_ranki,
    stride_tri,
    BLOCK_R: tl.constexpr,  # R_max padded to a power of two
    BLOCK_K: tl.constexpr,
    RANK_CHUNK: tl.constexpr,  # BLOCK_R: one tile of every rank; less: a loop to the rank
    STORE_RANKS: tl.constexpr,  # write each token's rank to token_rank_ptr (TOKEN_RANKS)
    RANK_GRID: tl.constexpr,  # 0, or ranks a program (axis 2: split x BLOCK_R // RANK_GRID)
):
    t = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1).to(tl.int64)  # slice
    if RANK_GRID > 0:
        split = tl.program_id(2) // (BLOCK_R // RANK_GRID)
        group = tl.program_id(2) % (BLOCK_R // RANK_GRID)
        first = (split == 0) & (group == 0)
    else:
        split = tl.program_id(2)
        first = split == 0
    slot = tl.load(token_slot_ptr + t).to(tl.int64)
    live = slot >= 0
    slot = tl.maximum(slot, 0)  # a token without an adapter reads slot 0's rank, then ignores it
    rank = tl.load(rank_ptr + i * stride_ranki + slot)
    rank = tl.where(live, tl.minimum(rank, R_MAX_STORE), 0)
    if STORE_RANKS:
        if first:  # 0 for a token without an adapter: the expand skips it on that alone
            tl.store(token_rank_ptr + i * stride_tri + t, rank)
    if RANK_GRID > 0:
        _shrink_rank_group(x_ptr, a_ptr, v_ptr, t, i, split, group * RANK_GRID, slot, rank, K,
                           k_per_split, R_MAX_STORE, stride_xt, stride_xk, stride_ai, stride_as,
                           stride_ar, stride_ak, stride_vp, stride_vi, stride_vt, RANK_GRID,
                           BLOCK_K)  # fmt: skip
    elif RANK_CHUNK < BLOCK_R:
        _shrink_rank_chunks(x_ptr, a_ptr, v_ptr, t, i, split, slot, rank, K, k_per_split,
                            R_MAX_STORE, stride_xt, stride_xk, stride_ai, stride_as, stride_ar,
                            stride_ak, stride_vp, stride_vi, stride_vt, RANK_CHUNK,
                            BLOCK_K)  # fmt: skip
    else:  # one tile of every rank up to R_max, masked past the slot's own
        _shrink_rank_group(x_ptr, a_ptr, v_ptr, t, i, split, 0, slot, rank, K, k_per_split,
                           R_MAX_STORE, stride_xt, stride_xk, stride_ai, stride_as, stride_ar,
                           stride_ak, stride_vp, stride_vi, stride_vt, BLOCK_R,
                           BLOCK_K)  # fmt: skip


@triton.jit
def _rows_dot(x_ptr, a_row, t, k_start, k_end, mask_rows, stride_xt, stride_xk, stride_ak,
              ROWS: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """Rows a_row [ROWS, 1] of A (those in mask_rows) dotted with x[t] over input columns
    k_start..k_end, BLOCK_K at a time, in float32 -> [ROWS]."""
    acc = tl.full((ROWS,), 0.0, dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        x = tl.load(x_ptr + t * stride_xt + offs_k * stride_xk, mask=mask_k, other=0.0)
        a = tl.load(a_row + offs_k[None, :] * stride_ak,
                    mask=mask_rows[:, None] & mask_k[None, :], other=0.0)  # fmt: skip
        acc += tl.reduce(a.to(tl.float32) * x.to(tl.float32)[None, :], 1, _add)
    return acc


@triton.jit
def _shrink_rank_group(
    x_ptr, a_ptr, v_ptr, t, i, split, r0, slot, rank, K, k_per_split, R_MAX_STORE,
    stride_xt, stride_xk, stride_ai, stride_as, stride_ar, stride_ak, stride_vp, stride_vi,
    stride_vt, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The shrink's program over ranks r0..r0 + ROWS of its slot (all of them from 0, or a
    SHRINK_RANK_GRID group): their sums over its split's input columns, zeros past the slot's
    rank and for a token without an adapter (a group wholly past it reads nothing), so the
    buffer needs no memset launch."""
    offs_c = r0 + tl.arange(0, ROWS)
    k_start = split * k_per_split
    k_end = tl.where(r0 < rank, tl.minimum(k_start + k_per_split, K), k_start)
    a_row = a_ptr + i * stride_ai + slot * stride_as + offs_c[:, None] * stride_ar
    acc = _rows_dot(x_ptr, a_row, t, k_start, k_end, offs_c < rank, stride_xt, stride_xk,
                    stride_ak, ROWS, BLOCK_K)  # fmt: skip
    v_row = v_ptr + split * stride_vp + i * stride_vi + t * stride_vt
    tl.store(v_row + offs_c, acc, mask=offs_c < R_MAX_STORE)


@triton.jit
def _shrink_rank_chunks(
    x_ptr, a_ptr, v_ptr, t, i, split, slot, rank, K, k_per_split, R_MAX_STORE,
    stride_xt, stride_xk, stride_ai, stride_as, stride_ar, stride_ak, stride_vp, stride_vi,
    stride_vt, RANK_CHUNK: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The shrink's program over its slot's own rank, RANK_CHUNK ranks at a time (registers
    for a [RANK_CHUNK, BLOCK_K] tile whatever R_max), then zeros to R_max."""
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    v_row = v_ptr + split * stride_vp + i * stride_vi + t * stride_vt
    done = (rank + RANK_CHUNK - 1) // RANK_CHUNK * RANK_CHUNK
    for r0 in range(0, done, RANK_CHUNK):
        offs_c = r0 + tl.arange(0, RANK_CHUNK)
        mask_c = offs_c < rank
        a_row = a_ptr + i * stride_ai + slot * stride_as + offs_c[:, None] * stride_ar
        acc = _rows_dot(x_ptr, a_row, t, k_start, k_end, mask_c, stride_xt, stride_xk,
                        stride_ak, RANK_CHUNK, BLOCK_K)  # fmt: skip
        tl.store(v_row + offs_c, acc, mask=offs_c < R_MAX_STORE)
    for r0 in range(done, R_MAX_STORE, RANK_CHUNK):  # past the rank: zeros, as the tile form
        offs_c = r0 + tl.arange(0, RANK_CHUNK)
        tl.store(v_row + offs_c, tl.full((RANK_CHUNK,), 0.0, dtype=tl.float32),
                 mask=offs_c < R_MAX_STORE)  # fmt: skip


@triton.jit
def _hidden(h, b_down_ptr, slot, stride_bds, offs, mask, HAS_BIAS: tl.constexpr,
            ACT: tl.constexpr):  # fmt: skip
    """The expand's summed shrink at ranks `offs`: + b_down and the activation (a bottleneck),
    zero past the slot's rank (`mask`)."""
    if HAS_BIAS:
        h += tl.load(b_down_ptr + slot * stride_bds + offs, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, activate(h, ACT), 0.0)


@triton.jit
def _expand_rank_chunks(
    v_ptr, b_ptr, b_down_ptr, t, i, slot, rank, cols, mask_n, R_MAX_STORE, stride_vp,
    stride_vi, stride_vt, stride_bs, stride_bo, stride_br, stride_bds,
    N_SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    RANK_ALIGN: tl.constexpr, RANK_CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The expand's sum over its slot's own rank, RANK_CHUNK ranks at a time -> [BLOCK_N]."""
    rank_ld = tl.minimum((rank + RANK_ALIGN - 1) // RANK_ALIGN * RANK_ALIGN, R_MAX_STORE)
    d = tl.full((BLOCK_N,), 0.0, dtype=tl.float32)
    for r0 in range(0, rank, RANK_CHUNK):
        offs_c = r0 + tl.arange(0, RANK_CHUNK)
        mask_c = offs_c < rank
        mask_ld = offs_c < rank_ld  # as the tile form: 16-byte loads, selects on the rank
        h = tl.full((RANK_CHUNK,), 0.0, dtype=tl.float32)
        for p in tl.static_range(N_SPLITS):
            h += tl.load(v_ptr + p * stride_vp + i * stride_vi + t * stride_vt + offs_c,
                         mask=mask_ld, other=0.0)  # fmt: skip
        h = _hidden(h, b_down_ptr, slot, stride_bds, offs_c, mask_c, HAS_BIAS, ACT)
        b = tl.load(
            b_ptr + slot * stride_bs + cols[:, None] * stride_bo + offs_c[None, :] * stride_br,
            mask=mask_n[:, None] & mask_ld[None, :],
            other=0.0,
        )
        b = tl.where(mask_c[None, :], b.to(tl.float32), 0.0)
        d += tl.reduce(b * h[None, :], 1, _add)
    return d


@triton.jit
def _expand_rows_kernel(
    y_ptr,  # [T, out_total], read and written
    v_ptr,  # [n_splits, n_slices, T, R_max] float32
    b_ptr,  # [S, out_total, R_max]
    token_slot_ptr,  # [T] int, -1 = no adapter
    rank_ptr,  # [n_slices, S] int32
    scale_ptr,  # [n_slices, S] float32, laid out like rank
    b_down_ptr,  # [S, R_max], read only when HAS_BIAS
    b_up_ptr,  # [S, out_total], read only when HAS_BIAS
    slice_offsets_ptr,  # [n_slices + 1] int32, column where each slice starts (not FLAT)
    token_rank_ptr,  # [n_slices, T] int32, the shrink's ranks, read when TOKEN_RANKS
    tile_end0,  # FLAT: programs (column tiles) of slice 0, then of slices 0 and 1
    tile_end1,
    col1,  # FLAT: the columns where slices 1 and 2 start and where the last one ends
    col2,
    col3,
    R_MAX_STORE,
    stride_yt,
    stride_yo,
    stride_vp,
    stride_vi,
    stride_vt,
    stride_bs,
    stride_bo,
    stride_br,
    stride_ranki,
    stride_bds,
    stride_bus,
    stride_tri,
    N_SPLITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,  # 0 none, 1 relu, 2 silu, 3 gelu (activation.py)
    RANK_ALIGN: tl.constexpr,  # 8 where R_MAX_STORE is a multiple of 8, else 1
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    RANK_CHUNK: tl.constexpr,  # BLOCK_R: one tile of every rank; less: a loop to the rank
    FLAT: tl.constexpr,  # axis 1: every slice's own column tiles, one after another
    TOKEN_RANKS: tl.constexpr,  # ranks from token_rank_ptr (by token), else rank_ptr (by slot)
    ADD: tl.constexpr,  # y += delta; else y = delta (zero where a token has no update)
):
    t = tl.program_id(0).to(tl.int64)
    if FLAT:
        pid = tl.program_id(1)
        i = (pid >= tile_end0).to(tl.int64) + (pid >= tile_end1).to(tl.int64)  # slice
        pid_n = pid - tl.where(i == 0, 0, tl.where(i == 1, tile_end0, tile_end1))
        col_start = tl.where(i == 0, 0, tl.where(i == 1, col1, col2))
        width = tl.where(i == 0, col1, tl.where(i == 1, col2, col3)) - col_start
    else:
        i = tl.program_id(1).to(tl.int64)
        pid_n = tl.program_id(2)
        col_start = tl.load(slice_offsets_ptr + i)
        width = tl.load(slice_offsets_ptr + i + 1) - col_start
    slot = tl.load(token_slot_ptr + t).to(tl.int64)
    if TOKEN_RANKS:  # loaded beside the slot, not after it; 0 where the slot is -1
        rank = tl.load(token_rank_ptr + i * stride_tri + t)
    else:
        rank = tl.where(slot >= 0, tl.minimum(tl.load(rank_ptr + i * stride_ranki + slot,
                                                      mask=slot >= 0, other=0), R_MAX_STORE), 0)
    if pid_n * BLOCK_N >= width:  # past a narrower slice
        return
    if rank <= 0:  # no update here: y as it is, or (not ADD) a zero delta
        if not ADD:
            offs_z = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            tl.store(y_ptr + t * stride_yt + (col_start + offs_z).to(tl.int64) * stride_yo,
                     tl.zeros((BLOCK_N,), dtype=y_ptr.dtype.element_ty),
                     mask=offs_z < width)  # fmt: skip
        return
    if RANK_CHUNK < BLOCK_R:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < width
        cols = (col_start + offs_n).to(tl.int64)
        d = _expand_rank_chunks(v_ptr, b_ptr, b_down_ptr, t, i, slot, rank, cols, mask_n,
                                R_MAX_STORE, stride_vp, stride_vi, stride_vt, stride_bs,
                                stride_bo, stride_br, stride_bds, N_SPLITS, HAS_BIAS, ACT,
                                RANK_ALIGN, RANK_CHUNK, BLOCK_N)  # fmt: skip
        if HAS_BIAS:
            d += tl.load(b_up_ptr + slot * stride_bus + cols, mask=mask_n, other=0.0).to(
                tl.float32
            )
        d *= tl.load(scale_ptr + i * stride_ranki + slot)
        _store_delta(y_ptr + t * stride_yt + cols * stride_yo, d, mask_n, ADD)
        return

    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    # Loads run to the rank rounded up to RANK_ALIGN (never past R_MAX_STORE, itself a
    # multiple of it): a bound known to be a multiple of 8 lets them be 16-byte vectors (a
    # mask on the exact rank makes every element its own load). What they read past the rank
    # is dropped by selects on the exact rank below, whatever it holds.
    rank_ld = (rank + RANK_ALIGN - 1) // RANK_ALIGN * RANK_ALIGN
    mask_ld = offs_r < tl.multiple_of(tl.minimum(rank_ld, R_MAX_STORE), RANK_ALIGN)
    h = tl.full((BLOCK_R,), 0.0, dtype=tl.float32)
    for p in tl.static_range(N_SPLITS):
        h += tl.load(v_ptr + p * stride_vp + i * stride_vi + t * stride_vt + offs_r,
                     mask=mask_ld, other=0.0)  # fmt: skip
    h = _hidden(h, b_down_ptr, slot, stride_bds, offs_r, mask_r, HAS_BIAS, ACT)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < width
    cols = (col_start + offs_n).to(tl.int64)
    b = tl.load(  # [N, R]
        b_ptr + slot * stride_bs + cols[:, None] * stride_bo + offs_r[None, :] * stride_br,
        mask=mask_n[:, None] & mask_ld[None, :],
        other=0.0,
    )
    b = tl.where(mask_r[None, :], b.to(tl.float32), 0.0)
    d = tl.reduce(b * h[None, :], 1, _add)  # [N]
    if HAS_BIAS:
        d += tl.load(b_up_ptr + slot * stride_bus + cols, mask=mask_n, other=0.0).to(tl.float32)
    d *= tl.load(scale_ptr + i * stride_ranki + slot)
    _store_delta(y_ptr + t * stride_yt + cols * stride_yo, d, mask_n, ADD)


@triton.jit
def _store_delta(y_ptrs, d, mask, ADD: tl.constexpr):
    """y + d rounded to y's dtype once (ADD), or d in y's dtype."""
    if ADD:
        y = tl.load(y_ptrs, mask=mask, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + d).to(y.dtype), mask=mask)
    else:
        tl.store(y_ptrs, d.to(y_ptrs.dtype.element_ty), mask=mask)


def default_tiles(kernel: str) -> Tiles:
    """The tiles of a launch given none: the constants above."""
    if kernel == "shrink":
        return Tiles(SHRINK_BLOCK_K, SHRINK_WARPS, RANK_CHUNK, SHRINK_PROGRAMS, SHRINK_RANK_GRID)
    return Tiles(EXPAND_BLOCK_N, EXPAND_WARPS, RANK_CHUNK)


def rank_chunk(block_r: int, chunk: int | None = None) -> int:
    """The kernels' RANK_CHUNK: `chunk` (default RANK_CHUNK) where it is set and below the
    tile's ranks."""
    chunk = RANK_CHUNK if chunk is None else chunk
    return min(chunk, block_r) if chunk > 0 else block_r


def shrink_splits(n_tokens: int, n_slices: int, d_in: int, tiles: Tiles | None = None,
                  r_max: int = 1) -> int:  # fmt: skip
    """Splits of the input dimension: enough programs to spread a few tokens' weight reads
    over the GPU (~tiles.programs programs, counting a token's rank groups where
    tiles.rank_grid spreads its ranks, up to r_max, over programs), at least two blocks of
    columns each."""
    tiles = tiles or default_tiles("shrink")
    most = max(1, d_in // (2 * tiles.block))
    groups = rank_groups(r_max, tiles)
    return max(1, min(most, tiles.programs // max(1, n_tokens * n_slices * groups)))


def rank_groups(r_max: int, tiles: Tiles) -> int:
    """The shrink's programs a (token, slice, split): pow2(r_max) // tiles.rank_grid where the
    rank grid is on (and below the ranks' tile), else 1."""
    block_r = pow2_at_least(r_max)
    return block_r // tiles.rank_grid if 0 < tiles.rank_grid < block_r else 1


def shrink_rows_triton(
    x: torch.Tensor,  # [T, in]
    A: torch.Tensor,  # [n_slices, S, R_max, in]
    rank: torch.Tensor,  # [n_slices, S] int32, 0 = no update
    token_slot: torch.Tensor,  # [T] int, -1 = no adapter
    n_splits: int = 1,
    tiles: Tiles | None = None,  # default_tiles("shrink")
    out: torch.Tensor | None = None,  # where v goes (else a new tensor)
    ranks_out: torch.Tensor | None = None,  # [n_slices, T] int32: each token's rank written
) -> torch.Tensor:  # [n_splits, n_slices, T, R_max] float32, summing to shrink_reference's v
    """One launch for every (token, slice, split): the partial sums of A[i, s, :r] @ x[t];
    with `ranks_out`, also each token's rank per slice (clamped to R_max; 0 without an
    adapter), what expand_rows_triton's `token_rank` takes."""
    T, d_in = x.shape
    n_slices, _, r_max, _ = A.shape
    v = out if out is not None else shrink_output(x, A, n_splits)
    if T == 0:
        return v
    tiles = tiles or default_tiles("shrink")
    block_r = pow2_at_least(r_max)
    chunk = rank_chunk(block_r, tiles.rank_chunk)
    groups = rank_groups(r_max, tiles)
    grid = block_r // groups if groups > 1 else 0  # ranks a program (RANK_GRID), 0: all
    block_k = max(32, min(tiles.block, 8192 // (grid or chunk)))  # A tiles of <= 8K elements
    k_per_split = cdiv(cdiv(d_in, n_splits), block_k) * block_k
    ranks = ranks_out if ranks_out is not None else rank  # (unread without STORE_RANKS)
    _shrink_rows_kernel[(T, n_slices, n_splits * groups)](
        x, A, v, token_slot, rank, ranks,
        d_in, k_per_split, r_max,
        *x.stride(), *A.stride(), *v.stride()[:3], rank.stride(0),  # one call a tensor
        ranks.stride(0),
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        RANK_CHUNK=chunk,
        STORE_RANKS=ranks_out is not None,
        RANK_GRID=grid,
        num_warps=tiles.warps,
    )  # fmt: skip
    return v


def shrink_output(x: torch.Tensor, A: torch.Tensor, n_splits: int) -> torch.Tensor:
    """The shrink's output for x [T, in] and A [n_slices, S, R_max, in], unfilled."""
    return torch.empty(n_splits, A.shape[0], x.shape[0], A.shape[2], dtype=torch.float32,
                       device=x.device)  # fmt: skip


def expand_rows_triton(
    y: torch.Tensor,  # [T, out_total], updated in place
    v: torch.Tensor,  # [n_splits, n_slices, T, R_max] float32 (shrink_rows_triton's output)
    B: torch.Tensor,  # [S, out_total, R_max]
    rank: torch.Tensor,  # [n_slices, S] int32
    scale: torch.Tensor,  # [n_slices, S] float32
    token_slot: torch.Tensor,  # [T] int, -1 = no adapter
    slice_sizes: tuple[int, ...],  # out_i per slice, summing to out_total
    *,
    b_down: torch.Tensor | None = None,  # [S, R_max], with b_up and act: a bottleneck
    b_up: torch.Tensor | None = None,  # [S, out_total]
    act: str | None = None,
    tiles: Tiles | None = None,  # default_tiles("expand")
    token_rank: torch.Tensor | None = None,  # [n_slices, T] int32: the shrink's ranks_out
    add: bool = True,  # False: y = the delta, every entry written (zero without an update)
) -> torch.Tensor:  # y
    """One launch for every (token, slice, column tile):
    y[t, off_i:off_i+out_i] += scale[i, s] * (B[s, off_i:off_i+out_i, :r] @ act(sum_p v[p, i, t, :r]
    + b_down[s, :r]) + b_up[s, off_i:off_i+out_i]); with add=False, = instead of +=."""
    T = y.shape[0]
    if T == 0:
        return y
    n_splits, n_slices, _, r_max = v.shape
    tiles = tiles or default_tiles("expand")
    has_bias = b_down is not None
    bias_down = b_down if b_down is not None else v
    bias_up = b_up if b_up is not None else y
    offsets = _slice_offsets(slice_sizes, y.device)
    flat = FLAT_TILES and len(set(slice_sizes)) > 1 and n_slices <= FLAT_MAX_SLICES
    programs, bounds = flat_bounds(slice_sizes, tiles.block) if flat else (0, (0,) * 5)
    ranks = token_rank if token_rank is not None else rank  # (unread without TOKEN_RANKS)
    grid = (T, programs, 1) if flat else (T, n_slices, cdiv(max(slice_sizes), tiles.block))
    _expand_rows_kernel[grid](
        y, v, B, token_slot, rank, scale, bias_down, bias_up, offsets, ranks, *bounds,
        r_max,
        *y.stride(), *v.stride()[:3], *B.stride(), rank.stride(0),  # one call a tensor
        bias_down.stride(0), bias_up.stride(0), ranks.stride(0),
        N_SPLITS=n_splits,
        HAS_BIAS=has_bias,
        ACT=activation_code(act),
        RANK_ALIGN=8 if r_max % 8 == 0 else 1,
        BLOCK_R=pow2_at_least(r_max),
        BLOCK_N=tiles.block,
        RANK_CHUNK=rank_chunk(pow2_at_least(r_max), tiles.rank_chunk),
        FLAT=flat,
        TOKEN_RANKS=token_rank is not None,
        ADD=add,
        num_warps=tiles.warps,
    )  # fmt: skip
    return y


def flat_bounds(slice_sizes: tuple[int, ...], block_n: int
                ) -> tuple[int, tuple[int, int, int, int, int]]:  # fmt: skip
    """The FLAT expand's programs (every slice's column tiles of block_n columns) and its
    bounds (tile_end0, tile_end1, col1, col2, col3), for up to FLAT_MAX_SLICES slices: the
    tiles up to the end of slices 0 and 1, and the columns where slices 1 and 2 start and the
    last one ends. A missing third slice starts where the second ends and holds nothing."""
    sizes = [*slice_sizes, *[0] * (FLAT_MAX_SLICES - len(slice_sizes))]
    tiles = [cdiv(n, block_n) for n in sizes]
    return sum(tiles), (tiles[0], tiles[0] + tiles[1], sizes[0], sizes[0] + sizes[1], sum(sizes))
