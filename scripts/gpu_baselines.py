#!/usr/bin/env python3
"""PyTorch baselines for the GPU benchmark plots, timed on the same GPU as `mamba-lm bench`.

Writes JSON lines in mamba-lm's figure schema ({bench, model, dtype, batch, length, figure, value,
unit}) so `mamba-lm bench plot` draws them beside our lines:
  - scaled_dot_product_attention (flash backend, causal, 16 heads of 64, batch 1, bf16) and an FFT
    long convolution (1024 channels, kernel as long as the sequence, f32 FFT) at the selective-scan
    lengths: the paper's comparison lines for the scan;
  - transformers' MambaForCausalLM (random mamba-130m-size weights, bf16): first token after a
    100-token prompt and per-token decode latency (the path transformers takes without mamba_ssm).
Times are medians of CUDA-event timings after warm-up.
"""
import argparse
import json
import time

import torch


def median_ms(fn, reps):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def fig(out, bench, model, dtype, batch, length, figure, value, unit):
    line = json.dumps(dict(bench=bench, model=model, dtype=dtype, batch=batch, length=length, figure=figure,
                           value=value, unit=unit))
    print(line, flush=True)
    out.write(line + "\n")
    out.flush()


def scan_lines(out, lengths):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for L in lengths:
        reps = 10 if L <= 65536 else 3
        q, k, v = (torch.randn(1, 16, L, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            ms = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), reps)
        fig(out, "scan", "sdpa-flash-causal-16x64", "bf16", 1, L, "attention_ms", ms, "ms")
        del q, k, v
        u = torch.randn(1, 1024, L, device="cuda", dtype=torch.float32)
        kern = torch.randn(1024, L, device="cuda", dtype=torch.float32)

        def fft_conv():
            n = 2 * L
            return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(kern, n=n), n=n)[..., :L]

        fig(out, "scan", "fft-conv-d1024", "f32", 1, L, "conv_ms", median_ms(fft_conv, reps), "ms")
        del u, kern
        torch.cuda.empty_cache()


def transformers_decode(out, prompt_len=100, gen=128):
    from transformers import MambaConfig, MambaForCausalLM

    cfg = MambaConfig(hidden_size=768, num_hidden_layers=24, vocab_size=50280, state_size=16, expand=2,
                      conv_kernel=4, time_step_rank=48)
    model = MambaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 50000, (1, prompt_len), device="cuda")

    def run(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        return (time.perf_counter() - t) * 1e3

    run(2)
    first = sorted(run(1) for _ in range(5))[2]
    total = sorted(run(gen) for _ in range(3))[1]
    name = "transformers-mamba-130m"
    fig(out, "decode", name, "bf16", 1, prompt_len, "first_token_ms", first, "ms")
    fig(out, "decode", name, "bf16", 1, gen, "decode_ms_per_token", (total - first) / (gen - 1), "ms")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON-lines file to write")
    ap.add_argument("--max-log2-len", type=int, default=19)
    a = ap.parse_args()
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    with open(a.out, "w") as out:
        scan_lines(out, [1 << k for k in range(9, a.max_log2_len + 1)])
        try:
            transformers_decode(out)
        except Exception as e:  # transformers missing or incompatible: the scan lines still stand
            print(f"# transformers baseline skipped: {e}", flush=True)


if __name__ == "__main__":
    main()
