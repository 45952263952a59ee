"""A fused CPU kernel for the Hinton soft-target loss, the hot op of every KD-based method.

``soft_target_terms`` returns ``(total, kl, ce, grad)`` of
L = α·T²·KL(q ‖ softmax(z/T)) + (1 − α)·CE(z, y) and dL/dz; ``methods._SoftTargetLoss``
is its autograd wrapper. Two implementations of the same formula:

- ``soft_target_terms_torch``: a dozen tensor operations; runs on any device and dtype.
- a Numba kernel for float32 logits on the CPU: one pass over each row, two exps per
  element. On a small student the torch version's per-operation overhead made a KD
  step 25–35 % slower than a supervised one (docs/performance.md); the kernel costs
  about what cross-entropy does.

``tests/engine/test_losses.py`` holds the two to the same values and gradients, and to autograd.
The kernel is compiled on first use (about a second) and cached on disk by Numba;
the worker compiles it at start-up (``warm``), so no job pays for it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

_LABELS_NONE, _LABELS_IDS, _LABELS_DIST = 0, 1, 2
_NO_IDS = np.zeros(0, dtype=np.int64)


def soft_target_terms_torch(z, q, y, temperature: float, alpha: float):
    """The loss, its terms and its closed-form gradient with tensor operations.

    d/dz = α·T·(softmax(z/T) − q)/B + (1 − α)·(softmax(z) − y)/B. ``y``: class ids
    ``[B]``, a label distribution ``[B, K]`` (mixed labels), or None when α = 1.
    ``ce`` is None when α = 1.
    """
    n = z.shape[0]
    log_p = torch.log_softmax(z * (1.0 / temperature), dim=-1)
    # KL(q ‖ p) = Σ q·log q − Σ q·log p; the first sum is a constant of the targets.
    kl = (torch.special.xlogy(q, q).sum() - torch.dot(q.reshape(-1), log_p.reshape(-1))) / n
    grad = torch.sub(log_p.exp_(), q).mul_(alpha * temperature / n)
    total = kl * (alpha * temperature * temperature)
    ce = None
    if alpha < 1.0:
        log_p1 = torch.log_softmax(z, dim=-1)
        grad.add_(log_p1.exp(), alpha=(1.0 - alpha) / n)
        if y.dim() == 1:  # class ids: subtract the one-hot rows in place
            ce = F.nll_loss(log_p1, y)
            grad.scatter_add_(1, y.unsqueeze(1), grad.new_full((n, 1), -(1.0 - alpha) / n))
        else:
            ce = -torch.dot(y.reshape(-1).to(log_p1.dtype), log_p1.reshape(-1)) / n
            grad.sub_(y, alpha=(1.0 - alpha) / n)
        total = total + ce * (1.0 - alpha)
    return total, kl, ce, grad


def soft_target_terms(z, q, y, temperature: float, alpha: float):
    """``soft_target_terms_torch``'s result, from the fused kernel where it applies."""
    if not _kernel_applies(z, q, y):
        return soft_target_terms_torch(z, q, y, temperature, alpha)
    n = z.shape[0]
    grad = torch.empty_like(z)
    out = torch.empty(3, dtype=torch.float32)  # total, kl, ce
    mode = _LABELS_NONE if alpha >= 1.0 else (_LABELS_IDS if y.dim() == 1 else _LABELS_DIST)
    ids = y.numpy() if mode == _LABELS_IDS else _NO_IDS
    dist = y.numpy() if mode == _LABELS_DIST else q.numpy()  # unread unless mode is _LABELS_DIST
    _compiled()(
        z.detach().numpy(), q.numpy(), ids, dist, mode,
        1.0 / temperature, alpha * temperature / n, (1.0 - alpha) / n, alpha * temperature * temperature,
        grad.numpy(), out.numpy(),
    )  # fmt: skip
    total, kl, ce = out.unbind()
    return total, kl, (ce if mode != _LABELS_NONE else None), grad


def _kernel_applies(z, q, y) -> bool:
    # Contiguity matters: the kernel walks rows of the raw buffers.
    if z.device.type != "cpu" or z.dtype != torch.float32 or q.dtype != torch.float32 or z.dim() != 2:
        return False
    if not (z.is_contiguous() and q.is_contiguous() and q.shape == z.shape):
        return False
    if y is None:
        return True
    if y.dim() == 1:
        return y.dtype == torch.int64 and y.is_contiguous()
    return y.dtype == torch.float32 and y.is_contiguous() and y.shape == z.shape


_KERNEL = None


def _compiled():
    """The Numba kernel, compiled (or loaded from Numba's disk cache) on first call."""
    global _KERNEL
    if _KERNEL is None:
        import numba  # imported here: only CPU training needs it, and it takes a few hundred ms

        try:
            _KERNEL = numba.njit(cache=True, nogil=True, error_model="numpy")(_soft_target_rows)
        except RuntimeError:  # no writable cache location (read-only install, no home): compile per process
            _KERNEL = numba.njit(nogil=True, error_model="numpy")(_soft_target_rows)
    return _KERNEL


def warm() -> None:
    """Compile the kernel now (a worker calls this once at start, before its first job)."""
    z = torch.zeros(2, 3)
    q = torch.full((2, 3), 1 / 3)
    soft_target_terms(z, q, torch.zeros(2, dtype=torch.int64), 2.0, 0.5)
    soft_target_terms(z, q, q, 2.0, 0.5)


def _soft_target_rows(z, q, ids, dist, mode, inv_t, w_soft, w_hard, w_kl, grad, out):
    """Per row: one pass for the two softmax sums (exps kept in ``grad``), one for the gradient.

    With d = z − max(z): log softmax(z/T)_j = d_j/T − lse_T, so
    KL_i = Σ q log q − (Σ q·d)/T + (Σ q)·lse_T, and CE_i = lse_1 − d_y (class ids) or
    (Σ y)·lse_1 − Σ y·d (a label distribution). Sums accumulate in float64.
    """
    n, k = z.shape
    e1 = np.empty(k, dtype=np.float32)
    kl_sum = 0.0
    ce_sum = 0.0
    for i in range(n):
        m = z[i, 0]
        for j in range(1, k):
            m = max(m, z[i, j])
        s_t = 0.0
        s_1 = 0.0
        q_d = 0.0
        q_log_q = 0.0
        q_sum = 0.0
        for j in range(k):
            d = z[i, j] - m
            e_t = np.exp(d * np.float32(inv_t))
            e1[j] = np.exp(d)
            grad[i, j] = e_t
            s_t += e_t
            s_1 += e1[j]
            qj = q[i, j]
            q_sum += qj
            q_d += qj * d
            if qj > 0.0:  # xlogy: 0·log 0 = 0
                q_log_q += qj * math.log(qj)
        kl_sum += q_log_q - q_d * inv_t + q_sum * math.log(s_t)
        a_t = w_soft / s_t
        a_1 = w_hard / s_1 if mode != _LABELS_NONE else 0.0
        for j in range(k):
            grad[i, j] = a_t * grad[i, j] - w_soft * q[i, j] + a_1 * e1[j]
        if mode == _LABELS_IDS:
            yi = ids[i]
            if yi < 0 or yi >= k:  # no bounds checks in compiled code: a bad label would read past the row
                raise IndexError("a class id is outside [0, num_classes)")
            ce_sum += math.log(s_1) - (z[i, yi] - m)
            grad[i, yi] -= w_hard
        elif mode == _LABELS_DIST:
            y_d = 0.0
            y_sum = 0.0
            for j in range(k):
                yj = dist[i, j]
                y_sum += yj
                y_d += yj * (z[i, j] - m)
                grad[i, j] -= w_hard * yj
            ce_sum += y_sum * math.log(s_1) - y_d
    kl = kl_sum / n
    ce = ce_sum / n
    out[0] = w_kl * kl + (n * w_hard) * ce  # α·T²·KL + (1 − α)·CE; w_hard = (1 − α)/n
    out[1] = kl
    out[2] = ce
