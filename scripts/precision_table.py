"""The float32 error of cross-entropy against float64 as the logits' common offset grows,
for torch and fused_loss (the table of the hardening issue): relative gradient error
||g - g64|| / ||g64|| and absolute loss error, (64, 1000) logits, 'mean'.

    .venv/bin/python scripts/precision_table.py
"""
import torch
import torch.nn.functional as F

import fused_loss


def main():
    torch.manual_seed(0)
    print("| offset | torch grad | fused_loss grad | torch loss | fused_loss loss |\n|---|---|---|---|---|")
    for offset in [10, 100, 1e3, 1e4]:
        x32 = (torch.randn(64, 1000, dtype=torch.float64) + offset).float()
        t = torch.randint(0, 1000, (64,))
        x64 = x32.double().requires_grad_()
        l64 = F.cross_entropy(x64, t)
        (g64,) = torch.autograd.grad(l64, x64)
        row = []
        for fn in (F.cross_entropy, fused_loss.cross_entropy):
            x = x32.clone().requires_grad_()
            loss = fn(x, t)
            (g,) = torch.autograd.grad(loss, x)
            row += [((g.double() - g64).norm() / g64.norm()).item(), abs(loss.double() - l64).item()]
        print(f"| {offset:g} | {row[0]:.1e} | {row[2]:.1e} | {row[1]:.1e} | {row[3]:.1e} |")


if __name__ == "__main__":
    main()
