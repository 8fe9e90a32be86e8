#!/usr/bin/env python3
"""Loads model directories written by `mamba-lm init` / `mamba-lm train` in transformers'
MambaForCausalLM / Mamba2ForCausalLM (float32, on the CPU: the pure-PyTorch path) and compares
their logits with `mamba-lm score --logits-out` on the same ids.

    python3 scripts/hf_load_check.py BIN DIR [DIR ...]

Prints one JSON line per directory; exits 1 if any fails to load or differs by more than 1e-4
relative L2."""
import json
import os
import subprocess
import sys
import tempfile

import torch
import transformers
from safetensors.torch import load_file


def check(binary, d):
    cfg = json.load(open(os.path.join(d, "config.json")))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg["vocab_size"], (2, 37), generator=g)
    with tempfile.TemporaryDirectory() as t:
        idf, out = os.path.join(t, "ids.json"), os.path.join(t, "logits.safetensors")
        json.dump(ids.tolist(), open(idf, "w"))
        subprocess.run([binary, "score", "-m", d, "--ids-file", idf, "--logits-out", out], check=True, capture_output=True)
        ours = load_file(out)["logits"].double()
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    with torch.no_grad():
        theirs = model(ids).logits.double()
    err = ((theirs - ours).norm() / theirs.norm()).item()
    return {"dir": d, "class": type(model).__name__, "transformers": transformers.__version__, "rel_l2": err, "ok": err <= 1e-4}


def main():
    binary, dirs = sys.argv[1], sys.argv[2:]
    failed = 0
    for d in dirs:
        try:
            r = check(binary, d)
        except Exception as e:  # a refusal to load is the finding
            r = {"dir": d, "error": f"{type(e).__name__}: {e}"[:600], "ok": False}
        failed += not r["ok"]
        print(json.dumps(r), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
