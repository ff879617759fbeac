"""Activation functions studied in the four source documents, behind one registry.

Every activation is an nn.Module that accepts a tensor of any shape; "per channel" means dimension 1
(NCHW feature maps or NC features).  Models never instantiate these classes directly: they call a
*factory* ``act(num_channels) -> nn.Module`` made by :func:`make_factory`, so ``--act`` swaps every
nonlinearity of a network and ``--act-scope`` decides how parameters are shared:

* ``network``: one instance (one set of parameters) shared by every layer -- what Dai et al. 2021 did
  for PReLU / PSiLU / PSoftplus / PSSiLU (1-2 parameters in the whole network);
* ``layer``:   one instance per layer, scalar parameters;
* ``channel``: one instance per layer with one parameter (set) per channel -- what KAF does
  (Scardapane et al. 2019).

Imports only torch (and Triton when it is installed, for the fused KAF kernel on CUDA), so the file
can be copied into another project as it is.
"""
import contextlib
import math
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # optional: a fused KAF kernel for CUDA (Triton ships with CUDA builds of torch)
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: KAF uses the loop in KAFFunction
    triton = None


def _per_channel(param, x):
    """Broadcast a parameter of shape (C,) or (1,) against x whose channel dimension is 1."""
    if param.numel() == 1:
        return param.reshape(())
    return param.reshape((1, -1) + (1,) * (x.dim() - 2))


class _Parametric(nn.Module):
    """Base for activations with scalar-per-scope parameters; ``channels`` = 1 unless scope is channel."""

    def __init__(self, channels=1):
        super().__init__()
        self.channels = channels

    def _param(self, init):
        return nn.Parameter(torch.full((self.channels,), float(init)))

    def extra_repr(self):
        return f"channels={self.channels}"


# ----------------------------------------------------------------------------------- fixed activations
class ReLU(nn.Module):
    """relu(x) = max(0, x)."""

    def forward(self, x):
        return F.relu(x)


class ELU(nn.Module):
    """elu(x) = x if x > 0 else exp(x) - 1  (Clevert et al. 2016; the KAF thesis's init target)."""

    def forward(self, x):
        return F.elu(x)


class Softplus(nn.Module):
    """softplus(x) = (1/beta) log(1 + exp(beta x)).  beta=1; Smooth Adversarial Training (Xie et al.
    2020) also uses beta=10, a smooth ReLU look-alike."""

    def __init__(self, beta=1.0):
        super().__init__()
        self.beta = float(beta)

    def forward(self, x):
        return F.softplus(x, beta=self.beta)

    def extra_repr(self):
        return f"beta={self.beta}"


class SiLU(nn.Module):
    """silu(x) = swish(x) = x * sigmoid(x)  (Xie et al. 2020, Smooth Adversarial Training)."""

    def forward(self, x):
        return F.silu(x)


class GELU(nn.Module):
    """gelu(x) = x * Phi(x), Phi the standard normal CDF  (Xie et al. 2020)."""

    def forward(self, x):
        return F.gelu(x)


class MReLU(nn.Module):
    """Mirrored ReLU, a symmetric tent with peak 1 at 0: mrelu(x) = min(relu(1 - x), relu(1 + x)).
    Zhao & Griffin 2016, "Suppressing the unusual": it zeroes signals of unusual magnitude either way."""

    def forward(self, x):
        return torch.minimum(F.relu(1 - x), F.relu(1 + x))


class RBF(nn.Module):
    """Gaussian radial basis unit rbf(x) = exp(-x^2)  (Zhao & Griffin 2016); symmetric and bounded."""

    def forward(self, x):
        return torch.exp(-x * x)


class KWTA(nn.Module):
    """k-Winners-Take-All (Xiao et al. 2020): per sample keep the k = ceil(gamma * C*H*W) largest
    values and zero the rest.  Ties at the threshold are kept.  Its discontinuity masks gradients,
    which is why the KAF thesis uses it as a robustness baseline that attacks must see through."""

    def __init__(self, gamma=0.1):
        super().__init__()
        if not 0 < gamma <= 1:
            raise ValueError(f"kwta gamma must be in (0, 1], got {gamma}")
        self.gamma = float(gamma)

    def forward(self, x):
        flat = x.flatten(1)
        k = max(1, math.ceil(self.gamma * flat.shape[1]))
        threshold = flat.topk(k, dim=1).values[:, -1:]
        return (flat * (flat >= threshold)).view_as(x)

    def extra_repr(self):
        return f"gamma={self.gamma}"


# ------------------------------------------------------------------------------ parametric (Dai et al.)
class PReLU(_Parametric):
    """prelu(x) = x if x > 0 else a x  (He et al. 2015).  a = 0 at init as in Dai et al. 2021
    (PyTorch's default is 0.25)."""

    def __init__(self, channels=1, init=0.0):
        super().__init__(channels)
        self.a = self._param(init)

    def forward(self, x):
        return torch.where(x > 0, x, _per_channel(self.a, x) * x)


def _float(t):
    """t in float32 (float64 stays): the parametric units compute in it whatever autocast gave them."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _grads_needed(ctx):
    """Which inputs' gradients this backward pass uses: ``ctx.needs_input_grad`` and, where torch can
    tell, whether the pass goes on from that input.  An attack's ``torch.autograd.grad(loss, x)``
    needs no parameter gradient, and for KAF dL/dalpha costs a product and a reduction per kernel.  Torch cannot tell for a leaf that autograd.grad asked for, under torch.compile's
    tracing or in old versions: then every requires-grad input counts as needed."""
    needed = list(ctx.needs_input_grad)
    for i, need in enumerate(needed):
        if need:
            try:
                node = ctx.next_functions[i][0]
                needed[i] = node is None or bool(torch._C._will_engine_execute_node(node))
            except (AttributeError, RuntimeError, TypeError):
                pass
    return needed


class ShiftedSiLUFunction(torch.autograd.Function):
    """f(x) = x (sigmoid(a x) - b) / (1 - b) for broadcastable a > 0, 0 <= b < 1 (b None: 0, PSiLU),
    keeping only x, a and b for backward (autograd on the formula keeps about 3 tensors of x's size):
        df/dx = (s - b + a x s (1 - s)) / (1 - b),   df/da = x^2 s (1 - s) / (1 - b),
        df/db = x (s - 1) / (1 - b)^2,               s = sigmoid(a x).
    In-place arithmetic keeps full-size temporaries to one in forward and three in backward; (1 - b)
    is constant over the summed dimensions, so the parameter gradients are divided after summing.
    Returns x's dtype (bf16 under autocast), computes in float32."""

    @staticmethod
    def forward(ctx, x, a, b):
        ctx.save_for_backward(x, a, b)
        xf = _float(x)
        out = torch.mul(a, xf).sigmoid_()
        if b is not None:
            out.sub_(b).div_(1 - b)
        return out.mul_(xf).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, a, b = ctx.saved_tensors
        need_x, need_a, need_b = _grads_needed(ctx)
        xf, g = _float(x), _float(grad_out)
        s = torch.mul(a, xf).sigmoid_()
        t = s.neg().add_(1).mul_(s).mul_(g).mul_(xf)  # g x s (1 - s)
        grad_x = grad_a = grad_b = None
        if need_x:
            grad_x = (torch.mul(s, g) if b is None else torch.sub(s, b).mul_(g)).addcmul_(t, a)
            grad_x = (grad_x if b is None else grad_x.div_(1 - b)).to(x.dtype)
        if need_a:
            grad_a = t.mul_(xf).sum_to_size(a.shape)
            grad_a = grad_a if b is None else grad_a / (1 - b)
        if need_b:
            grad_b = s.sub_(1).mul_(g).mul_(xf).sum_to_size(b.shape) / (1 - b) ** 2
        return grad_x, grad_a, grad_b


class ScaledSoftplusFunction(torch.autograd.Function):
    """f(x) = softplus(a x) / a for broadcastable a > 0, with
        df/dx = sigmoid(a x),   df/da = (x sigmoid(a x) - f(x)) / a.
    Keeps x and, in float32/float64, its own output for backward: the next layer keeps that same
    tensor as its input, so it costs no memory, and backward needs one sigmoid instead of a
    sigmoid and a softplus.  A low-precision output (bf16 under autocast) is not reused: x s - f
    cancels for large inputs, so f is recomputed in float32 from x.  Returns x's dtype."""

    @staticmethod
    def forward(ctx, x, a):
        xf = _float(x)
        out = F.softplus(torch.mul(a, xf)).div_(a).to(x.dtype)
        ctx.save_for_backward(x, a, out if out.dtype == xf.dtype else None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, a, out = ctx.saved_tensors
        xf, g = _float(x), _float(grad_out)
        s = torch.mul(a, xf).sigmoid_()
        need_x, need_a = _grads_needed(ctx)
        grad_a = None
        if need_a:
            f = out if out is not None else F.softplus(torch.mul(a, xf)).div_(a)
            grad_a = torch.mul(xf, s).sub_(f).mul_(g).sum_to_size(a.shape) / a  # a constant over the sum
        grad_x = s.mul_(g).to(x.dtype) if need_x else None
        return grad_x, grad_a


class PSiLU(_Parametric):
    """psilu(x) = x * sigmoid(|a| x), a = 1 at init  (Dai et al. 2021); see :class:`ShiftedSiLUFunction`."""

    def __init__(self, channels=1, init=1.0):
        super().__init__(channels)
        self.a = self._param(init)

    def forward(self, x):
        return ShiftedSiLUFunction.apply(x, _per_channel(self.a.abs(), x), None)


class PSoftplus(_Parametric):
    """psoftplus(x) = (1/|a|) softplus(|a| x), a = 1 at init  (Dai et al. 2021); see
    :class:`ScaledSoftplusFunction`.  |a| is floored at 1e-6 to avoid dividing by zero."""

    def __init__(self, channels=1, init=1.0):
        super().__init__(channels)
        self.a = self._param(init)

    def forward(self, x):
        return ScaledSoftplusFunction.apply(x, _per_channel(self.a.abs().clamp_min(1e-6), x))


class PSSiLU(_Parametric):
    """Parametric shifted SiLU (Dai et al. 2021):
        pssilu(x) = x * (sigmoid(|a| x) - beta) / (1 - beta),   beta = b_max * tanh(|b| / b_max),
    a = 1, beta = 1e-8 at init (not 0: |.| has zero gradient at 0).  With beta > 0 the unit outputs
    positive values for negative inputs, the shape property Dai et al. tie to robustness.

    beta must stay below 1 (at 1 the division blows up).  The authors' code leaves |b| unbounded and
    relies on an L1 penalty on it and a clipped gradient (both here too: --pssilu-reg,
    --pssilu-beta-clip); a hard clamp of |b| instead has zero gradient past the bound, so a b that
    overshoots stays at gain 1/(1 - b_max) and training diverges (seen: b moved 0.15 in one step at
    LR 0.2).  The smooth bound tanh keeps beta in [0, b_max) with d beta / d|b| = 1 - (beta/b_max)^2 > 0
    everywhere, equal to the authors' beta = |b| for small b (< 1e-3 apart below |b| = 0.1).
    ``init_b`` is the initial beta.  Computed by :class:`ShiftedSiLUFunction`, which keeps only x for
    backward."""

    b_max = 1 - 1e-3

    def __init__(self, channels=1, init_a=1.0, init_b=1e-8):
        super().__init__(channels)
        if not 0 <= init_b < self.b_max:
            raise ValueError(f"pssilu init_b must be in [0, {self.b_max}), got {init_b}")
        self.a = self._param(init_a)
        self.b = self._param(self.b_max * math.atanh(init_b / self.b_max))

    def beta(self):
        """The shift beta = b_max tanh(|b| / b_max) in [0, b_max), per channel."""
        return self.b_max * torch.tanh(self.b.abs() / self.b_max)

    def forward(self, x):
        return ShiftedSiLUFunction.apply(x, _per_channel(self.a.abs(), x), _per_channel(self.beta(), x))


def pssilu_l1(model):
    """sum of beta over the model's PSSiLU units: Dai et al.'s L1 penalty on the shift (times --pssilu-reg)."""
    return sum(m.beta().sum() for m in activation_modules(model) if isinstance(m, PSSiLU))


# Dai et al.'s trainers clip the gradient norm of PSSiLU's shift to 0.01 every step (0.1 in their
# TRADES trainer: train_pgd.py sets that one); --pssilu-beta-clip overrides it
PSSILU_SHIFT_GRAD_CLIP = 0.01


def pssilu_shift_parameters(model):
    """The b parameters of the model's PSSiLU units (their gradient norm is clipped on its own)."""
    return [m.b for m in activation_modules(model) if isinstance(m, PSSiLU)]


# --------------------------------------------------------------------------------------------- KAF
def kaf_dictionary(size=20, boundary=3.0, gamma_rule="paper"):
    """Dictionary d = linspace(-B, B, D) and bandwidth gamma of a Gaussian KAF.

    gamma_rule 'paper' gives gamma = 1/(6 Delta^2) (Scardapane et al. 2019); 'code' gives the
    reference code's 1/(8 Delta^2).  Delta = d_2 - d_1."""
    d = torch.linspace(-boundary, boundary, size)
    delta = (d[1] - d[0]).item()
    gamma = {"paper": 1 / (6 * delta ** 2), "code": 1 / (8 * delta ** 2)}[gamma_rule]
    return d, gamma


KAF_KERNELS = ("gaussian", "relu", "softplus")


def _check_kaf_kernel(kernel):
    if kernel not in KAF_KERNELS:
        raise ValueError(f"kaf kernel must be one of {', '.join(KAF_KERNELS)}, got {kernel!r}")


def kaf_kernel(u, kernel="gaussian", gamma=1.0):
    """The kernel k(u) of a KAF evaluated at u = s - d_i:
        gaussian  exp(-gamma u^2)      (Scardapane et al. 2019; the default, bounded)
        relu      max(0, u)            (reference code's option: f is a linear spline with knots d_i)
        softplus  log(1 + exp(u))      (reference code's option: a smooth version of the relu one)
    gamma only matters for the Gaussian; the other two kernels have no bandwidth in the reference
    code.  With relu / softplus kernels f grows linearly to the right of the dictionary (slope
    sum_i alpha_i) and vanishes to its left, so unlike the Gaussian KAF it is unbounded."""
    _check_kaf_kernel(kernel)
    if kernel == "gaussian":
        return torch.exp(-gamma * u * u)
    if kernel == "relu":
        return F.relu(u)
    return F.softplus(u)


def kaf_ridge_init(d, gamma, target=F.elu, eps=1e-4, kernel="gaussian"):
    """Mixing coefficients that make the KAF approximate ``target`` by kernel ridge regression.

    Gaussian kernel: on the dictionary itself, alpha = (K + eps I)^-1 t(d), K_ij = exp(-gamma (d_i - d_j)^2).
    relu / softplus kernels: their matrix k(d_i - d_j) is singular (relu: zero diagonal), so fit on a
    grid s of 10 D points over [-B, 2B] instead: alpha = (P^T P + eps I)^-1 P^T t(s), P_ni = k(s_n - d_i).
    The grid reaches past the dictionary on the right because these kernels keep growing there: it
    pins the slope beyond B (to ELU's 1; on [-B, B] alone the softplus fit extrapolates with slope ~2).
    Both kernels vanish to the left of d_1, so near -B the fit to ELU (which tends to -1) is loose."""
    d = d.double()
    if kernel == "gaussian":
        K = torch.exp(-gamma * (d[:, None] - d[None, :]) ** 2)
        alpha = torch.linalg.solve(K + eps * torch.eye(len(d), dtype=d.dtype), target(d))
        return alpha.float()
    s = torch.linspace(d[0].item(), 2 * d[-1].item(), 10 * len(d), dtype=d.dtype)
    P = kaf_kernel(s[:, None] - d[None, :], kernel, gamma)
    alpha = torch.linalg.solve(P.T @ P + eps * torch.eye(len(d), dtype=d.dtype), P.T @ target(s))
    return alpha.float()


def kaf_naive(x, alpha, d, gamma, kernel="gaussian"):
    """Reference KAF: f(s) = sum_i alpha_i k(s - d_i) with an explicit kernel tensor of shape
    x.shape + (D,) (:func:`kaf_kernel`; Gaussian k(u) = exp(-gamma u^2) by default).  Autograd keeps
    that tensor for backward (about D times ReLU's memory): the reference for tests and
    ``impl='naive'``; :class:`KAFFunction` is what a KAF uses without the fused kernels."""
    a = alpha.reshape((1, alpha.shape[0]) + (1,) * (x.dim() - 2) + (alpha.shape[1],))
    if alpha.shape[0] == 1:
        a = alpha.reshape(alpha.shape[1])
    k = kaf_kernel(x.unsqueeze(-1) - d, kernel, gamma)
    return (k * a).sum(-1)


def _kaf_longest_run(gamma, step, at_most):
    """Most equally spaced Gaussian kernels one pair of exps may cover: (L-1) Delta <= 4/sqrt(gamma)
    (10 for the paper's gamma; see KAFFunction._runs)."""
    return min(at_most, 1 + int(4 / math.sqrt(gamma * step * step))) if step else at_most


def _kaf_equally_spaced(d_values, i, j, float64):
    """Whether d_i..d_j have the spacing of d_i, d_i+1 to the precision of the computation (so a
    float32 dictionary counts as equally spaced in float32, not in float64)."""
    step = d_values[i + 1] - d_values[i]
    tol = (1e-12 if float64 else 1e-5) * abs(step)
    return all(abs((d_values[k + 1] - d_values[k]) - step) <= tol for k in range(i, j))


def _kaf_t_max(gamma, float64):
    """|s - c| past which a run's first kernel exp(-gamma t^2) would leave the normal floats."""
    return math.sqrt((700.0 if float64 else 87.0) / gamma)


class KAFFunction(torch.autograd.Function):
    """Memory-efficient KAF: saves only the input and recomputes the kernels in backward.

    An exp costs about ten times an add on a CPU, so the kernels are not evaluated one exp each.
    Equally spaced centres c + m Delta (m = 0..L-1, a *run*) follow from two exps per run:
        k_m(s) = exp(-gamma (t - m Delta)^2) = P rho^m exp(-gamma m^2 Delta^2),
        P = exp(-gamma t^2),  rho = exp(2 gamma Delta t),  t = s - c,
    so each kernel costs one multiply (E <- E rho) and one multiply-add, and the constants
    exp(-gamma m^2 Delta^2) go into the coefficients.  Runs are short and t is clamped
    (:meth:`_runs`) so that nothing under- or overflows; a dictionary that is not equally spaced
    gets shorter runs (down to one exp per kernel).  Backward uses the closed forms
        df/ds        = sum_i alpha_i (-2 gamma (s - d_i)) k_i(s),   s - d_i = t - m Delta in a run,
        dL/dalpha_ci = sum_{n,h,w} g * k_i(s)          (per channel c; over everything for shared alpha).
    The relu and softplus kernels (``kernel``) have no such runs: one kernel at a time, with
    df/ds = sum_i alpha_i k'(s - d_i), k' = 1[u > 0] or sigmoid(u).
    Computes in float32 (float64 when given float64) whatever the autocast dtype and returns the
    input's dtype.  Peak extra memory is a few tensors of the input's size instead of D of them."""

    @staticmethod
    def _runs(d_values, gamma, float64=False, kernel="gaussian"):
        """(first index, length, spacing) of each run of equally spaced centres.

        t = s - c is clamped to +-sqrt(87/gamma) (700 in float64), where the run's first kernel
        reaches exp(-87), the smallest normal float32: no exp ever underflows (one whose result does
        is 6-15x slower on a CPU) and rho <= exp(2 sqrt(87 gamma Delta^2)) cannot overflow.  Past the
        clamp a run's kernels keep their values there, at most exp(-(sqrt(87) - 4)^2) = 5e-13 when
        it spans (L-1) Delta <= 4/sqrt(gamma): 10 kernels for the paper's gamma (D=20: two runs)."""
        if kernel != "gaussian":  # nothing to share between kernels: each is a run of one
            return [(i, 1, 0.0) for i in range(len(d_values))]
        runs, i, n = [], 0, len(d_values)
        while i < n:
            j = i + 1  # extend while the spacing stays that of the first pair
            while j + 1 < n and _kaf_equally_spaced(d_values, i, j + 1, float64):
                j += 1
            length = j - i + 1 if j < n else 1
            step = (d_values[i + length - 1] - d_values[i]) / max(1, length - 1)
            pieces = -(-length // _kaf_longest_run(gamma, step, length))
            for p in range(pieces):
                a, b = i + p * length // pieces, i + (p + 1) * length // pieces
                runs.append((a, b - a, step))
            i += length
        return runs

    @staticmethod
    def _scales(runs, gamma, x):
        """exp(-gamma m^2 Delta^2) for kernel first + m of each run, shape (D,): k_i = scale_i E.
        Made on x's device (a tensor from a Python list would be a host-to-GPU copy per call)."""
        m_delta = torch.cat([torch.arange(length, dtype=x.dtype, device=x.device) * step for _, length, step in runs])
        return m_delta.square_().mul_(-gamma).exp_()

    @staticmethod
    def _terms(x, gamma, d_values, kernel):
        """What forward and backward both start from: x in float32 (float64 stays), the runs, the
        clamp for t and the per-kernel scales."""
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        float64 = xf.dtype == torch.float64
        runs = KAFFunction._runs(d_values, gamma, float64, kernel)
        t_max = _kaf_t_max(gamma, float64) if kernel == "gaussian" else math.inf
        return xf, runs, t_max, KAFFunction._scales(runs, gamma, xf)

    @staticmethod
    def _kernels(xs, run, gamma, t_max, d_values, t, rho, e, kernel="gaussian", value=True, derivative=False):
        """Yield (index, m, E) for the kernels of one run, E = k_i(s) / exp(-gamma m^2 Delta^2),
        in the buffers t (the clamped s - c, kept for backward), rho and e (input-sized).  For the
        relu / softplus kernels: (i, 0, k(s - d_i)) if ``value`` (else e is not written), and with
        ``derivative`` rho = k'(s - d_i)."""
        first, length, step = run
        if kernel != "gaussian":
            u = torch.sub(xs, d_values[first], out=t)
            if kernel == "relu":
                if value:
                    torch.clamp(u, min=0, out=e)
                if derivative:
                    torch.sign(u, out=rho).clamp_(min=0)  # 0 at u = 0, as autograd's relu
            else:  # max(u, 0) + log(1 + exp(-|u|)): on a CPU torch's softplus and log1p are 4x slower
                if value:
                    torch.abs(u, out=e).neg_().exp_().add_(1).log_().add_(torch.clamp(u, min=0, out=rho))
                if derivative:
                    torch.sigmoid(u, out=rho)
            yield first, 0, e
            return
        torch.sub(xs, d_values[first], out=t).clamp_(-t_max, t_max)
        torch.mul(t, t, out=e).mul_(-gamma).exp_()
        if length > 1:
            torch.mul(t, 2 * gamma * step, out=rho).exp_()
        for m in range(length):
            if m:
                e.mul_(rho)
            yield first + m, m, e

    @staticmethod
    def _row_chunks(x, elements=2 ** 18):
        """Slices of the batch dimension the loop works through one at a time.  On a CPU about 2^18
        elements each: the loop's few temporaries (1 MiB each) then stay in cache across the D
        kernels, 1.2-1.8x faster than whole-tensor passes (measured on lenet / resnet-sized maps).
        On a GPU the whole tensor: more, smaller launches would only cost."""
        n = x.shape[0]
        rows = n if x.is_cuda else max(1, elements // max(1, math.prod(x.shape[1:])))
        return [slice(i, i + rows) for i in range(0, n, rows)] or [slice(0, 0)]

    @staticmethod
    def forward(ctx, x, alpha, d, gamma, d_values, kernel="gaussian"):
        # d_values: the dictionary as Python floats; reading d itself (.tolist()) would make the GPU
        # wait for the host at every KAF layer, forward and backward
        _check_kaf_kernel(kernel)  # _kernels would take any other name for softplus
        ctx.save_for_backward(x, alpha)
        ctx.gamma, ctx.d_values, ctx.kernel = gamma, d_values, kernel
        xf, runs, t_max, scales = KAFFunction._terms(x, gamma, d_values, kernel)
        w = alpha.to(xf.dtype) * scales
        out = torch.zeros_like(xf)
        for rows in KAFFunction._row_chunks(xf):
            xs, o = xf[rows], out[rows]
            t, rho, e = torch.empty_like(xs), torch.empty_like(xs), torch.empty_like(xs)
            for run in runs:
                for i, _, k in KAFFunction._kernels(xs, run, gamma, t_max, d_values, t, rho, e, kernel):
                    o.addcmul_(k, _per_channel(w[:, i], xs))
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, alpha = ctx.saved_tensors
        gamma, d_values, kernel = ctx.gamma, ctx.d_values, ctx.kernel
        xf, runs, t_max, scales = KAFFunction._terms(x, gamma, d_values, kernel)
        w = alpha.to(xf.dtype) * scales
        g = grad_out.to(xf.dtype)
        per_channel = alpha.shape[0] > 1
        need_x, need_alpha = _grads_needed(ctx)[:2]
        grad_x = torch.empty_like(xf) if need_x else None
        grad_alpha = torch.zeros(alpha.shape, dtype=xf.dtype, device=x.device) if need_alpha else None
        reduce_dims = [0] + list(range(2, x.dim())) if per_channel else list(range(x.dim()))
        gaussian = kernel == "gaussian"
        run_sums = need_x and gaussian  # per run: slope -= 2 gamma sum_m w_m k_m (t - m Delta), clamped t
        for rows in KAFFunction._row_chunks(xf):
            xs, gs = xf[rows], g[rows]
            t, rho, e, gk = (torch.empty_like(xs) for _ in range(4))
            if need_x:
                slope = torch.zeros_like(xs)
            if run_sums:
                f, fm = torch.empty_like(xs), torch.empty_like(xs)
            for run in runs:
                if run_sums:
                    f.zero_()
                    fm.zero_()
                for i, m, k in KAFFunction._kernels(xs, run, gamma, t_max, d_values, t, rho, e, kernel,
                                                    value=gaussian or need_alpha, derivative=need_x):
                    if run_sums:
                        wi = _per_channel(w[:, i], xs)
                        f.addcmul_(k, wi)
                        fm.addcmul_(k, wi, value=m)
                    elif need_x:  # rho holds k'(s - d_i)
                        slope.addcmul_(rho, _per_channel(w[:, i], xs))
                    if need_alpha:
                        grad_alpha[:, i] += torch.mul(gs, k, out=gk).sum(reduce_dims).reshape(-1)
                if run_sums:
                    slope.addcmul_(t, f).sub_(fm, alpha=run[2])
            if need_x:
                grad_x[rows] = slope.mul_(gs).mul_(-2 * gamma if gaussian else 1)
        if need_x:
            grad_x = grad_x.to(x.dtype)
        if need_alpha:
            grad_alpha = grad_alpha.mul_(scales).to(alpha.dtype)
        return grad_x, grad_alpha, None, None, None, None


# Fused KAF kernels (Triton).  One pass over the input per direction, all D kernels in registers:
# the loop in KAFFunction costs ~3 tensor-sized memory passes per kernel, this one pass in total,
# which is what makes KAF cost about as much as ReLU on a GPU.  The tensor is viewed as
# (outer, C, inner) -- NCHW: (N, C, HW); channels_last and (N, C): (N*H*W or N, C, 1) -- and each
# program handles a tile of BLOCK_P positions x BLOCK_C channels of it.  TRITON_INTERPRET=1 runs the
# same kernels on CPU tensors, which is how the tests check them on a machine without a GPU.
KAF_IMPLS = ("auto", "triton", "loop", "naive")

if triton is not None:
    @triton.jit
    def _kaf_kernel_and_slope(u, gamma, KERNEL: tl.constexpr):
        """k(u) and k'(u) of the three KAF kernels (0 gaussian, 1 relu, 2 softplus)."""
        if KERNEL == 0:
            k = tl.exp(-gamma * u * u)
            return k, -2.0 * gamma * u * k
        elif KERNEL == 1:
            return tl.maximum(u, 0.0), (u > 0).to(u.dtype)
        else:
            e = tl.exp(-tl.abs(u))
            return tl.maximum(u, 0.0) + tl.log(1.0 + e), tl.where(u >= 0, 1.0 / (1.0 + e), e / (1.0 + e))

    @triton.jit
    def _kaf_tile(t, pid_c, P, C, INNER, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """Offsets, mask and channel indices of tile t of the (outer, C, inner) view."""
        p = t * BLOCK_P + tl.arange(0, BLOCK_P)
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        offsets = ((p // INNER) * C * INNER + p % INNER)[:, None] + (c * INNER)[None, :]
        return offsets, (p < P)[:, None] & (c < C)[None, :], c

    @triton.jit
    def _kaf_run_start(x, d_first, gamma, step, t_max, KERNEL: tl.constexpr):
        """t = x - c at a run's first centre c and, for the Gaussian, E = exp(-gamma t^2) and
        rho = exp(2 gamma Delta t) with t clamped to +-t_max: the run's kernels are E, E rho,
        E rho^2, ... times constants folded into alpha (as in KAFFunction; two exps per run)."""
        t = x - d_first
        if KERNEL == 0:
            t = tl.minimum(tl.maximum(t, -t_max), t_max)
            return t, tl.exp(-gamma * t * t), tl.exp(2.0 * gamma * step * t)
        else:
            return t, t, t

    @triton.jit
    def _kaf_run_kernel(t, e, rho, m: tl.constexpr, step, gamma, KERNEL: tl.constexpr):
        """E for kernel m of a run (E rho after the first) and that kernel's k and k' (up to the
        folded constant), centre c + m step."""
        if KERNEL == 0:
            if m > 0:
                e = e * rho
            return e, e, -2.0 * gamma * (t - m * step) * e
        else:
            k, dk = _kaf_kernel_and_slope(t - m * step, gamma, KERNEL)
            return e, k, dk

    @triton.jit
    def _kaf_forward_kernel(x_ptr, alpha_ptr, d_ptr, out_ptr, P, C, INNER, alpha_stride, gamma, step,
                            t_max, D: tl.constexpr, RUN: tl.constexpr, KERNEL: tl.constexpr,
                            COMPUTE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        offsets, mask, c = _kaf_tile(tl.program_id(0), tl.program_id(1), P, C, INNER, BLOCK_P, BLOCK_C)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
        f = tl.zeros((BLOCK_P, BLOCK_C), COMPUTE)
        for r in tl.static_range(D // RUN):
            t, e, rho = _kaf_run_start(x, tl.load(d_ptr + r * RUN).to(COMPUTE), gamma, step, t_max, KERNEL)
            for m in tl.static_range(RUN):
                e, k, _ = _kaf_run_kernel(t, e, rho, m, step, gamma, KERNEL)
                a = tl.load(alpha_ptr + c * alpha_stride + r * RUN + m, mask=c < C, other=0.0).to(COMPUTE)
                f += a[None, :] * k
        tl.store(out_ptr + offsets, f.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _kaf_backward_kernel(x_ptr, g_ptr, alpha_ptr, d_ptr, grad_x_ptr, partial_ptr, P, C, INNER, alpha_stride,
                             gamma, step, t_max, num_tiles, D: tl.constexpr, D_PAD: tl.constexpr,
                             RUN: tl.constexpr, KERNEL: tl.constexpr, COMPUTE: tl.constexpr,
                             BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, NEED_X: tl.constexpr,
                             NEED_ALPHA: tl.constexpr):
        # grid-stride over tiles so each program sums many tiles' dL/dalpha before writing its
        # (BLOCK_C, D) partial: a deterministic reduction (no atomics) into a small buffer
        pid_p, pid_c = tl.program_id(0), tl.program_id(1)
        cols = tl.arange(0, D_PAD)
        grad_alpha = tl.zeros((BLOCK_C, D_PAD), COMPUTE)
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        for tile in range(pid_p, num_tiles, tl.num_programs(0)):
            offsets, mask, c = _kaf_tile(tile, pid_c, P, C, INNER, BLOCK_P, BLOCK_C)
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
            g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)  # 0 outside: no contribution
            slope = tl.zeros((BLOCK_P, BLOCK_C), COMPUTE)
            for r in tl.static_range(D // RUN):
                t, e, rho = _kaf_run_start(x, tl.load(d_ptr + r * RUN).to(COMPUTE), gamma, step, t_max, KERNEL)
                for m in tl.static_range(RUN):
                    e, k, dk = _kaf_run_kernel(t, e, rho, m, step, gamma, KERNEL)
                    if NEED_X:
                        a = tl.load(alpha_ptr + c * alpha_stride + r * RUN + m, mask=c < C, other=0.0).to(COMPUTE)
                        slope += a[None, :] * dk
                    if NEED_ALPHA:
                        grad_alpha += tl.where(cols[None, :] == r * RUN + m, tl.sum(g * k, axis=0)[:, None], 0.0)
            if NEED_X:
                tl.store(grad_x_ptr + offsets, (g * slope).to(grad_x_ptr.dtype.element_ty), mask=mask)
        if NEED_ALPHA:
            tl.store(partial_ptr + (pid_p * C + c)[:, None] * D + cols[None, :], grad_alpha,
                     mask=(c < C)[:, None] & (cols < D)[None, :])


def _kaf_layout(x):
    """x as a dense tensor in NCHW or channels_last order, and its (positions, C, inner) view."""
    C = x.shape[1]
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x, x.numel() // C, C, 1
    x = x.contiguous()
    return x, x.numel() // C, C, math.prod(x.shape[2:])


def _on_device_of(x):
    """Triton launches on the current CUDA device: make it x's (a run on cuda:1, say)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


class KAFTritonFunction(torch.autograd.Function):
    """KAF f(s) = sum_i alpha_i k(s - d_i) with fused Triton kernels for any of the three kernels:
    saves only the input (like :class:`KAFFunction`) and reads/writes each tensor once per pass.
    Backward: df/ds = sum_i alpha_i k'(s - d_i), dL/dalpha_ci = sum over the channel of g k(s - d_i).
    With the Gaussian and an equally spaced dictionary the kernels come in runs from two exps each,
    as in KAFFunction: a GPU's exp units (a sixteenth of its multiply-adds) would otherwise bound it.
    Computes in float32 (float64 for float64 input) and returns the input's dtype and layout.
    ``d_values`` is the dictionary as Python floats (the run layout is fixed at compile time)."""

    @staticmethod
    def _config(x, alpha, d_values, gamma, kernel):
        x, P, C, inner = _kaf_layout(x)
        block_c = 1 if inner > 1 else min(triton.next_power_of_2(C), 64)  # a tile is contiguous either way
        D, float64 = len(d_values), x.dtype == torch.float64
        compute = tl.float64 if float64 else tl.float32
        step = (d_values[-1] - d_values[0]) / (D - 1) if D > 1 else 0.0
        equal = D > 1 and _kaf_equally_spaced(d_values, 0, D - 1, float64)
        longest = _kaf_longest_run(gamma, step, D) if kernel == "gaussian" and equal else 1
        run = max(r for r in range(1, longest + 1) if D % r == 0)  # equal runs, fixed at compile time
        exact = torch.float64 if float64 else torch.float32
        scales = (torch.arange(D, device=x.device) % run * step).to(exact).square_().mul_(-gamma).exp_()
        return x, scales, dict(P=P, C=C, INNER=inner, alpha_stride=0 if alpha.shape[0] == 1 else alpha.shape[1],
                               step=step, t_max=_kaf_t_max(gamma, float64), D=D, RUN=run,
                               KERNEL=KAF_KERNELS.index(kernel), COMPUTE=compute,
                               BLOCK_P=max(4096 // block_c, 16), BLOCK_C=block_c)

    @staticmethod
    def forward(ctx, x, alpha, d, gamma, kernel, d_values):
        x, scales, cfg = KAFTritonFunction._config(x, alpha, d_values, gamma, kernel)
        ctx.save_for_backward(x, alpha, d)
        ctx.gamma, ctx.kernel, ctx.d_values = gamma, kernel, d_values
        out = torch.empty_like(x)
        if x.numel():
            grid = (triton.cdiv(cfg["P"], cfg["BLOCK_P"]), triton.cdiv(cfg["C"], cfg["BLOCK_C"]))
            with _on_device_of(x):
                _kaf_forward_kernel[grid](x, (alpha * scales).contiguous(), d, out, gamma=gamma, **cfg)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, alpha, d = ctx.saved_tensors
        need_x, need_alpha = _grads_needed(ctx)[:2]
        _, scales, cfg = KAFTritonFunction._config(x, alpha, ctx.d_values, ctx.gamma, ctx.kernel)
        g = grad_out.contiguous(memory_format=torch.channels_last if cfg["INNER"] == 1 and x.dim() == 4
                                else torch.contiguous_format)
        num_tiles = triton.cdiv(cfg["P"], cfg["BLOCK_P"])
        grid_c = triton.cdiv(cfg["C"], cfg["BLOCK_C"])
        grid_p = max(1, min(num_tiles, 1024 // grid_c, triton.cdiv(num_tiles, 8)))  # >= 8 tiles a program
        grad_x = torch.empty_like(x) if need_x else None
        partial = torch.zeros((grid_p, cfg["C"], cfg["D"]), dtype=torch.float64 if x.dtype == torch.float64
                              else torch.float32, device=x.device)
        if x.numel():
            with _on_device_of(x):
                _kaf_backward_kernel[(grid_p, grid_c)](
                    x, g, (alpha * scales).contiguous(), d, grad_x if need_x else x, partial, gamma=ctx.gamma,
                    num_tiles=num_tiles, D_PAD=triton.next_power_of_2(cfg["D"]), NEED_X=need_x,
                    NEED_ALPHA=need_alpha, **cfg)
        grad_alpha = None
        if need_alpha:
            grad_alpha = partial.sum(0).mul_(scales.to(partial.dtype))  # the constants folded into alpha
            grad_alpha = (grad_alpha.sum(0, keepdim=True) if alpha.shape[0] == 1 else grad_alpha).to(alpha.dtype)
        return grad_x, grad_alpha, None, None, None, None


_compiling = getattr(torch.compiler, "is_compiling", lambda: False)  # torch < 2.3 has no such query
_TRITON_KAF_OK = {}  # device -> whether the fused kernels compiled and matched the loop there


def triton_kaf_usable(device):
    """Whether the fused kernels can run on ``device``: Triton installed, a CUDA device (or CPU under
    TRITON_INTERPRET=1), and -- checked once per device -- they compile there and agree with the
    plain version on a small input.  If not, KAF warns once and falls back, so a Triton problem on
    some GPU costs speed, never a run."""
    device = torch.device(device)
    if triton is None or not (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    if device not in _TRITON_KAF_OK:
        # the first KAF call may come under no_grad, inference_mode or autocast: check outside them
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            _TRITON_KAF_OK[device] = _triton_kaf_check(device)
    return _TRITON_KAF_OK[device]


def _triton_kaf_check(device):
    """Run the fused kernels once on a small input against kaf_naive; warn and say False if they fail."""
    try:
        gen = torch.Generator().manual_seed(0)
        x = (2 * torch.randn(2, 3, 5, 5, generator=gen)).to(device).requires_grad_(True)
        alpha = torch.randn(3, 7, generator=gen).to(device).requires_grad_(True)
        d, gamma = kaf_dictionary(7, 3.0)
        d, g = d.to(device), torch.randn(x.shape, generator=gen).to(device)
        got = KAFTritonFunction.apply(x, alpha, d, gamma, "gaussian", tuple(d.tolist()))
        ref = kaf_naive(x, alpha, d, gamma)
        pairs = zip((got, *torch.autograd.grad(got, (x, alpha), g)), (ref, *torch.autograd.grad(ref, (x, alpha), g)))
        ok, reason = max(float((a - b).detach().abs().max()) for a, b in pairs) < 1e-3, "they disagree with the plain version"
    except Exception as e:  # a compiler or driver problem on this machine
        ok, reason = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if not ok:
        warnings.warn(f"fused Triton KAF kernels unusable on {device} ({reason}); using the slower loop")
    return ok


class KAF(nn.Module):
    """Kernel Activation Function (Scardapane et al. 2019, the KAF thesis):
        f(s) = sum_{i=1..D} alpha_i k(s - d_i),   k(u) = exp(-gamma u^2) by default,
    a learnable mixture of D kernels on a fixed dictionary d = linspace(-B, B, D).
    alpha has shape (channels, D): one function per channel shared over space (channels=1 shares
    it over the whole layer or network).  init='elu' fits ELU by kernel ridge regression (the thesis's
    choice, and what keeps deep KAF nets from diverging at the start); init='random' draws
    alpha ~ N(0, 0.3^2).  D=20, B=3, gamma=1/(6 Delta^2) follow the paper; the PyTorch reference
    code uses B=4 and gamma=1/(8 Delta^2) (``gamma_rule='code'``).  With the Gaussian kernel f
    decays to 0 outside [-B, B], so a KAF is bounded: an attack evaluation must check for gradient
    masking.  ``kernel`` 'relu' or 'softplus': the reference code's other kernels, the thesis's
    "different kernels" future work (see :func:`kaf_kernel`).

    ``impl`` picks the computation, all with the same result: 'triton' the fused kernels
    (:class:`KAFTritonFunction`), 'loop' the memory-efficient :class:`KAFFunction`, 'naive'
    :func:`kaf_naive` (keeps D times the input for backward); 'auto' (default) takes triton on a
    GPU where :func:`triton_kaf_usable` (not inside torch.compile), else loop."""

    def __init__(self, channels=1, size=20, boundary=3.0, init="elu", gamma_rule="paper", impl="auto", kernel="gaussian"):
        super().__init__()
        if size < 2:
            raise ValueError(f"kaf dictionary size must be >= 2, got {size}")
        if not 0 < boundary < math.inf:  # nan fails too
            raise ValueError(f"kaf boundary must be a finite number > 0, got {boundary}")
        if init not in ("elu", "random"):
            raise ValueError(f"kaf init must be 'elu' or 'random', got {init!r}")
        if gamma_rule not in ("paper", "code"):
            raise ValueError(f"kaf gamma_rule must be 'paper' or 'code', got {gamma_rule!r}")
        _check_kaf_kernel(kernel)
        if impl not in KAF_IMPLS:
            raise ValueError(f"kaf impl must be one of {', '.join(KAF_IMPLS)}, got {impl!r}")
        if impl == "triton" and triton is None:
            raise ValueError("kaf impl 'triton' needs the triton package (pip install triton)")
        d, gamma = kaf_dictionary(size, boundary, gamma_rule)
        self.register_buffer("dictionary", d)
        self.dictionary_values = tuple(d.tolist())  # fixed by (size, boundary): no device read per pass
        self.gamma = gamma
        self.channels, self.init, self.impl, self.kernel = channels, init, impl, kernel
        if init == "elu":
            alpha = kaf_ridge_init(d, gamma, kernel=kernel).expand(channels, size).clone()
        else:
            alpha = 0.3 * torch.randn(channels, size)
        self.alpha = nn.Parameter(alpha)

    def impl_for(self, x, compiling=None):
        """The computation used for input x (``impl`` with 'auto' resolved); ``compiling`` (default:
        whether torch.compile is tracing now) tells it to resolve as inside a compiled model."""
        if self.impl != "auto":
            return self.impl
        compiling = _compiling() if compiling is None else compiling
        # under torch.compile the plain versions, which the compiler fuses itself and can trace
        if x.is_cuda and not compiling and triton_kaf_usable(x.device):
            return "triton"
        return "loop"

    def forward(self, x):
        impl = self.impl_for(x)
        if impl == "triton":
            if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
                raise RuntimeError("kaf impl 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run it on CPU)")
            return KAFTritonFunction.apply(x, self.alpha, self.dictionary, self.gamma, self.kernel,
                                           self.dictionary_values)
        if impl == "naive":
            return kaf_naive(x, self.alpha.to(x.dtype), self.dictionary.to(x.dtype), self.gamma, self.kernel)
        return KAFFunction.apply(x, self.alpha, self.dictionary, self.gamma, self.dictionary_values, self.kernel)

    def extra_repr(self):
        return (f"channels={self.channels}, D={self.dictionary.numel()}, B={self.dictionary[-1].item():g}, "
                f"kernel={self.kernel}, gamma={self.gamma:.4g}, init={self.init}, impl={self.impl}")


# ----------------------------------------------------------------------------------------- registry
# name -> (class, default scope, paper).  Scope 'none' = no parameters to share.
REGISTRY = {
    "relu": (ReLU, "none", "-"),
    "elu": (ELU, "none", "Clevert et al. 2016"),
    "softplus": (Softplus, "none", "Xie et al. 2020 (SAT)"),
    "silu": (SiLU, "none", "Xie et al. 2020 (SAT)"),
    "swish": (SiLU, "none", "alias of silu"),
    "gelu": (GELU, "none", "Xie et al. 2020 (SAT)"),
    "prelu": (PReLU, "network", "He et al. 2015; Dai et al. 2021"),
    "psilu": (PSiLU, "network", "Dai et al. 2021"),
    "psoftplus": (PSoftplus, "network", "Dai et al. 2021"),
    "pssilu": (PSSiLU, "network", "Dai et al. 2021"),
    "kaf": (KAF, "channel", "Scardapane et al. 2019"),
    "mrelu": (MReLU, "none", "Zhao & Griffin 2016"),
    "rbf": (RBF, "none", "Zhao & Griffin 2016"),
    "kwta": (KWTA, "none", "Xiao et al. 2020"),
}
NAMES = sorted(REGISTRY)
CLASSES = tuple(dict.fromkeys(cls for cls, _, _ in REGISTRY.values()))  # every activation module class
SCOPES = ("network", "layer", "channel")
# Options each activation accepts (anything else is refused, so a typo never passes silently).
OPTIONS = {
    "softplus": {"beta"}, "kwta": {"gamma"}, "prelu": {"init"}, "psilu": {"init"},
    "psoftplus": {"init"}, "pssilu": {"init_a", "init_b"},
    "kaf": {"size", "boundary", "init", "gamma_rule", "impl", "kernel"},
}


def default_scope(name):
    return REGISTRY[name][1]


def make_factory(name, scope=None, **options):
    """Return ``factory(num_channels) -> nn.Module`` for activation ``name``.

    ``scope`` (network | layer | channel; default: what the activation's paper did) only matters for
    activations with parameters.  ``options`` go to the constructor, e.g. ``make_factory('kaf',
    size=20, boundary=3)`` or ``make_factory('softplus', beta=10)``."""
    if name not in REGISTRY:
        raise ValueError(f"unknown activation {name!r}; choose from {', '.join(NAMES)}")
    cls, natural_scope, _ = REGISTRY[name]
    unknown = set(options) - OPTIONS.get(name, set())
    if unknown:
        allowed = ", ".join(sorted(OPTIONS.get(name, ()))) or "none"
        raise ValueError(f"activation {name!r} takes no option {', '.join(sorted(unknown))} (allowed: {allowed})")
    if natural_scope == "none":
        cls(**options)  # validate the options once, up front
        return lambda channels: cls(**options)
    scope = scope or natural_scope
    if scope not in SCOPES:
        raise ValueError(f"unknown activation scope {scope!r}; choose from {', '.join(SCOPES)}")
    cls(1, **options)  # validate the options once, up front
    if scope == "channel":
        return lambda channels: cls(channels, **options)
    if scope == "layer":
        return lambda channels: cls(1, **options)
    shared = cls(1, **options)
    return lambda channels: shared


def activation_modules(model):
    """The distinct activation modules of a model (a network-scope instance is listed once)."""
    seen, out = set(), []
    for m in model.modules():
        if isinstance(m, CLASSES) and id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    return out


def kaf_impls(model, device, compiled=False):
    """How the model's KAF units compute on ``device`` ('triton', 'loop', 'naive'; none without KAF):
    what summaries and benchmarks report, since 'auto' may resolve differently per machine."""
    probe = torch.empty(0, device=device)
    return sorted({m.impl_for(probe, compiling=compiled) for m in activation_modules(model) if isinstance(m, KAF)})


def activation_parameter_count(model):
    """Number of learnable parameters the activations add to a model (shared ones counted once)."""
    return sum(p.numel() for m in activation_modules(model) for p in m.parameters())


def activation_parameter_values(model, max_values=64):
    """Final values of the activations' learnable parameters, for summaries: small ones in full
    (e.g. PSSiLU's a and b), large ones (per-channel KAF) as shape, mean, std, min and max."""
    out = {}
    for idx, m in enumerate(activation_modules(model)):
        for pname, p in m.named_parameters():
            v = p.detach().float().cpu()
            key = f"{idx}:{type(m).__name__}.{pname}"
            if v.numel() <= max_values:
                out[key] = [round(float(t), 6) for t in v.flatten()]
            else:
                out[key] = {"shape": list(v.shape), "mean": float(v.mean()), "std": float(v.std()),
                            "min": float(v.min()), "max": float(v.max())}
        if isinstance(m, PSSiLU) and m.b.numel() <= max_values:  # the shift itself, not its parameter b
            out[f"{idx}:PSSiLU.beta"] = [round(float(t), 6) for t in m.beta().detach().flatten()]
    return out
