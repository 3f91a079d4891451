"""Amortized RegVar: do a few Adam epochs reach the perturbed optimum?

A 2-D linear regression (200 rows, MSE, Adam weight decay ``wd``): the
regularized objective ``R = sum_n (f_n - y_n)^2 + (N wd / 2) ||theta||^2`` is
quadratic, its minimizer ``theta*`` is fitted in closed form, and the amortized
fine-tune's objective ``R + lam E_batch[mean |f|]`` has its optimum at
``theta* - lam H^-1 u`` exactly (``H = 2 A^T A + N wd I``, ``u = (1/N) sum_n
sign(f_n) a_n``, ``a_n = (x_n, 1)``; the signs do not change for small ``lam``).
:func:`skuq.regvar.finetune_pair` runs the two lockstep Adam fine-tunes from
``theta*`` (a fresh Adam: a plain module has no optimizer state); their
displacement ``(theta_lam - theta_0) / lam`` is compared with ``-H^-1 u``:
norm ratio and cosine, per number of epochs and learning rate.

Run: ``PYTHONPATH=. python benchmarks/regvar_amortized_reach.py``; writes
``benchmarks/results/regvar_amortized_reach.md``.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import torch
from torch import nn

from skuq.regvar import finetune_pair

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, write_results  # noqa: E402

N, WD, LAM, BATCH = 200, 1e-2, 1e-2, 32


def main() -> None:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, 2, generator=g, dtype=torch.float64) * torch.tensor(
        [1.0, 0.3], dtype=torch.float64
    )
    y = (
        X @ torch.tensor([1.0, -2.0], dtype=torch.float64)
        + 0.5
        + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)
    )
    A = torch.cat([X, torch.ones(N, 1, dtype=torch.float64)], 1)
    H = 2 * A.T @ A + N * WD * torch.eye(3, dtype=torch.float64)
    theta = torch.linalg.solve(H, 2 * A.T @ y)  # the minimizer of R (mean loss: / N)
    u = (torch.sign(A @ theta)[:, None] * A).mean(0)
    target = -torch.linalg.solve(H, u)
    model = nn.Linear(2, 1).double()
    with torch.no_grad():
        model.weight.copy_(theta[:2][None])
        model.bias.copy_(theta[2:])

    def mse(f, t):
        return nn.functional.mse_loss(f, t.reshape(f.shape))

    rows = []
    for lr in (1e-3, 1e-2):
        for epochs in (1, 5, 20, 100):

            def adam(ps, lr=lr):
                return torch.optim.Adam(ps, lr=lr, weight_decay=WD)

            m_lam, m_0 = finetune_pair(
                model,
                X,
                y,
                mse,
                lam=LAM,
                optimizer=adam,
                n_epochs=epochs,
                batch_size=BATCH,
                n_average=100,
                generator=torch.Generator().manual_seed(0),
            )
            d = (
                torch.cat(
                    [
                        (a - b).reshape(-1)
                        for a, b in zip(m_lam.parameters(), m_0.parameters(), strict=True)
                    ]
                )
                / LAM
            )
            drift = torch.cat([(p.reshape(-1)) for p in m_0.parameters()]) - theta
            rows.append(
                (
                    lr,
                    epochs,
                    float(d.norm() / target.norm()),
                    float(d @ target / (d.norm() * target.norm())),
                    float(drift.norm() / (LAM * target.norm())),
                )
            )
    lines = [
        "# Amortized RegVar: how far a few Adam epochs get toward the perturbed optimum",
        "",
        f"`PYTHONPATH=. python benchmarks/regvar_amortized_reach.py` (torch {torch.__version__}, "
        f"{platform.machine()}). 2-D linear regression, N = {N}, batch {BATCH}, "
        f"weight decay {WD}, lam = {LAM}; exact target `-H^-1 u` in closed form.",
        "",
        "| Adam lr | epochs | norm ratio (fine-tune / exact) | cosine | drift of the "
        "reference run / exact displacement |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {lr:g} | {ep} | {r:.3f} | {c:.4f} | {dr:.1f} |" for lr, ep, r, c, dr in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(RESULTS, "regvar_amortized_reach", text)


if __name__ == "__main__":
    main()
