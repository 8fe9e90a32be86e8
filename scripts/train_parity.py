#!/usr/bin/env python3
"""Convergence parity: the same initial weights, token stream, batches, schedule and seed trained
by `mamba-lm train` and by a PyTorch reference (transformers' MambaForCausalLM /
Mamba2ForCausalLM with torch.optim.AdamW); prints both validation losses at every evaluation.

    python3 scripts/train_parity.py --bin BIN --work DIR [--preset tiny-mamba2 | --config C.json]
        [--text FILE...] [--steps 1000] [--batch 8] [--seq-len 128] [--lr 3e-3] [--warmup 100]
        [--eval-every 100] [--device cuda] [--ours-device cpu|cuda]

Both sides read DIR/data (made by `mamba-lm prepare` from the --text files, README.md and
BENCHMARKS.md by default, unless it exists) in the trainer's order. The text should hold more
tokens than the run reads (steps × batch × seq_len): on a smaller one both sides memorise it,
the validation loss climbs and tiny rounding differences grow into percent-sized gaps. Order:
rows of seq_len + 1 consecutive tokens, each row's last token the next row's first, back to the
start when the stream runs out. The reference mirrors the
trainer's recipe: decay on weight matrices only (not norms, biases, A_log, D, dt_bias), linear
warmup from 0 then cosine to lr/10 at the last step, global-norm clipping to 1.0, mean
cross-entropy over the padded vocabulary. The reference runs in true f32 (TF32 off) and saves
its state at every evaluation (DIR/ref.pt): run again with the same DIR and it continues from
there (the reference's per-step scan is slow; a run cut by a time limit loses at most one
evaluation interval). Writes DIR/parity.jsonl; exits 1 if any evaluation differs by more than
1 %."""
import argparse
import json
import math
import os
import subprocess
import sys

import numpy as np
import torch
import torch.nn.functional as F
import transformers


def run(*cmd):
    subprocess.run([str(c) for c in cmd], check=True)


def lr_at(it, a):
    if it < a.warmup:
        return a.lr * it / a.warmup
    if it >= a.steps:
        return a.lr / 10
    frac = (it - a.warmup) / max(a.steps - a.warmup, 1)
    return a.lr / 10 + 0.5 * (1 + math.cos(math.pi * frac)) * (a.lr - a.lr / 10)


class Stream:
    """The trainer's batches (src/train/data.rs next_batch)."""

    def __init__(self, path, dtype):
        self.ids = np.fromfile(path, dtype=np.uint16 if dtype == "u16" else np.uint32).astype(np.int64)
        self.pos = 0

    def next(self, seqs, length):
        need = seqs * length + 1
        if self.pos + need > len(self.ids):
            self.pos = 0
        rows = [self.ids[self.pos + s * length: self.pos + s * length + length + 1] for s in range(seqs)]
        self.pos += seqs * length
        return torch.tensor(np.stack(rows))


def train_step(model, opt, b):
    opt.zero_grad(set_to_none=True)  # in a graph: backward writes fresh gradients at every replay
    logits = model(b[:, :-1], use_cache=False).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), b[:, 1:].reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def make_step(model, opt, a, dev):
    """The reference's step as one CUDA graph (its scan is a Python loop over time: eager, a step
    is launch-bound at ~0.5 s). Same kernels, same math. The warm-up and capture steps change the
    weights and moments: those are saved before and copied back after, into the same tensors the
    graph reads (moments that did not exist yet start at zero, as AdamW's do). Falls back to
    eager steps when capture fails."""
    x = torch.zeros(a.batch, a.seq_len + 1, dtype=torch.long, device=dev)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    moments = {id(t): t.clone() for s in opt.state.values() for t in s.values() if torch.is_tensor(t)}
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                train_step(model, opt, x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            train_step(model, opt, x)
    except RuntimeError as e:
        print(f"CUDA graph capture failed ({e}); eager steps", flush=True)
        graph = None
    with torch.no_grad():
        for p, v in zip(params, before):
            p.copy_(v)
        for s in opt.state.values():
            for t in s.values():
                if torch.is_tensor(t):
                    t.copy_(moments[id(t)]) if id(t) in moments else t.zero_()
    if graph is None:
        return lambda b: train_step(model, opt, b)

    def replay(b):
        x.copy_(b)
        graph.replay()

    return replay


def no_decay(name, p):
    return p.ndim < 2 or name.endswith(("A_log", ".D", "bias", "norm.weight", "norm_f.weight"))


def evaluate(model, data, meta, a, device):
    val = Stream(os.path.join(data, "val.bin"), meta["dtype"])
    rows = min(max(a.eval_tokens // a.seq_len, 1), (len(val.ids) - 1) // a.seq_len)
    total = 0.0
    with torch.no_grad():
        for r0 in range(0, rows, a.batch):
            b = val.next(min(a.batch, rows - r0), a.seq_len).to(device)
            logits = model(b[:, :-1]).logits.double()
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1), reduction="sum").item()
    return total / (rows * a.seq_len)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--preset", default="tiny-mamba2")
    ap.add_argument("--config", help="a config file instead of --preset")
    ap.add_argument("--text", nargs="+", default=["README.md", "BENCHMARKS.md"], help="the data's text files")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="the reference's")
    ap.add_argument("--ours-device", default="cpu", help="mamba-lm train's --device (f32 either way)")
    a = ap.parse_args()
    w = a.work
    data, init, ours = (os.path.join(w, d) for d in ("data", "init", "ours"))
    if not os.path.exists(data):
        run(a.bin, "prepare", "--input", *a.text, "--out", data, "--train-tokenizer", "--vocab-size", "1024")
    meta = json.load(open(os.path.join(data, "meta.json")))
    if not os.path.exists(init):
        # Zero steps: the initial weights (the data's vocabulary), as both sides start from them.
        shape = ["--config", a.config] if a.config else ["--preset", a.preset]
        run(a.bin, "train", "--data", data, *shape, "--out", init, "--steps", "0", "--eval-every", "0")
    common = ["--steps", a.steps, "--batch-size", a.batch, "--seq-len", a.seq_len, "--lr", a.lr, "--warmup", a.warmup,
              "--eval-every", a.eval_every, "--eval-tokens", a.eval_tokens, "--save-every", "0"]
    if not os.path.exists(ours):
        run(a.bin, "train", "--data", data, "--model", os.path.join(init, "final"), "--out", ours, "--device",
            a.ours_device, *common)
    mine = {r["step"]: r["val_loss"] for r in map(json.loads, open(os.path.join(ours, "metrics.jsonl"))) if "val_loss" in r}

    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = a.device
    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(init, "final"), dtype=torch.float32).to(dev)
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": 0.1},
        {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
    ]
    # Capturable AdamW with the learning rate as a tensor: the whole step can be one CUDA graph.
    graphs = dev.startswith("cuda")
    lr = torch.tensor(a.lr, device=dev) if graphs else a.lr
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, capturable=graphs)
    train = Stream(os.path.join(data, "train.bin"), meta["dtype"])
    saved, start, worst = os.path.join(w, "ref.pt"), 0, 0.0
    if os.path.exists(saved):
        st = torch.load(saved, map_location=dev)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        train.pos, start, worst = st["pos"], st["step"], st["worst"]
        print(f"reference continues from step {start}", flush=True)
    step_fn = make_step(model, opt, a, dev) if graphs else None
    out = open(os.path.join(w, "parity.jsonl"), "a" if start else "w")
    for it in range(start, a.steps):
        b = train.next(a.batch, a.seq_len).to(dev)
        if step_fn:
            lr.fill_(lr_at(it, a))
            step_fn(b)
        else:
            for g in opt.param_groups:
                g["lr"] = lr_at(it, a)
            train_step(model, opt, b)
        step = it + 1
        if (a.eval_every and step % a.eval_every == 0) or step == a.steps:
            ref = evaluate(model, data, meta, a, dev)
            ours_v = mine.get(step)
            diff = abs(ours_v - ref) / ref if ours_v is not None else float("nan")
            worst = max(worst, diff) if ours_v is not None else worst
            r = {"step": step, "val_loss_torch": ref, "val_loss_mamba_lm": ours_v, "rel_diff": diff,
                 "transformers": transformers.__version__, "torch": torch.__version__, "device": dev}
            print(json.dumps(r), flush=True)
            out.write(json.dumps(r) + "\n")
            out.flush()  # a run cut short by a time limit keeps its evaluations
            st = {"model": model.state_dict(), "opt": opt.state_dict(), "pos": train.pos, "step": step, "worst": worst}
            torch.save(st, saved + ".tmp")
            os.replace(saved + ".tmp", saved)
    print(json.dumps({"worst_rel_diff": worst, "steps": a.steps, "ok": worst <= 0.01}))
    sys.exit(0 if worst <= 0.01 else 1)


if __name__ == "__main__":
    main()
