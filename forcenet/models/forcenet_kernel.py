"""ForceNet's fused CPU edge pass: the conditional filter and the filtered message of one
interaction block in one chunked pass over the edges, with a hand-written backward.

:class:`forcenet.models.forcenet_blocks.InteractionBlock` uses it on CPU when its filter and
message have the form below (``FUSED_EDGE_PASS`` there switches it off); the result equals
the module path up to rounding (tests/models/test_forcenet_kernel.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Bytes per [chunk, H] buffer of the fused CPU edge pass, per intra-op thread (at most 8),
#: so that a chunk's whole filter MLP and message stay in cache (measured best at 1 and 2
#: threads: 1 MiB and 2 MiB).
FUSED_CHUNK_BYTES = 1 << 20


def _fused_chunk_rows(hidden: int, itemsize: int) -> int:
    threads = min(max(torch.get_num_threads(), 1), 8)
    return max(64, FUSED_CHUNK_BYTES * threads // (hidden * itemsize))


class FusedFilterMessage(torch.autograd.Function):
    """The conditional filter and the filtered message of one block in one pass over the
    edges, chunk by chunk (CPU): ``agg[i] += x[j] * W_ij`` with
    ``W_ij = MLP_tail(node_j[j] + node_i[i] + basis @ w_fused^T) * envelope``, where the tail
    is ``depth`` x (SiLU, Linear). The same ops as
    :class:`forcenet.models.forcenet_blocks.ConditionalFilter` +
    :func:`forcenet.nn.gather_mul_scatter` on row blocks of the edges, so every [E, H]
    intermediate of a chunk is still in cache when the next op reads it; only the
    pre-activations' sigmoids, the activations and the filter are kept for backward, so the
    SiLU derivative sig + act (1 - sig) needs no exp (SiLU computed as x * sigmoid(x): equal
    to F.silu up to rounding).
    Weight gradients are summed chunk by chunk (same values up to rounding).
    """

    @staticmethod
    def forward(ctx, basis, envelope, node_j, node_i, w_fused, x, j, i, *tail):
        weights, biases = tail[0::2], tail[1::2]
        depth, (num_edges, hidden) = len(weights), (j.numel(), x.shape[1])
        save = any(ctx.needs_input_grad)
        # kept for backward: sigmoid(pre-activation) 2k and activation 2k + 1 of tail layer k,
        # the filter f before the envelope last
        store: Tensor | None = x.new_empty(2 * depth + 1, num_edges, hidden) if save else None
        rows = _fused_chunk_rows(hidden, x.element_size())
        buf_a, buf_b = (x.new_empty(min(rows, num_edges), hidden) for _ in range(2))
        agg = x.new_zeros(x.shape[0], hidden)
        for c0 in range(0, num_edges, rows):
            c1 = min(c0 + rows, num_edges)
            jc, ic, n = j[c0:c1], i[c0:c1], c1 - c0
            pre = torch.index_select(node_j, 0, jc, out=buf_b[:n])
            pre.add_(torch.index_select(node_i, 0, ic, out=buf_a[:n]))
            pre.addmm_(basis[c0:c1], w_fused.t())
            for k in range(depth):
                if store is not None:  # act = pre * sigmoid(pre), the sigmoid kept for backward
                    sig = torch.sigmoid(pre, out=store[2 * k, c0:c1])
                    act = torch.mul(pre, sig, out=store[2 * k + 1, c0:c1])
                else:
                    act = torch.ops.aten.silu.out(pre, out=buf_a[:n])
                # the last tail layer writes the filter f straight into the kept store
                last = store is not None and k == depth - 1
                out = store[-1, c0:c1] if store is not None and last else buf_b[:n]
                pre = torch.addmm(biases[k], act, weights[k].t(), out=out)
            w = torch.mul(pre, envelope[c0:c1], out=buf_a[:n])  # the filter W_ij
            msg = torch.index_select(x, 0, jc, out=buf_b[:n])
            agg.index_add_(0, ic, msg.mul_(w))
        if save:
            ctx.save_for_backward(basis, envelope, node_j, node_i, w_fused, x, j, i, store, *tail)
        return agg

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        basis, envelope, node_j, node_i, w_fused, x, j, i, store, *tail = ctx.saved_tensors
        weights, biases = tail[0::2], tail[1::2]
        depth, (num_edges, hidden) = len(weights), (j.numel(), x.shape[1])
        need = ctx.needs_input_grad
        g_basis = torch.empty_like(basis) if need[0] else None
        g_env = torch.empty_like(envelope) if need[1] else None
        g_node_j = torch.zeros_like(node_j) if need[2] else None
        g_node_i = torch.zeros_like(node_i) if need[3] else None
        g_w_fused = torch.zeros_like(w_fused) if need[4] else None
        g_x = torch.zeros_like(x) if need[5] else None
        g_weights = [torch.zeros_like(w) for w in weights]
        g_biases = [torch.zeros_like(b) for b in biases]
        grad = grad.contiguous()
        rows = _fused_chunk_rows(hidden, x.element_size())
        buf_g, buf_t, buf_u = (x.new_empty(min(rows, num_edges), hidden) for _ in range(3))
        for c0 in range(0, num_edges, rows):
            c1 = min(c0 + rows, num_edges)
            jc, ic, n, env = j[c0:c1], i[c0:c1], c1 - c0, envelope[c0:c1]
            f = store[-1, c0:c1]  # filter before the envelope
            g = torch.index_select(grad, 0, ic, out=buf_g[:n])  # d agg[i] / d msg
            if g_x is not None:  # g_x[j] += g * W_ij
                w = torch.mul(f, env, out=buf_t[:n])
                g_x.index_add_(0, jc, w.mul_(g))
            g.mul_(torch.index_select(x, 0, jc, out=buf_t[:n]))  # d/d W_ij
            if g_env is not None:
                torch.sum(torch.mul(g, f, out=buf_t[:n]), dim=1, keepdim=True, out=g_env[c0:c1])
            g.mul_(env)  # d/d f
            for k in reversed(range(depth)):
                sig, act = store[2 * k, c0:c1], store[2 * k + 1, c0:c1]
                g_weights[k].addmm_(g.t(), act)
                g_biases[k].add_(g.sum(0))
                g_act = torch.mm(g, weights[k], out=buf_u[:n])
                # SiLU'(pre) = sig (1 + pre (1 - sig)) = sig + act - act sig
                d_act = torch.mul(act, sig, out=buf_g[:n])
                g = torch.sub(act, d_act, out=d_act).add_(sig).mul_(g_act)
            # g = d/d pre_0 = node_j[j] + node_i[i] + basis @ w_fused^T
            if g_node_j is not None:
                g_node_j.index_add_(0, jc, g)
            if g_node_i is not None:
                g_node_i.index_add_(0, ic, g)
            if g_w_fused is not None:
                g_w_fused.addmm_(g.t(), basis[c0:c1])
            if g_basis is not None:
                torch.mm(g, w_fused, out=g_basis[c0:c1])
        tail_grads = [t for pair in zip(g_weights, g_biases, strict=True) for t in pair]
        return g_basis, g_env, g_node_j, g_node_i, g_w_fused, g_x, None, None, *tail_grads
