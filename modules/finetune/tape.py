"""The symbolic autograd tape of the memory estimate: what a training step's forward saves for
backward, counted without running it.

Each op of a layer is written out in the shape of the modelling code it mirrors, and saves for
backward what autograd's derivative formulas say it saves (torch `tools/autograd/derivatives.yaml`):
`mul(a, b)` keeps `b` when `a` needs a gradient and `a` when `b` does, `mm(x, W)` keeps `x` only
when `W` is trained, and so on. A storage is counted once, like `pipelines.resources.
ActivationMeter`, so the tape's bytes are the run ledger's `mem/activations_bytes`.
`modules.finetune.activations` writes the decoder layers on it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(eq=False)
class Sym:
    """A tensor of the symbolic forward: elements, bytes per element, whether autograd tracks it."""

    n: int
    el: int
    grad: bool


@dataclass(eq=False)
class Weight:
    """A parameter (out, inp) of `el` bytes per element; its storage is never an activation."""

    out: int
    inp: int
    el: int
    trained: bool

    @property
    def n(self) -> int:
        return self.out * self.inp


class Tape:
    """What autograd saves for backward, each storage once.

    Args:
        mixed: bf16 autocast (Lightning's bf16-mixed): matmuls run on bf16 copies of their inputs.
        cuda: CUDA kernels (dropout keeps a 1-byte mask, layer norm fp32 statistics); CPU
            dropout keeps its noise tensor in the input's dtype instead.
    """

    def __init__(self, mixed: bool = False, cuda: bool = True):
        self.mixed, self.cuda = mixed, cuda
        self.saved: dict[int, tuple[Sym, int]] = {}  # the Sym is held so its id is never reused

    @property
    def bytes(self) -> int:
        return sum(b for _, b in self.saved.values())

    def save(self, *ts: Sym | Weight) -> None:
        for t in ts:
            if isinstance(t, Sym):  # parameters (Weight) are excluded, as in ActivationMeter
                self.saved.setdefault(id(t), (t, t.n * t.el))

    def to(self, x: Sym, el: int) -> Sym:
        return x if x.el == el else Sym(x.n, el, x.grad)  # a cast saves nothing

    def mul(self, a: Sym | Weight, b: Sym | Weight) -> Sym:
        """Elementwise a * b (b may broadcast): each operand is kept for the other's gradient."""
        if a.trained if isinstance(a, Weight) else a.grad:
            self.save(b)
        if b.trained if isinstance(b, Weight) else b.grad:
            self.save(a)
        big = a if a.n >= b.n else b
        return Sym(big.n, max(a.el, b.el), _grad(a) or _grad(b))

    def unary(self, x: Sym, keep_input: bool = True, out_el: int | None = None) -> Sym:
        """silu, gelu, pow: the input is kept (rsqrt, softmax, exp keep their output: `keep_output`)."""
        if x.grad and keep_input:
            self.save(x)
        return Sym(x.n, out_el or x.el, x.grad)

    def keep_output(self, x: Sym, out_el: int | None = None) -> Sym:
        y = Sym(x.n, out_el or x.el, x.grad)
        if x.grad:
            self.save(y)
        return y

    def linear(self, x: Sym, w: Weight) -> Sym:
        """x @ W^T: x is kept for W's gradient, W (or autocast's bf16 copy of it) for x's."""
        if self.mixed:
            x = self.to(x, 2)  # autocast casts the input per call and an fp32 weight to a bf16 copy
            if w.el != 2 and x.grad:  # (cached per forward for a trained leaf; each weight is used once)
                self.save(Sym(w.n, 2, w.trained))
        if w.trained:
            self.save(x)
        return Sym(x.n // w.inp * w.out, max(x.el, w.el) if not self.mixed else 2, x.grad or w.trained)

    def matmul(self, a: Sym, b: Sym, n_out: int) -> Sym:
        """Batched a @ b (eager attention): each operand is kept for the other's gradient."""
        if self.mixed:
            a, b = self.to(a, 2), self.to(b, 2)
        self.mul(a, b)
        return Sym(n_out, a.el, a.grad or b.grad)

    def dropout(self, x: Sym, p: float) -> Sym:
        if p == 0:
            return x  # F.dropout(p=0) returns its input; PEFT uses nn.Identity
        y = Sym(x.n, x.el, x.grad)
        if x.grad:
            self.save(Sym(x.n, 1 if self.cuda else x.el, False))  # the mask (CUDA) or scaled noise (CPU)
        return y


def _grad(t: Sym | Weight) -> bool:
    return t.trained if isinstance(t, Weight) else t.grad

