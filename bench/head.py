"""The LM head's log-probability of the sampled tokens: gather - logsumexp against PyTorch's
fused cross_entropy, forward and forward + backward, over one head chunk (hidden states
[tokens, hidden] times the head's weight [vocab, hidden], then the logprob of each target).

    python bench/head.py                        # [768, 10395]: the default model's vocabulary
    python bench/head.py --tokens 1024 --vocab 151936 --threads 2

toolrl.workers.scoring computes logprobs through cross_entropy (and entropies through
log_softmax); this prints what each costs here, medians of --repeats, and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F


def median_s(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=10395)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, generator=gen).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, generator=gen) * 0.1).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=gen)

    def lse() -> torch.Tensor:  # [n]
        logits = F.linear(hidden, weight)  # [n, V]
        return logits.gather(-1, targets[:, None])[:, 0] - logits.logsumexp(dim=-1)

    def ce() -> torch.Tensor:  # [n]
        return -F.cross_entropy(F.linear(hidden, weight), targets, reduction="none")

    worst = (lse() - ce()).abs().max().item()
    print(
        f"head [{args.tokens}, {args.hidden}] x [{args.vocab}, {args.hidden}], float32, "
        f"{args.threads} thread(s)"
    )
    print(f"largest difference between the two: {worst:.2e}")
    for name, fn in (("gather - logsumexp", lse), ("cross_entropy", ce)):
        with torch.no_grad():
            fwd = median_s(fn, args.repeats)
        both = median_s(lambda fn=fn: fn().sum().backward(), args.repeats)
        print(f"{name:<20} forward {fwd * 1e3:8.2f} ms   forward + backward {both * 1e3:8.2f} ms")
        if name == "gather - logsumexp":
            base = (fwd, both)
    print(
        f"ratio logsumexp / cross_entropy: forward {base[0] / fwd:.2f}, "
        f"forward + backward {base[1] / both:.2f}"
    )


if __name__ == "__main__":
    main()
