"""Fuzz of bad direct calls to the CPU operators, run as a script (a subprocess of
test_ops_errors.py and of ``make fuzz``) so that a crash shows as a failed exit.

``python tests/fuzz_ops.py CALLS SEED``: builds CALLS valid calls of
``torch.ops.rnnfast.layer_fwd`` / ``layer_bwd`` / ``rnnfast._C.decode`` (and the eager
``_C.layer_fwd_eager`` / ``_C.cell_eager`` / ``_C.stack_eager``) with random
sizes (1, and 0 for the batch), breaks each with one to three random edits (a size, a
dtype, a device, strides, a missing or extra optional, the mode, batch sizes) and
makes it. Every call must return or raise RuntimeError; anything else (another
exception type, a crash, a sanitizer report) fails. Prints the counts.
"""

from __future__ import annotations

import random
import sys
from collections import Counter

import torch

import rnnfast  # noqa: F401  (loads the extension and registers the operators)
from rnnfast.backend import MODE_ID

from test_ops_errors import call_bwd, call_cell, call_decode, call_fwd, call_fwd_eager, call_stack

DTYPES = (torch.float32, torch.float64, torch.float16, torch.int64, torch.bool)


def valid(rng: random.Random) -> tuple[str, dict]:
    """A random valid call: (op name, arguments)."""
    mode = rng.choice(list(MODE_ID))
    T, B = rng.choice([1, 2, 3, 7]), rng.choice([0, 1, 2, 3, 7])
    I, H = rng.choice([1, 2, 3, 7]), rng.choice([1, 2, 3, 7])
    dtype = rng.choice([torch.float32, torch.float64])
    G = {"LSTM": 4, "GRU": 3}.get(mode, 1)
    lstm = mode == "LSTM"
    op = rng.choice(["fwd", "fwd-eager", "bwd", "decode", "cell", "stack"])
    if op == "cell":
        return op, dict(mode=MODE_ID[mode], x=torch.randn(B, I, dtype=dtype), h=torch.randn(B, H, dtype=dtype),
                        c=torch.randn(B, H, dtype=dtype) if lstm else None, w_ih=torch.randn(G * H, I, dtype=dtype),
                        w_hh=torch.randn(G * H, H, dtype=dtype), b_ih=torch.randn(G * H, dtype=dtype),
                        b_hh=torch.randn(G * H, dtype=dtype), decode=rng.random() < 0.5, save=rng.random() < 0.5)
    if op == "decode":
        L = rng.choice([1, 2])
        weights = [torch.randn(s, dtype=dtype) for layer in range(L)
                   for s in ((G * H, I if layer == 0 else H), (G * H, H), (G * H,), (G * H,))]
        return op, dict(mode=MODE_ID[mode], weights=weights, num_layers=L, has_bias=True,
                        x=torch.randn(T, B, I, dtype=dtype), h0=torch.randn(L, B, H, dtype=dtype),
                        c0=torch.randn(L, B, H, dtype=dtype) if lstm else None)
    if op == "stack":
        L, D = rng.choice([1, 2]), rng.choice([1, 2])
        P = rng.choice([0, 1]) if lstm and H > 1 else 0
        S = P or H
        weights = [torch.randn(s, dtype=dtype) for layer in range(L) for _ in range(D)
                   for s in ((G * H, I if layer == 0 else D * S), (G * H, S), (G * H,), (G * H,)) + (((P, H),) if P else ())]
        return op, dict(mode=MODE_ID[mode], x=torch.randn(T, B, I, dtype=dtype),
                        h0=torch.randn(L * D, B, S, dtype=dtype),
                        c0=torch.randn(L * D, B, H, dtype=dtype) if lstm else None, weights=weights, num_layers=L,
                        bidirectional=D == 2, has_bias=True, dropout=rng.choice([0.0, 0.5]))
    P = rng.choice([0, 0, 1, 2]) if lstm else 0
    K = P or H
    lengths = sorted((rng.randint(1, T) for _ in range(B)), reverse=True)
    packed = rng.random() < 0.5 and B > 0
    args = dict(mode=MODE_ID[mode], x=torch.randn(T, B, I, dtype=dtype),
                batch_sizes=torch.tensor([sum(n > t for n in lengths) for t in range(T)]) if packed else None,
                h0=torch.randn(B, K, dtype=dtype), c0=torch.randn(B, H, dtype=dtype) if lstm else None,
                w_ih=torch.randn(G * H, I, dtype=dtype), w_hh=torch.randn(G * H, K, dtype=dtype),
                b_ih=torch.randn(G * H, dtype=dtype), b_hh=torch.randn(G * H, dtype=dtype),
                w_hr=torch.randn(P, H, dtype=dtype) if P else None, reverse=rng.random() < 0.5, save=True)
    if op in ("fwd", "fwd-eager"):
        return op, dict(args, save=rng.random() < 0.5) if op == "fwd-eager" else args
    out, _, _, ws1, ws2 = call_fwd(args)
    return op, dict(args, has_bias=True, out=out, ws1=ws1, ws2=ws2, grad_out=torch.randn_like(out),
                    grad_hn=torch.randn_like(args["h0"]),
                    grad_cn=torch.randn(B, H, dtype=dtype) if lstm else torch.zeros(0, dtype=dtype))


def resized(rng: random.Random, t: torch.Tensor) -> torch.Tensor:
    shape = list(t.shape)
    edit = rng.choice(["size", "add-dim", "drop-dim"])
    if edit == "size" and shape:
        d = rng.randrange(len(shape))
        shape[d] = max(0, shape[d] + rng.choice([-1, 1, 2, -shape[d]]))
    elif edit == "add-dim" or not shape:
        shape.insert(rng.randint(0, len(shape)), rng.choice([1, 2]))
    else:
        shape.pop(rng.randrange(len(shape)))
    return torch.randn(shape).to(t.dtype) if t.dtype != torch.int64 else torch.randint(-2, 9, shape)


def broken(rng: random.Random, t: torch.Tensor) -> torch.Tensor:
    """One bad edit of a tensor argument."""
    edit = rng.choice(["resize", "dtype", "meta", "transpose", "strided", "expanded"])
    if edit == "resize":
        return resized(rng, t)
    if edit == "dtype":
        return t.to(rng.choice(DTYPES))
    if edit == "meta":
        return t.to("meta")
    if edit == "transpose" and t.dim() >= 2:
        return t.transpose(0, t.dim() - 1)
    if edit == "expanded" and t.numel() > 0:
        return t.reshape(-1)[:1].reshape([1] * t.dim()).expand(t.shape)  # one value, stride 0 (0-d too)
    return t.unsqueeze(-1).expand(*t.shape, 2)[..., 0]  # strided view, same values


def break_call(rng: random.Random, op: str, args: dict) -> None:
    tensors = [k for k, v in args.items() if isinstance(v, torch.Tensor)]
    edit = rng.choice(["tensor", "tensor", "tensor", "none", "mode", "lengths", "weights"])
    if edit == "tensor" and tensors:
        k = rng.choice(tensors)
        args[k] = broken(rng, args[k])
    elif edit == "none":
        optional = [k for k in ("batch_sizes", "c0", "c", "b_ih", "b_hh", "w_hr") if k in args]
        k = rng.choice(optional)
        args[k] = None if args[k] is not None else torch.randn(rng.choice([0, 1, 3]), rng.choice([1, 6]))
    elif edit == "mode":
        args["mode"] = rng.randint(-2, 6)
    elif edit == "lengths" and "batch_sizes" in args:
        T = args["x"].shape[0] if args["x"].dim() else 0
        args["batch_sizes"] = torch.randint(-2, 9, (max(0, T + rng.choice([-1, 0, 0, 1])),))
    elif edit == "weights" and op in ("decode", "stack"):
        w = args["weights"]
        if w and rng.random() < 0.5:
            w[rng.randrange(len(w))] = broken(rng, w[rng.randrange(len(w))])
        else:
            args["num_layers"] = rng.randint(-1, 3)


def main(calls: int, seed: int) -> int:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    outcomes: Counter = Counter()
    surprises = []
    run = {"fwd": call_fwd, "fwd-eager": call_fwd_eager, "bwd": call_bwd, "decode": call_decode, "cell": call_cell,
           "stack": call_stack}
    for n in range(calls):
        try:
            op, args = valid(rng)
        except Exception as e:  # noqa: BLE001
            surprises.append(f"call {n}: a valid call (or its forward) raised {type(e).__name__}: {e}")
            continue
        for _ in range(rng.randint(1, 3)):
            break_call(rng, op, args)
        try:
            run[op](args)
            outcomes["returned"] += 1
        except RuntimeError:
            outcomes["RuntimeError"] += 1
        except Exception as e:  # noqa: BLE001  (the point: any other type is a finding)
            outcomes[type(e).__name__] += 1
            shapes = {k: (tuple(v.shape), v.dtype, str(v.device)) if isinstance(v, torch.Tensor) else v
                      for k, v in args.items() if k != "weights"}
            surprises.append(f"call {n} {op}: {type(e).__name__}: {e}\n  {shapes}")
    print(f"calls {calls} " + " ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    for s in surprises[:20]:
        print(s)
    return 1 if surprises else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2])))
