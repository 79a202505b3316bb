"""Design an optimizer as a graph of memories, get a torch.optim.Optimizer, train with it.

Run: python examples/design_an_optimizer.py [OUT_DIR] [--steps N]   (needs scikit-learn for its
bundled digits data set and matplotlib for the plot; nothing is downloaded)

The optimizer: Adam whose first moment is a delta-rule memory (PAPER.md 2.7, Eqs. 48–49).
Adam's ``m`` is an EMA, one GD step on ``1/2 ||m - g||^2``. Here ``m`` is keyed by the gradient's
direction ``u = g / ||g||``: before writing the new gradient it takes one GD step on
``1/2 <m, u>^2``, erasing part of what it held along ``u`` (``m <- b1 m - decay <m, u> u``),
then writes ``(1 - b1) g``. The second moment and the update are Adam's. It trains a small MLP on
the 8x8 digits next to torch's Adam and plots both training losses.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import nlgraph as nl
from nlgraph.optim import compile_optimizer


def delta_adam(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, decay=0.1) -> nl.Graph:
    """Adam with a delta-rule first moment (Eqs. 48–49, App. B)."""
    g = nl.Graph("delta_adam", doc=delta_adam.__doc__)
    grad = nl.grad_of("w")
    m_hat = nl.debias(nl.state("m", at="new"), b1)
    v_hat = nl.debias(nl.state("v", at="new"), b2)
    step = -lr * m_hat / (v_hat.sqrt() + eps)
    # fmt: off
    g.level("w", state=nl.params(), frequency=nl.per_step(), objective=nl.outer(),
            optimizer=nl.follow(step))
    g.level("m", state=nl.like("w"), frequency=nl.per_step(),
            context=nl.kv(key=grad.normalize(), value=0.0), objective=nl.l2(),  # erase along u
            optimizer=nl.chain(nl.gd(lr=decay, retain=b1), nl.follow((1 - b1) * grad)))
    g.level("v", state=nl.like("w"), frequency=nl.per_step(),
            objective=nl.l2_to(grad.square()), optimizer=nl.ema(b2))
    # fmt: on
    return g


DeltaAdam = compile_optimizer(delta_adam)


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("this example needs scikit-learn: pip install scikit-learn") from None
    x, y = load_digits(return_X_y=True)  # 1797 images, shipped inside the package
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def train(make_opt, x, y, steps: int, batch: int = 128) -> list[float]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 10))
    opt = make_opt(model.parameters())
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default=".", help="where to write the plot")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    print(delta_adam().validate().tiers())  # [['m', 'v'], ['w']]: the moments, then the weights
    x, y = digits()
    runs = {
        "torch Adam": train(lambda p: torch.optim.Adam(p, lr=3e-3), x, y, args.steps),
        "delta-rule Adam (nlgraph)": train(lambda p: DeltaAdam(p, lr=3e-3), x, y, args.steps),
    }
    for name, losses in runs.items():
        print(f"{name:28s} loss: first {losses[0]:.3f}, last 20 {sum(losses[-20:]) / 20:.3f}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return print("matplotlib is not installed: no plot")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, losses in runs.items():
        ax.plot(losses, label=name, lw=1)
    ax.set(xlabel="step", ylabel="training loss (cross-entropy)", yscale="log",
           title="8x8 digits, MLP 64-64-10, batch 128")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    path = Path(args.out) / "design_an_optimizer.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
