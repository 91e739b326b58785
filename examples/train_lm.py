"""Train a small GPT-style language model with fused_loss's linear cross-entropy or torch's loss.

    python examples/train_lm.py --loss fused                 # one run
    python examples/train_lm.py --compare --out runs/cpu     # both losses, same seed: loss_curves.png
    torchrun --nproc_per_node 2 examples/train_lm.py --loss fused   # data parallel (gloo on CPU, nccl on GPU)

The text is examples/data/licenses.txt (licence texts, see examples/data/SOURCE.md), split into
words and punctuation; `--vocab-size` pads the vocabulary (and so the LM head) to a realistic size.
With `--loss fused` the head's logits are never materialised: fused_loss.linear_cross_entropy takes
the final hidden states and the head's weight. With `--loss torch`, the logits are computed and
F.cross_entropy takes them. Same seed, same initialisation, same batches: the two loss curves
coincide. At the end: tokens/s (steps after the first) and peak memory (CUDA: max allocated;
CPU: the growth of the process's peak resident set during training, i.e. what the training step
itself needed on top of the model, data and set-up).
"""
import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data", "licenses.txt")


# --- data --------------------------------------------------------------------------------------

def tokenize(text: str):
    """Words, punctuation marks and newlines; ids by decreasing frequency (ties alphabetical)."""
    words = re.findall(r"\w+|[^\w\s]|\n", text)
    counts = Counter(words)
    vocab = sorted(counts, key=lambda w: (-counts[w], w))
    index = {w: i for i, w in enumerate(vocab)}
    return torch.tensor([index[w] for w in words], dtype=torch.int64), vocab


def batches(tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int):
    """Endless random windows of seq_len + 1 tokens, the same for a given seed."""
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, tokens.numel() - seq_len - 1, (batch_size,), generator=g)
        window = torch.stack([tokens[s:s + seq_len + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


# --- model -------------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, seq_len: int, d_model: int, n_layers: int, n_heads: int):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def hidden(self, idx):
        """The final hidden states (batch, seq, d_model): what the LM head takes."""
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.ln(x)

    def forward(self, idx):
        return self.hidden(idx)


def loss_of(kind: str, model: GPT, hidden, targets):
    if kind == "fused":  # the head's product and the loss in chunks: no logits tensor
        import fused_loss
        return fused_loss.linear_cross_entropy(hidden.flatten(0, 1), model.head.weight, targets.flatten())
    logits = model.head(hidden)  # (batch, seq, vocab)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


# --- training ----------------------------------------------------------------------------------

def peak_memory_mb(device, baseline_kb=0):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kb) / 1024  # Linux: kB


def train(args):
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world = 0, 1
    if distributed:
        import torch.distributed as dist
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the {world} processes")

    tokens, vocab = tokenize(open(args.data, encoding="utf-8").read())
    vocab_size = max(len(vocab), args.vocab_size or 0)
    torch.manual_seed(args.seed)  # the same initialisation for both losses and on every rank
    model = GPT(vocab_size, args.seq_len, args.d_model, args.n_layers, args.n_heads).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    net = model
    if distributed:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    forward = torch.compile(net) if args.compile else net
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    data = batches(tokens, args.batch_size, args.seq_len, args.seed + 1)
    local = slice(rank * args.batch_size // world, (rank + 1) * args.batch_size // world)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    losses, times = [], []
    bar = None
    if rank == 0 and not args.quiet:
        from tqdm import tqdm
        bar = tqdm(total=args.steps, desc=f"{args.loss} loss", unit="step")
    for step in range(args.steps):
        inputs, targets = next(data)
        inputs, targets = inputs[local].to(device), targets[local].to(device)
        start = time.perf_counter()
        with autocast:
            loss = loss_of(args.loss, model, forward(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.detach().float()
        if distributed:  # the global batch's mean loss (each rank holds an equal share of the tokens)
            torch.distributed.all_reduce(value)
            value /= world
        value = value.item()  # also waits for the step
        times.append(time.perf_counter() - start)
        losses.append(value)
        if bar is not None:
            tokens_per_s = args.batch_size * args.seq_len / times[-1]
            bar.set_postfix(loss=f"{value:.4f}", tok_s=f"{tokens_per_s:,.0f}")
            bar.update()
    if bar is not None:
        bar.close()
    timed = times[1:] or times  # the first step compiles, faults pages and builds the optimizer state
    result = dict(loss=args.loss, device=str(device), dtype=args.dtype, processes=world, vocab_size=vocab_size,
                  batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps, losses=losses,
                  tokens_per_s=args.batch_size * args.seq_len * len(timed) / sum(timed),
                  peak_memory_mb=peak_memory_mb(device, baseline_kb),
                  peak_memory_means="max allocated" if device.type == "cuda" else
                  "growth of the process's peak RSS during training")
    if distributed:
        # Every rank done with its collectives before any tears down (gloo's threads otherwise
        # abort a rank whose peer left first: "terminate called without an active exception").
        del net, forward  # the DDP wrapper (its reducer holds the group) first
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if rank == 0:
        print(f"{args.loss}: {result['tokens_per_s']:,.0f} tokens/s, peak memory {result['peak_memory_mb']:,.0f} MB "
              f"({result['peak_memory_means']}), final loss {losses[-1]:.4f}")
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, f"metrics-{args.loss}.json"), "w") as f:
                json.dump(result, f, indent=1)
    return result


def compare(args, argv):
    """Each loss in a fresh process (so that each peak memory is its own), then one plot."""
    out = args.out or "runs"
    os.makedirs(out, exist_ok=True)
    rest = [a for a in argv if a != "--compare"]
    results = {}
    for kind in ("torch", "fused"):
        cmd = [sys.executable, os.path.abspath(__file__), *rest, "--loss", kind, "--out", out]
        subprocess.run(cmd, check=True)
        with open(os.path.join(out, f"metrics-{kind}.json")) as f:
            results[kind] = json.load(f)
    worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(results["fused"]["losses"], results["torch"]["losses"]))
    print(f"largest relative difference between the two loss curves: {worst:.2e}")
    print(f"fused / torch: {results['fused']['tokens_per_s'] / results['torch']['tokens_per_s']:.2f}x tokens/s, "
          f"{results['fused']['peak_memory_mb']:,.0f} MB against {results['torch']['peak_memory_mb']:,.0f} MB peak")
    plot(results, os.path.join(out, "loss_curves.png"))
    with open(os.path.join(out, "comparison.json"), "w") as f:
        json.dump(dict(max_relative_difference=worst, **{k: {x: v[x] for x in v if x != "losses"}
                                                           for k, v in results.items()}), f, indent=1)
    return results


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    styles = {"torch": dict(lw=3, alpha=0.5), "fused": dict(lw=1, ls="--", color="black")}
    for kind, r in results.items():
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=f"{kind} ({r['tokens_per_s']:,.0f} tokens/s, "
                f"{r['peak_memory_mb']:,.0f} MB)", **styles[kind])
    r = results["torch"]
    ax.set(xlabel="step", ylabel="training loss", title=f"GPT, vocabulary {r['vocab_size']}, {r['dtype']}, {r['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loss", choices=("fused", "torch"), default="fused")
    p.add_argument("--compare", action="store_true", help="run both losses (fresh processes) and plot both curves")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="bfloat16: autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step, over all processes")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=32768, help="pad the vocabulary (the text has ~2300 words)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=DATA)
    p.add_argument("--out", default=None, help="directory for metrics-<loss>.json (and the plot with --compare)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.d_model % args.n_heads:
        p.error("--d-model must be divisible by --n-heads")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.compare:
        if "RANK" in os.environ:
            raise SystemExit("--compare runs single processes; run torchrun once per --loss instead")
        return compare(args, argv)
    return train(args)


if __name__ == "__main__":
    main()
