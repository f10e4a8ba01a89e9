"""Benchmark: speed and memory ratios measured side by side in one run (not collected by pytest).

    python tests/bench.py                                  # tiny backbone on CPU
    python tests/bench.py --size 2b --device cuda          # Qwen2-VL-2B architecture, random weights

Prints, for the chosen size and device:
 (1) scoring one question's N CoTs: one forward per step prefix (the published way), packed (all N
     CoTs in one forward) and shared-prefix (image and question encoded once);
 (2) training time per CoT: one forward+backward per step prefix against packed batches;
 (3) one bi-level outer iteration (U lower steps + the finite-difference hypergradient) against U
     plain lower steps;
 (4) the peak memory of each (CUDA: torch.cuda.max_memory_allocated; CPU: peak RSS of a child
     process that runs only that training loop);
 (5) packed training throughput in model TFLOP/s (6 x parameters x tokens) and as a fraction of a
     bf16 matrix product timed in the same run.
On CUDA, training uses bf16 autocast on fp32 master weights (what --precision bf16 does), so no
update is rounded away. Needs only torch and transformers; no weights are downloaded.
"""
import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bilevel_train as bt  # noqa: E402
import prm  # noqa: E402

# Qwen2-VL-2B-Instruct's architecture (2.21 B parameters), built from a config with random weights.
QWEN2VL_2B = dict(
    text=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
              num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
              rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=[16, 24, 24])),
    vision=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2),
)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats, device):
    """Median wall time of fn() over repeats, after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def peak(fn, device):
    """(result, peak GiB allocated during fn) on CUDA; (result, None) on CPU."""
    if device != "cuda":
        return fn(), None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    sync(device)
    return out, torch.cuda.max_memory_allocated() / 2 ** 30


def build(size, device):
    """A PRM of the given size on device, fp32 weights. Returns (model, image size)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    if size == "tiny":
        tmp = tempfile.mkdtemp()
        return prm.PRM.from_backbone(prm.save_tiny_backbone(os.path.join(tmp, "tiny"))).to(device), 112
    from transformers import Qwen2VLConfig, Qwen2VLModel
    tokenizer = prm._tiny_tokenizer()       # token ids < 600 fit any vocabulary; text length is what matters
    tid = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(text_config=QWEN2VL_2B["text"], vision_config=QWEN2VL_2B["vision"],
                           image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
                           vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"))
    with torch.device(device):
        backbone = Qwen2VLModel(config)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=448 * 448)
    return prm.PRM(backbone, tokenizer, image_processor).to(device), 448


def make_cots(model, n, steps, step_tokens, image_size, question_tokens):
    """n CoTs of one question; each step about step_tokens tokens, lengths varying by CoT."""
    from PIL import Image, ImageDraw
    image = Image.new("RGB", (image_size, image_size), (230, 230, 230))
    ImageDraw.Draw(image).ellipse([10, 10, image_size - 10, image_size - 10], fill=(200, 30, 30))
    words = "we read the image and count the red circles then add the blue squares to get the total".split()
    question = " ".join(words[i % len(words)] for i in range(question_tokens)) + "?"
    cots = []
    for b in range(n):
        k = max(4, step_tokens - 2 + (b % 5) - 2)
        cots.append(prm.encode_cot(model.tokenizer, question,
                                   [f"Step {i + 1}: " + " ".join(words[(b + j) % len(words)] for j in range(k))
                                    for i in range(steps)], str(b), image, model.image_processor))
    return cots


def train_packed(model, opt, cots, autocast):
    with autocast:
        V, mask = prm.step_values(model, cots)                     # (B, S)
    loss = ((V.float() - 0.5) ** 2)[mask].mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def train_per_prefix(model, opt, cots, autocast):
    """The published way: every step prefix is its own example, one forward+backward each."""
    for c in cots:
        for i in range(len(c.step_ends)):
            train_packed(model, opt, [c.prefix(i)], autocast)


def training_loop(model, mode, U, batch, iterations, device, autocast):
    """Outer iterations of plain (U lower steps) or bi-level training on the synthetic set;
    returns the median seconds per iteration."""
    train, meta = bt.synthetic_data(0, 32, 32)
    phi = [p for p in model.parameters() if p.requires_grad]
    a = torch.zeros(3, device=device, requires_grad=True)
    opt_phi, opt_a = torch.optim.AdamW(phi, lr=1e-4), torch.optim.Adam([a], lr=0.01)
    args = argparse.Namespace(no_aggregation=False, upper_loss="mse", weighting="domain", fd_radius=0.01)
    domains = ["clean", "noisy", "random"]
    times = []
    for it in range(iterations + 1):
        t = time.perf_counter()
        for u in range(U):
            records = [train[i] for i in bt.sample(len(train), batch, 0, "train", it, u)]
            keys = torch.tensor([domains.index(r["domain"]) for r in records], device=device)
            last = bt.lower_step(model, opt_phi, a, records, keys, "domain", autocast)
        if mode == "bilevel":
            m_records = [meta[i] for i in bt.sample(len(meta), batch, 0, "meta", it)]
            bt.upper_step(model, phi, a, opt_a, last, m_records, 1e-4, args, autocast)
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times[1:])[len(times[1:]) // 2]


def peak_rss_child(mode, args):
    """Peak RSS (MiB) of a child process that builds the model and runs only this loop (CPU)."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--_loop", mode, "--U", str(args.U),
                          "--batch", str(args.batch), "--iterations", "3", "--size", args.size],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def matmul_tflops(device, dtype=torch.bfloat16):
    n = 8192 if device == "cuda" else 512
    x, y = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    t = timed(lambda: x @ y, 5, device)
    return 2 * n ** 3 / t / 1e12


def memory_budget():
    """(0) The memory plan of a 2B bi-level run, counted from the shapes and dtypes of the real
    modules built on the meta device (no RAM needed for the weights). Bytes per parameter held at
    the peak of an outer iteration, which is the hypergradient: it holds v = grad L_meta and the
    restore copy of phi on top of the weights and AdamW's two moments. Activations come on top."""
    from transformers import Qwen2VLConfig, Qwen2VLModel
    config = Qwen2VLConfig(text_config=QWEN2VL_2B["text"], vision_config=QWEN2VL_2B["vision"])
    with torch.device("meta"):
        model = Qwen2VLModel(config)
    hidden = config.get_text_config().hidden_size
    every = sum(p.numel() for p in model.parameters()) + hidden + 1             # + the value head
    vision = sum(p.numel() for p in model.visual.parameters())
    fp32 = torch.finfo(torch.float32).bits // 8
    GiB = 2 ** 30
    print(f"(0) memory budget, Qwen2-VL-2B: {every / 1e9:.3f} B parameters, vision tower {vision / 1e9:.3f} B "
          f"(counted on the meta device; fp32 master weights, AdamW)")
    print(f"    {'option':44s} {'weights':>8s} {'grads':>8s} {'AdamW':>8s} {'v':>8s} {'restore':>8s} "
          f"{'GiB':>7s}  bytes/trainable parameter")
    rows = [("grads kept through the hypergradient", False, True, False),
            ("grads freed before the hypergradient", False, False, False),
            ("  + restore copy in CPU memory", False, False, True),
            ("  + --freeze-vision", True, False, True)]
    for name, freeze, grads_kept, offload in rows:
        trainable = every - vision if freeze else every
        parts = dict(weights=every * fp32, grads=trainable * fp32 if grads_kept else 0, adam=2 * trainable * fp32,
                     v=trainable * fp32, restore=0 if offload else trainable * fp32)
        total = sum(parts.values())
        print(f"    {name:44s} " + " ".join(f"{x / GiB:8.2f}" for x in parts.values())
              + f" {total / GiB:7.2f}  {total / trainable:.1f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=prm.HelpFormatter)
    ap.add_argument("--size", choices=["tiny", "2b"], default="tiny", help="tiny backbone, or the Qwen2-VL-2B architecture")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--n", type=int, default=8, help="CoTs per question")
    ap.add_argument("--steps", type=int, default=5, help="steps per CoT")
    ap.add_argument("--step-tokens", type=int, default=None, help="tokens per step (default: tiny 12, 2b 80)")
    ap.add_argument("--question-tokens", type=int, default=None, help="question tokens (default: tiny 45, 2b 128: the prompt about as long as a CoT, as with a 448x448 image and a 400-token CoT on a 2B model)")
    ap.add_argument("--U", type=int, default=5, help="lower steps per outer iteration")
    ap.add_argument("--batch", type=int, default=8, help="CoTs per training step (train and meta)")
    ap.add_argument("--iterations", type=int, default=5, help="timed outer iterations in (3)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats in (1) and (2), median reported")
    ap.add_argument("--_loop", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--budget", action="store_true", help="print the 2B memory budget (0) only (any machine)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.budget or args.size == "2b":
        memory_budget()
        if args.budget:
            return
    device = args.device
    off = torch.autocast("cpu", enabled=False)
    if args._loop:                           # child process for (4) on CPU
        model, _ = build(args.size, "cpu")
        training_loop(model.train(), args._loop, args.U, args.batch, args.iterations, "cpu", off)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return
    step_tokens = args.step_tokens or (12 if args.size == "tiny" else 80)
    question_tokens = args.question_tokens or (45 if args.size == "tiny" else 128)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else off
    model, image_size = build(args.size, device)
    n_params = sum(p.numel() for p in model.parameters())
    cots = make_cots(model, args.n, args.steps, step_tokens, image_size, question_tokens)
    tokens = sum(len(c.input_ids) for c in cots)
    print(f"size={args.size} ({n_params / 1e6:.1f} M parameters) device={device} threads={torch.get_num_threads()} "
          f"N={args.n} steps={args.steps} prompt={cots[0].prompt_len} tokens, CoT tokens "
          f"~{(tokens - args.n * cots[0].prompt_len) // args.n}" + (f" gpu={torch.cuda.get_device_name()}" if device == "cuda" else ""))

    model.eval()
    with torch.no_grad(), autocast:
        t_prefix = timed(lambda: prm.prefix_values(model, cots), args.repeats, device)
        t_packed = timed(lambda: prm.step_values(model, cots), args.repeats, device)
        t_shared = timed(lambda: prm.shared_prefix_values(model, cots), args.repeats, device)
        _, m_prefix = peak(lambda: prm.prefix_values(model, cots), device)
        _, m_packed = peak(lambda: prm.step_values(model, cots), device)
        _, m_shared = peak(lambda: prm.shared_prefix_values(model, cots), device)
        v_packed, mask = prm.step_values(model, cots)
        v_shared, _ = prm.shared_prefix_values(model, cots)
    gib = lambda m: "" if m is None else f"   peak {m:.2f} GiB"  # noqa: E731
    print(f"(1) scoring one question ({args.n} CoTs)")
    print(f"    per-prefix     {t_prefix * 1e3:10.2f} ms{gib(m_prefix)}")
    print(f"    packed         {t_packed * 1e3:10.2f} ms{gib(m_packed)}   per-prefix / packed = {t_prefix / t_packed:.1f}x")
    print(f"    shared-prefix  {t_shared * 1e3:10.2f} ms{gib(m_shared)}   per-prefix / shared = {t_prefix / t_shared:.1f}x, "
          f"packed / shared = {t_packed / t_shared:.2f}x, max |difference| {(v_packed - v_shared)[mask].abs().max():.2e}")

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-7)
    batch = (cots * ((args.batch + len(cots) - 1) // len(cots)))[:args.batch]
    t_train_prefix = timed(lambda: train_per_prefix(model, opt, batch, autocast), max(1, args.repeats // 2), device)
    t_train_packed = timed(lambda: train_packed(model, opt, batch, autocast), args.repeats, device)
    _, m_train_packed = peak(lambda: train_packed(model, opt, batch, autocast), device)
    print(f"(2) training, {args.batch} CoTs per step")
    print(f"    per-prefix     {t_train_prefix / args.batch * 1e3:10.2f} ms per CoT")
    print(f"    packed         {t_train_packed / args.batch * 1e3:10.2f} ms per CoT{gib(m_train_packed)}   "
          f"per-prefix / packed = {t_train_prefix / t_train_packed:.1f}x")

    t_plain, m_plain = peak(lambda: training_loop(model, "plain", args.U, args.batch, args.iterations, device, autocast), device)
    t_bilevel, m_bilevel = peak(lambda: training_loop(model, "bilevel", args.U, args.batch, args.iterations, device,
                                                      autocast), device)
    print(f"(3) one outer iteration, U={args.U}, {args.batch} train and {args.batch} meta CoTs (synthetic text set)")
    print(f"    U plain lower steps {t_plain * 1e3:10.2f} ms{gib(m_plain)}")
    print(f"    bi-level iteration  {t_bilevel * 1e3:10.2f} ms{gib(m_bilevel)}   bi-level / plain = {t_bilevel / t_plain:.2f}x")
    if device == "cpu" and args.size == "tiny":
        r_plain, r_bilevel = peak_rss_child("plain", args), peak_rss_child("bilevel", args)
        print(f"(4) peak RSS, plain {r_plain:.0f} MiB, bi-level {r_bilevel:.0f} MiB: ratio {r_bilevel / r_plain:.2f}")
    elif device == "cpu":
        print("(4) peak memory of the 2b size is measured on CUDA only")
    else:
        print(f"(4) peak GPU memory: scoring packed {m_packed:.2f} / shared {m_shared:.2f} GiB; training packed "
              f"{m_train_packed:.2f} GiB; plain {m_plain:.2f} / bi-level {m_bilevel:.2f} GiB")
    train_tokens = sum(len(c.input_ids) for c in batch)
    model_tflops = 6 * n_params * train_tokens / t_train_packed / 1e12
    bf16 = matmul_tflops(device)
    line = (f"(5) packed training: {model_tflops * 1e3:.2f} model GFLOP/s (6 x params x tokens); bf16 matmul "
            f"measured {bf16 * 1e3:.1f} GFLOP/s: {model_tflops / bf16:.1%} of it")
    if device == "cpu":                      # many CPUs have no fast bf16: show fp32 beside it
        fp32 = matmul_tflops(device, torch.float32)
        line += f"; fp32 matmul {fp32 * 1e3:.1f} GFLOP/s: {model_tflops / fp32:.1%}"
    print(line)


if __name__ == "__main__":
    main()
