"""Benchmark: speed and memory ratios measured side by side in one run (not collected by pytest).

    python tests/bench.py                                  # tiny backbone on CPU
    python tests/bench.py --size small --only shared       # (4) on a 10 M backbone, compute-bound on CPU
    python tests/bench.py --size 2b --device cuda          # Qwen2-VL-2B architecture, random weights
    python tests/bench.py --budget                         # (0) only: the 2B memory budget, any machine
    python tests/bench.py --only families                  # (5) only: shared-prefix scoring on every family
    python tests/bench.py --size small --only packing      # (6) only: packed scoring against one forward per CoT
    python tests/bench.py --only distributed               # (7) only: 2 processes (torchrun) against 1

Prints, for the chosen size and device:
 (0) with --size 2b (or --budget, on any machine): the memory budget of a 2B bi-level run per memory
     option, measured from the real modules' tensors on the meta device (no RAM for the weights);
 (1) scoring one question's N CoTs: one forward per step prefix (the published way), packed (all N
     CoTs in one forward) and shared-prefix (image and question encoded once);
 (2) training time per CoT: one forward+backward per step prefix against packed batches, and the
     packed training throughput in model TFLOP/s (6 x parameters x tokens) as a fraction of a bf16
     matrix product timed in the same run;
 (3) for each memory option, added one by one: the peak memory of bi-level outer iterations (U
     lower steps + the finite-difference hypergradient) on image CoTs, and seconds per outer
     iteration against U plain lower steps (CUDA: torch.cuda.max_memory_allocated; CPU: the weights
     plus the profiler's peak of the tensors the iterations allocate);
 (4) packed against shared-prefix training at N = 4 and 8 CoTs per question, CoTs and tokens per
     second, and the bi-level outer iteration against U plain steps for both, timed in turns;
 (5) with --only families: packed against shared-prefix scoring on each backbone family's tiny
     model (prm.FAMILIES), timed in turns;
 (6) with --only packing: scoring a question's N text CoTs at a short and a long prompt, one forward
     per CoT (TRL's way) against packed, packed in token-bounded forwards and shared-prefix;
 (7) with --only distributed: bi-level training on 2 processes of one thread (torchrun, FSDP2,
     gloo) against one process of one thread, on the 9.8 M backbone, in turns.
On CUDA, training uses bf16 autocast on fp32 master weights (what --precision bf16 does), so no
update is rounded away. Needs only torch and transformers; no weights are downloaded.
"""
import argparse
import gc
import math
import os
import sys
import tempfile
import time
from functools import partial

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bilevel_train as bt  # noqa: E402
import prm  # noqa: E402
import tiny_families  # noqa: E402

# Qwen2-VL-2B-Instruct's architecture (2.21 B parameters), built from a config with random weights.
QWEN2VL_2B = dict(
    text=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
              num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
              rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=[16, 24, 24])),
    vision=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2),
)

# Qwen2.5-VL-7B-Instruct's published architecture (8.3 B parameters), for the plan on 8 GPUs.
QWEN25VL_7B = dict(
    text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
              num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
              rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=[16, 24, 24])),
    vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31]),
)


# The locally built backbones: tiny (the tests' own; overheads dominate its times) and small (9.8 M
# parameters, where a CPU's time goes to the arithmetic, as at 2B on a GPU).
LOCAL_SIZES = {"tiny": {}, "small": dict(hidden_size=512, layers=4, heads=8)}


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


def interleaved(fns, repeats, device):
    """Median wall time of each of fns, timed in turns (one call of each per round, the order
    reversed every other round, after one warm-up call each): drift on a noisy machine then falls
    on all of them alike, so their ratios are read side by side."""
    for fn in fns:
        fn()
    sync(device)
    times = [[] for _ in fns]
    for r in range(repeats):
        order = list(range(len(fns)))[::1 if r % 2 == 0 else -1]
        for i in order:
            t = time.perf_counter()
            fns[i]()
            sync(device)
            times[i].append(time.perf_counter() - t)
    return [sorted(t)[len(t) // 2] for t in times]


def peak(fn, device):
    """(result, peak bytes allocated during fn) on CUDA; (result, None) on CPU."""
    if device != "cuda":
        return fn(), None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    sync(device)
    return out, torch.cuda.max_memory_allocated()


def build(size, device):
    """A PRM of the given size on device, fp32 weights. Returns (model, image size)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    if size in LOCAL_SIZES:
        tmp = tempfile.mkdtemp()
        return prm.PRM.from_backbone(prm.save_tiny_backbone(os.path.join(tmp, size), **LOCAL_SIZES[size])).to(device), 112
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


def make_cots(model, n, steps, step_words, image_size, question_words):
    """n CoTs of one question; each step about step_words words, lengths varying by CoT."""
    from PIL import Image, ImageDraw
    image = Image.new("RGB", (image_size, image_size), (230, 230, 230))
    ImageDraw.Draw(image).ellipse([10, 10, image_size - 10, image_size - 10], fill=(200, 30, 30))
    words = "we read the image and count the red circles then add the blue squares to get the total".split()
    question = " ".join(words[i % len(words)] for i in range(question_words)) + "?"
    cots = []
    for b in range(n):
        k = max(4, step_words - 2 + (b % 5) - 2)
        cots.append(prm.encode_cot(model.tokenizer, question,
                                   [f"Step {i + 1}: " + " ".join(words[(b + j) % len(words)] for j in range(k))
                                    for i in range(steps)], str(b), image, model.image_processor,
                                   family=model.family))
    return cots


def packing_rows(model, args, device):
    """(6) scoring one question's N text-only CoTs at a short and a long prompt: one forward per CoT
    (as TRL's PRM pipeline scores), packed in one forward, packed in forwards of at most
    prm.CPU_TOKENS_PER_THREAD tokens per thread (what rerank.py does on a CPU), and shared-prefix; timed in turns."""
    words = "we read the image and count the red circles then add the blue squares to get the total".split()
    print(f"(6) scoring one question's {args.n} text CoTs: per CoT, against one forward per CoT")
    for question_words in (20, 330):
        question = " ".join(words[i % len(words)] for i in range(question_words)) + "?"
        cots = [prm.encode_cot(model.tokenizer, question, [f"Step {i + 1}: " + " ".join(
            words[(b + j) % len(words)] for j in range(8 + b % 3)) for i in range(args.steps)], str(b))
            for b in range(args.n)]
        budget = prm.scoring_budget(device)
        fns = [lambda: [prm.step_values(model, [c]) for c in cots], lambda: prm.step_values(model, cots),
               lambda: [prm.step_values(model, [cots[i] for i in g]) for g in prm.token_batches(cots, budget)],
               lambda: prm.shared_prefix_values(model, cots)]
        with torch.no_grad():
            t = interleaved(fns, args.repeats, device)
        print(f"    prompt {cots[0].prompt_len:4d}, CoT {len(cots[0].input_ids):4d} tokens: one per CoT {t[0] * 1e3:8.1f} ms; "
              f"packed {t[0] / t[1]:.2f}x, packed in {budget or 'any'}-token forwards {t[0] / t[2]:.2f}x, "
              f"shared-prefix {t[0] / t[3]:.2f}x")


def family_rows(args):
    """(5) scoring one question's N CoTs on each family's tiny backbone: packed against
    shared-prefix, timed in turns, with the largest difference between their values."""
    print(f"(5) scoring one question ({args.n} CoTs with an image) on each family's tiny backbone")
    tmp = tempfile.mkdtemp()
    for family in prm.FAMILIES:
        model = prm.PRM.from_backbone(tiny_families.save(os.path.join(tmp, family), family)).eval()
        cots = make_cots(model, args.n, args.steps, 12, 112, 45)
        with torch.no_grad():
            t_packed, t_shared = interleaved([lambda: prm.step_values(model, cots),
                                              lambda: prm.shared_prefix_values(model, cots)], args.repeats, "cpu")
            (v, mask), (v_shared, _) = prm.step_values(model, cots), prm.shared_prefix_values(model, cots)
        print(f"    {family:16s} prompt {cots[0].prompt_len:4d} tokens   packed {t_packed * 1e3:8.2f} ms   shared-prefix "
              f"{t_shared * 1e3:8.2f} ms   packed / shared = {t_packed / t_shared:.2f}x   max |difference| "
              f"{(v - v_shared)[mask].abs().max():.1e}")


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


def cpu_peak(fn):
    """(fn(), peak bytes): the most bytes of CPU tensors allocated during fn and alive at once,
    above what was held when it started; a running sum of the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)     # the profiler's own start/stop lines: not ours
    os.dup2(null, 2)
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
    cpu = torch._C._autograd.DeviceType.CPU
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == cpu), key=lambda e: e.start_ns())
    live = top = 0
    for e in events:
        live += e.nbytes()                                         # negative for a free
        top = max(top, live)
    return out, top


def matmul_tflops(device, dtype=torch.bfloat16):
    n = 8192 if device == "cuda" else 512
    x, y = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    t = timed(lambda: x @ y, 5, device)
    return 2 * n ** 3 / t / 1e12


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


class Allocations(TorchDispatchMode):
    """Sums the bytes of the new tensors operators return while active (not views, not in-place
    results). Runs on the meta device, so it measures 2B-sized steps without the memory."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        for i, t in enumerate(out if isinstance(out, (list, tuple)) else [out]):
            if isinstance(t, torch.Tensor) and returns[min(i, len(returns) - 1)].alias_info is None:
                self.bytes += nbytes([t])
        return out


def memory_budget():
    """(0) The memory plan of a 2B bi-level run, measured from the tensors of the real modules built
    on the meta device (no RAM needed for the weights): the weights, AdamW's states after a real
    step, the temporaries that step allocates, and the hypergradient's v and restore copy (one
    tensor of phi's shape and dtype each). Two moments can be the peak: the lower step's optimizer
    step (weights, grads, moments, step temporaries) and the hypergradient (weights, moments, v,
    restore copy, and the grads if they were kept). Activations come on top."""
    from transformers import Qwen2VLConfig, Qwen2VLModel
    config = Qwen2VLConfig(text_config=QWEN2VL_2B["text"], vision_config=QWEN2VL_2B["vision"])
    with torch.device("meta"):
        model = prm.PRM(Qwen2VLModel(config), prm._tiny_tokenizer(), None)
    every = list(model.parameters())
    vision = {id(p) for p in model.backbone.visual.parameters()}
    GiB = 2 ** 30

    def adamw(phi, o):
        """AdamW states and one step's temporaries. foreach: measured on the meta tensors; fused:
        none (one in-place kernel; tests/test_bilevel.py measures it on CPU); compact: the peak of
        its chunk temporaries, measured on CPU with a tensor of two chunks (they do not grow with
        the model)."""
        if o["compact"]:
            opt = bt.CompactAdamW(phi, lr=1e-6, weight_decay=0.0, seed=0)
            states = nbytes(t for p in phi for t in opt.init_state(p).values() if t.dim() > 0)
            w = torch.zeros(2 * bt.CompactAdamW.CHUNK, requires_grad=True)
            w.grad = torch.ones_like(w)
            return states, cpu_peak(bt.CompactAdamW([w], lr=1e-6, weight_decay=0.0, seed=0).step)[1]
        for p in phi:
            p.grad = torch.zeros_like(p)
        opt = torch.optim.AdamW(phi, lr=1e-6, foreach=True)
        opt.step()                                                 # creates the moments
        counter = Allocations()
        with counter:
            opt.step()
        states = nbytes(t for st in opt.state.values() for t in st.values() if t.dim() > 0)
        for p in phi:
            p.grad = None
        return states, 0 if o["fused"] else counter.bytes

    print(f"(0) memory budget, Qwen2-VL-2B PRM: {nbytes(every) / 4 / 1e9:.3f} B parameters, vision tower "
          f"{len(vision) and nbytes(p for p in every if id(p) in vision) / 4 / 1e9:.3f} B (fp32 master weights, "
          f"AdamW; GiB measured from meta tensors)")
    print(f"    {'option':42s} {'weights':>7s} {'grads':>6s} {'AdamW':>6s} {'step':>6s} {'v':>6s} {'restore':>7s}"
          f" {'lower':>6s} {'hyper':>6s} {'peak':>6s}  bytes/trainable parameter")
    exact = dict(freeze=False, kept=False, fused=True, offload=True, compact=False)
    rows = [("torch defaults: foreach AdamW, grads kept", dict(exact, kept=True, fused=False, offload=False)),
            ("grads freed after each lower step", dict(exact, fused=False, offload=False)),
            ("  + --offload-restore", dict(exact, fused=False)),
            ("  + fused AdamW", exact),
            ("    + --freeze-vision", dict(exact, freeze=True)),
            ("    + --compact-states (not exact)", dict(exact, compact=True)),
            ("    + both", dict(exact, freeze=True, compact=True))]
    table = []
    for name, o in rows:
        phi = [p for p in every if not (o["freeze"] and id(p) in vision)]
        states, temp = adamw(phi, o)
        weights, grads = nbytes(every), nbytes(phi)
        v = restore = nbytes(phi)                                  # clones of phi: its shapes and dtypes
        lower = weights + grads + states + temp
        hyper = weights + (grads if o["kept"] else 0) + states + v + (0 if o["offload"] else restore)
        cols = [weights, grads, states, temp, v, 0 if o["offload"] else restore, lower, hyper, max(lower, hyper)]
        print(f"    {name:42s} " + " ".join(f"{x / GiB:{w}.2f}" for x, w in zip(cols, [7, 6, 6, 6, 6, 7, 6, 6, 6]))
              + f"  {max(lower, hyper) / nbytes(phi) * 4:.1f}")
        table.append(dict(zip(["option", "trainable", "weights", "grads", "adamw", "step", "v", "restore", "lower",
                               "hyper", "peak"], [name.strip(" +"), sum(p.numel() for p in phi)] + cols)))
    return table


def sharded_plan():
    """(0b) The per-GPU memory of a bi-level run sharded with FSDP2 over N GPUs (torchrun), by the
    same method as (0): the real modules on the meta device, fused AdamW, gradients freed before the
    hypergradient. Sharded (1/N each), at the larger of the two peaks: the lower step's fp32 master
    weights, gradients and AdamW's two moments (16 bytes per parameter), or the hypergradient's
    weights, moments, v and restore copy (20). Gathered whole, in bf16: the rest
    of the model (embeddings, norms; the root unit, kept after forward), and at a time the larger of
    the vision tower or two decoder layers (the one computing and the one prefetched). Activations
    come on top, as in (0)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel, Qwen2VLConfig, Qwen2VLModel
    GiB = 2 ** 30
    print("(0b) per-GPU memory of a bi-level run sharded over N GPUs with FSDP2 (torchrun), GiB before activations")
    print(f"    {'backbone':24s} {'N':>2s} {'sharded':>8s} {'gathered':>8s} {'per GPU':>8s}")
    rows = []
    for name, (Config, Model, spec) in {"Qwen2-VL-2B": (Qwen2VLConfig, Qwen2VLModel, QWEN2VL_2B),
                                        "Qwen2.5-VL-7B": (Qwen2_5_VLConfig, Qwen2_5_VLModel, QWEN25VL_7B)}.items():
        with torch.device("meta"):
            backbone = Model(Config(text_config=spec["text"], vision_config=spec["vision"]))
        params = sum(p.numel() for p in backbone.parameters())
        vision = sum(p.numel() for p in backbone.visual.parameters())
        layers = [sum(p.numel() for p in layer.parameters()) for layer in backbone.language_model.layers]
        root = params - vision - sum(layers)
        gathered = 2 * (root + max(vision, 2 * max(layers)))                     # bf16 bytes
        for n in ((1, 2, 8) if name == "Qwen2-VL-2B" else (8,)):
            sharded = 20 * params / n                                  # fp32 bytes at the peak, per GPU
            print(f"    {name + f' ({params / 1e9:.2f} B)':24s} {n:2d} {sharded / GiB:8.2f} {gathered / GiB:8.2f} "
                  f"{(sharded + gathered) / GiB:8.2f}")
            rows.append(dict(backbone=name, params=params, n=n, per_gpu=sharded + gathered))
    return rows


def distributed_rows(args):
    """(7) bilevel_train.py on the synthetic set and the 9.8 M backbone (U = 5, meta batch twice the
    train batch), one process of one thread against torchrun with 2 of one thread each (the PRM sharded
    with FSDP2 over gloo), runs taking turns: training CoTs per second from each run's own seconds per
    iteration (metrics.jsonl, its first row left out as warm-up), vanilla and DreamPRM, at train batch
    8 and 32. Then two independent 1-process DreamPRM runs at once (what 2 processes can gain on this
    machine without communicating), and one more 2-process DreamPRM run under cProfile: the share of
    process 0's iteration spent in collectives (transfers, and waits for the other process) and in
    FSDP2's copies around them."""
    import json
    import subprocess
    tmp = tempfile.mkdtemp()
    backbone = prm.save_tiny_backbone(os.path.join(tmp, "small"), **LOCAL_SIZES["small"])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    print("(7) bi-level training, 2 processes of 1 thread (torchrun, FSDP2, gloo) against 1 process of 1 thread, "
          "9.8 M backbone, U = 5")

    def launch_args(n):
        return [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                "--nproc-per-node=2"]

    def flags(batch, weighting, out):
        return ["--synthetic", "--model", backbone, "--weighting", weighting, "--iterations", "8" if batch <= 8 else "4",
                "--unroll-steps", "5", "--train-batch", str(batch), "--meta-batch", str(2 * batch), "--log-every", "1",
                "--no-baseline", "--out", out]

    def seconds_per_iteration(out):                   # a run's own timings, the first iteration left out
        return [json.loads(x)["time/seconds_per_iteration"] for x in open(os.path.join(out, "metrics.jsonl"))][1:]

    def run(n, batch, weighting, out, profile=None):
        script = ["bilevel_train.py"] if profile is None else [os.path.abspath(__file__), "--profile-run", profile]
        done = subprocess.run(launch_args(n) + script + flags(batch, weighting, out), cwd=root,
                              env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"a run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        return seconds_per_iteration(out)

    for batch in (8, 32):
        for weighting, name in (("fixed", "vanilla"), ("domain", "DreamPRM bi-level")):
            seconds = {1: [], 2: []}
            for r in range(args.repeats):
                for n in ((1, 2) if r % 2 == 0 else (2, 1)):
                    seconds[n] += run(n, batch, weighting, os.path.join(tmp, f"{weighting}-{batch}-{n}-{r}"))
            rate = {n: batch * 5 / (sum(s) / len(s)) for n, s in seconds.items()}             # training CoTs / s
            print(f"    batch {batch:2d}  {name:18s} 1 process {rate[1]:6.1f} CoTs/s   2 processes {rate[2]:6.1f} "
                  f"CoTs/s   {rate[2] / rate[1]:.2f}x")
        # The machine's own ceiling: two independent 1-process runs side by side, each with its own core.
        pair = [subprocess.Popen(launch_args(1) + ["bilevel_train.py"] + flags(batch, "domain", os.path.join(
            tmp, f"pair-{batch}-{i}")), cwd=root, env=dict(os.environ, OMP_NUM_THREADS="1"),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(2)]
        pair_rate = 0.0
        for i, p in enumerate(pair):
            assert p.wait() == 0
            rows = seconds_per_iteration(os.path.join(tmp, f"pair-{batch}-{i}"))
            pair_rate += batch * 5 / (sum(rows) / len(rows))
        print(f"    batch {batch:2d}  DreamPRM, two independent 1-process runs at once: {pair_rate:6.1f} CoTs/s together, "
              f"{pair_rate / rate[1]:.2f}x one alone (no communication: this machine's ceiling for 2 processes)")
        profile = os.path.join(tmp, f"collectives-{batch}.json")
        per_iteration = run(2, batch, "domain", os.path.join(tmp, f"profiled-{batch}"), profile)
        t = sum(per_iteration) / len(per_iteration)
        c = json.load(open(profile))
        print(f"    batch {batch:2d}  DreamPRM, 2 processes under cProfile: {t:.2f} s per iteration, of it "
              f"{c['collectives'] / c['iterations']:.2f} s in collectives ({c['collectives'] / c['iterations'] / t:.0%}) "
              f"and {c['copies'] / c['iterations']:.2f} s in FSDP2's copies around them")


def profile_run(out, argv):
    """--profile-run OUT (under torchrun, by distributed_rows): bilevel_train.py's run under cProfile;
    process 0 writes to OUT the seconds spent in c10d's collectives (transfers and waits) and in the
    copies FSDP2 makes into and out of them, in the run's iterations after the first."""
    import cProfile
    import json
    import pstats
    iterations, profiler, real = int(argv[argv.index("--iterations") + 1]), cProfile.Profile(), bt.end_of_iteration

    def end_of_iteration(run, done, *rest):              # iterations 2 .. last, without the last one's end
        if done == iterations:
            profiler.disable()
        real(run, done, *rest)
        if done == 1:
            profiler.enable()
    bt.end_of_iteration = end_of_iteration
    rank = prm.processes()[0]
    bt.cli(argv)
    if rank > 0:
        return
    seconds = {"collectives": 0.0, "copies": 0.0}
    for (_, _, name), (_, _, own, _, _) in pstats.Stats(profiler).stats.items():
        if "_distributed_c10d" in name:
            seconds["collectives"] += own
        elif any(k in name for k in ("split_with_sizes_copy", "_chunk_cat", "_foreach_copy_")):
            seconds["copies"] += own
    with open(out, "w") as f:
        json.dump(dict(seconds, iterations=iterations - 1), f)


def kept(model, c):
    """A record's kept encoding (prm.PRM.encode with cache=True returns it): the bench's records are
    made of encoded image CoTs."""
    return (model.encodings, model.final_answer, c)


def image_records(model, cots, batch):
    """batch training CoTs (three domains, MC labels) and batch meta CoTs (correct or not) made of
    encoded CoTs, for outer iterations on image data."""
    g = torch.Generator().manual_seed(0)
    train = [{"domain": ["clean", "noisy", "random"][b % 3], "_enc": kept(model, c), "_image": None, "_question": "q",
              "mc": torch.rand(len(c.step_ends), generator=g).round().tolist()} for b, c in enumerate(cots[:batch])]
    meta = [{"domain": "meta", "_enc": kept(model, c), "_image": None, "_question": "q", "correct": b % 2 == 0}
            for b, c in enumerate(cots[batch:2 * batch])]
    return train, meta


def outer_iteration(model, opt_phi, opt_a, a, train, meta, U, bilevel, offload, autocast, shared=False):
    """U lower steps on the training batch, then (bilevel) the upper step on the meta batch
    (shared: the shared-prefix forward, the batch's CoTs being of one question)."""
    keys = torch.tensor([["clean", "noisy", "random"].index(r["domain"]) for r in train], device=a[0].device)
    fwd = (bt.SharedPrefixForward if shared else bt.PackedForward)(model, autocast)
    w = bt.DomainWeighting(a, keys)
    for _ in range(U):
        last = bt.lower_step(fwd, opt_phi, w, bt.train_batch(train, keys, a[0].device), 1, math.inf)
    if bilevel:
        upper = bt.Upper(fwd, [p for p in model.parameters() if p.requires_grad], w, opt_a, 0.01,
                         bt.CpuCopy if offload else bt.device_copy, bt.meta_loss)
        bt.upper_step(upper, last, meta, 1e-4)


def question_records(model, questions, n, args, step_words, image_size, question_words):
    """Training records of `questions` questions with n CoTs each (an image and a prompt about as
    long as a CoT), in the form bilevel_train's steps take: encoded CoTs, MC labels, the prompt key."""
    g = torch.Generator().manual_seed(0)
    records = []
    for q in range(questions):
        for b, c in enumerate(make_cots(model, n, args.steps, step_words, image_size, question_words + q)):
            records.append({"domain": ["clean", "noisy", "random"][q % 3], "_enc": kept(model, c), "_image": None,
                            "_question": f"q{q}", "correct": b % 2 == 0,
                            "mc": torch.rand(len(c.step_ends), generator=g).round().tolist()})
    return records


def shared_training(model, args, device, autocast, step_words, image_size, question_words):
    """(4) packed against shared-prefix training (--group-by-question) on batches of 8 CoTs from
    8 / N questions, and the bi-level outer iteration against U plain steps for both."""
    print(f"(4) shared-prefix training (--group-by-question), 8 CoTs per batch, U={args.U}")
    model.train()
    a = [torch.zeros(3, device=device, requires_grad=True)]
    opt = bt.lower_optimizer([p for p in model.parameters() if p.requires_grad], 1e-7, 0.0, False, 0)
    opt_a = torch.optim.Adam(a)
    phi = [p for p in model.parameters() if p.requires_grad]
    for n in (4, 8):
        records = question_records(model, 8 // n, n, args, step_words, image_size, question_words)
        meta = question_records(model, 8 // n, n, args, step_words, image_size, question_words + 50)
        keys = torch.tensor([["clean", "noisy", "random"].index(r["domain"]) for r in records], device=device)
        tokens = sum(len(r["_enc"][2].input_ids) for r in records)

        w = bt.DomainWeighting(a, keys)

        def step(shared):
            fwd = (bt.SharedPrefixForward if shared else bt.PackedForward)(model, autocast)
            return bt.lower_step(fwd, opt, w, bt.train_batch(records, keys, device), 1, math.inf)

        def outer(shared):
            for _ in range(args.U):
                last = step(shared)
            fwd = (bt.SharedPrefixForward if shared else bt.PackedForward)(model, autocast)
            bt.upper_step(bt.Upper(fwd, phi, w, opt_a, 0.01, bt.device_copy, bt.meta_loss), last, meta, 1e-7)
        # packed and shared-prefix, a plain step and an outer iteration each, timed in turns
        t = interleaved([partial(step, False), partial(step, True), partial(outer, False), partial(outer, True)],
                        args.repeats, device)
        times = {False: (t[0], t[2]), True: (t[1], t[3])}
        for shared, name in ((False, "packed"), (True, "shared-prefix")):
            t, t_outer = times[shared]
            print(f"    N={n} {name:14s} {len(records) / t:8.1f} CoTs/s {tokens / t:9.0f} tokens/s   "
                  f"outer iteration / U plain steps = {t_outer / (args.U * t):.2f}x"
                  + (f"   shared / packed = {times[False][0] / t:.2f}x CoTs/s" if shared else ""))
    prompt = records[0]["_enc"][2].prompt_len
    print(f"    (prompt {prompt} tokens, CoT ~{(tokens - len(records) * prompt) // len(records)} tokens)")
    for p in model.parameters():
        p.grad = None


# The memory options, each added to the ones above it.
OPTIONS = [("foreach AdamW, restore on the device", {}),
           ("  + --offload-restore", dict(offload=True)),
           ("  + fused AdamW", dict(fused=True)),
           ("  + --grad-checkpointing", dict(checkpointing=True)),
           ("  + --group-by-question (one question)", dict(shared=True)),
           ("  + --compact-states (not exact)", dict(compact=True)),
           ("  + --freeze-vision", dict(freeze=True))]


def memory_options(model, cots, args, device, autocast):
    """(3) For each memory option: the peak memory of bi-level outer iterations on image CoTs, the
    seconds per outer iteration against U plain lower steps. CUDA: torch.cuda.max_memory_allocated;
    CPU: the weights plus the profiler's peak of what the iterations allocate."""
    train, meta = image_records(model, cots, args.batch)
    unit, scale = ("GiB", 2 ** 30) if args.size == "2b" else ("MiB", 2 ** 20)
    print(f"(3) bi-level outer iteration, U={args.U}, {args.batch} train and {args.batch} meta image CoTs "
          f"({sum(len(r['_enc'][2].input_ids) for r in train) // args.batch} tokens each on average)")
    print(f"    {'option':40s} {'peak ' + unit:>9s} {'bi-level s':>11s} {'U plain s':>10s}  bi-level / plain")
    o = dict(fused=False, offload=False, checkpointing=False, shared=False, compact=False, freeze=False)
    for name, change in OPTIONS:
        o.update(change)
        if change.get("checkpointing"):
            bt.enable_checkpointing(model)
        if change.get("freeze"):
            bt.freeze_vision(model)
        phi = [p for p in model.parameters() if p.requires_grad]
        a = [torch.zeros(3, device=device, requires_grad=True)]
        # foreach is torch's default on CUDA (said explicitly, so a CPU run measures the same)
        opt_phi = bt.lower_optimizer(phi, 1e-7, 0.0, o["compact"], 0, fused=True) if o["fused"] else \
            torch.optim.AdamW(phi, lr=1e-7, foreach=True)
        opt_a = torch.optim.Adam(a, lr=0.01)
        run = lambda bilevel: outer_iteration(model, opt_phi, opt_a, a, train, meta, args.U, bilevel,  # noqa: E731
                                              o["offload"], autocast, o["shared"])
        try:
            if device == "cuda":
                top = peak(lambda: (run(True), run(True)), device)[1]
            else:
                held = nbytes(model.parameters()) + nbytes(model.buffers())
                top = held + cpu_peak(lambda: (run(True), run(True)))[1]
            t_bilevel = timed(lambda: run(True), args.iterations, device)
            t_plain = timed(lambda: run(False), args.iterations, device)
            print(f"    {name:40s} {top / scale:9.2f} {t_bilevel:11.2f} {t_plain:10.2f}  {t_bilevel / t_plain:.2f}x")
        except torch.OutOfMemoryError:
            print(f"    {name:40s} out of memory")
        del opt_phi, opt_a, run
        for p in model.parameters():
            p.grad = None
        gc.collect()
    if device == "cpu":
        print("    (on a CPU run the restore copy is in the same memory: --offload-restore saves GPU memory only)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--profile-run"]:             # (7)'s worker under torchrun: profile_run
        return profile_run(argv[1], argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=prm.HelpFormatter)
    ap.add_argument("--size", choices=["tiny", "small", "2b"], default="tiny",
                    help="tiny backbone, a small one (hidden 512, 4 layers), or the Qwen2-VL-2B architecture")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--n", type=int, default=8, help="CoTs per question")
    ap.add_argument("--steps", type=int, default=5, help="steps per CoT")
    ap.add_argument("--step-words", type=int, default=None,
                    help="words per step (default: tiny 12; 2b 46, ~400-token CoTs of 5 steps)")
    ap.add_argument("--question-words", type=int, default=None,
                    help="words of question (default: tiny 45; 2b 68, a 388-token prompt with the 448x448 image)")
    ap.add_argument("--U", type=int, default=5, help="lower steps per outer iteration")
    ap.add_argument("--batch", type=int, default=8, help="CoTs per training step (train and meta)")
    ap.add_argument("--iterations", type=int, default=3, help="timed outer iterations per option in (3), median reported")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats in (1) and (2), median reported")
    ap.add_argument("--only", choices=["budget", "options", "shared", "families", "packing", "distributed"], default=None,
                    help="budget: the 2B memory budget (0) only (any machine); options: (3) only; shared: (4) only; "
                         "families: (5) only; packing: (6) only")
    ap.add_argument("--budget", action="store_true", help="the same as --only budget")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device on this machine (the 2B memory budget alone runs anywhere: "
              "--only budget)", file=sys.stderr)
        sys.exit(2)
    torch.manual_seed(0)
    only = "budget" if args.budget else args.only
    if only == "families":
        family_rows(args)
        return
    if only == "distributed":
        distributed_rows(args)
        return
    if only == "budget" or (args.size == "2b" and only is None):
        memory_budget()
        sharded_plan()
        if only == "budget":
            return
    device = args.device
    step_words = args.step_words or (12 if args.size in LOCAL_SIZES else 46)
    question_words = args.question_words or (45 if args.size in LOCAL_SIZES else 68)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    model, image_size = build(args.size, device)
    n_params = sum(p.numel() for p in model.parameters())
    cots = make_cots(model, max(args.n, 2 * args.batch), args.steps, step_words, image_size, question_words)
    scored = cots[:args.n]
    tokens = sum(len(c.input_ids) for c in scored)
    print(f"size={args.size} ({n_params / 1e6:.1f} M parameters) device={device} threads={torch.get_num_threads()} "
          f"N={args.n} steps={args.steps} prompt={cots[0].prompt_len} tokens, CoT tokens "
          f"~{(tokens - args.n * cots[0].prompt_len) // args.n}" + (f" gpu={torch.cuda.get_device_name()}" if device == "cuda" else ""))
    if only == "options":
        memory_options(model.train(), cots, args, device, autocast)
        return
    if only == "shared":
        shared_training(model, args, device, autocast, step_words, image_size, question_words)
        return
    if only == "packing":
        packing_rows(model.eval(), args, device)
        return

    model.eval()
    with torch.no_grad(), autocast:
        t_prefix = timed(lambda: prm.prefix_values(model, scored), args.repeats, device)
        t_packed = timed(lambda: prm.step_values(model, scored), args.repeats, device)
        t_shared = timed(lambda: prm.shared_prefix_values(model, scored), args.repeats, device)
        _, m_prefix = peak(lambda: prm.prefix_values(model, scored), device)
        _, m_packed = peak(lambda: prm.step_values(model, scored), device)
        _, m_shared = peak(lambda: prm.shared_prefix_values(model, scored), device)
        v_packed, mask = prm.step_values(model, scored)
        v_shared, _ = prm.shared_prefix_values(model, scored)
    gib = lambda m: "" if m is None else f"   peak {m / 2 ** 30:.2f} GiB"  # noqa: E731
    print(f"(1) scoring one question ({args.n} CoTs)")
    print(f"    per-prefix     {t_prefix * 1e3:10.2f} ms{gib(m_prefix)}")
    print(f"    packed         {t_packed * 1e3:10.2f} ms{gib(m_packed)}   per-prefix / packed = {t_prefix / t_packed:.1f}x")
    print(f"    shared-prefix  {t_shared * 1e3:10.2f} ms{gib(m_shared)}   per-prefix / shared = {t_prefix / t_shared:.1f}x, "
          f"packed / shared = {t_packed / t_shared:.2f}x, max |difference| {(v_packed - v_shared)[mask].abs().max():.2e}")

    model.train()
    opt = bt.lower_optimizer([p for p in model.parameters() if p.requires_grad], 1e-7, 0.0, False, 0)
    batch = (scored * ((args.batch + len(scored) - 1) // len(scored)))[:args.batch]
    t_train_prefix = timed(lambda: train_per_prefix(model, opt, batch, autocast), max(1, args.repeats // 2), device)
    t_train_packed = timed(lambda: train_packed(model, opt, batch, autocast), args.repeats, device)
    _, m_train_packed = peak(lambda: train_packed(model, opt, batch, autocast), device)
    print(f"(2) training, {args.batch} CoTs per step")
    print(f"    per-prefix     {t_train_prefix / args.batch * 1e3:10.2f} ms per CoT")
    print(f"    packed         {t_train_packed / args.batch * 1e3:10.2f} ms per CoT{gib(m_train_packed)}   "
          f"per-prefix / packed = {t_train_prefix / t_train_packed:.1f}x")
    train_tokens = sum(len(c.input_ids) for c in batch)
    model_tflops = 6 * n_params * train_tokens / t_train_packed / 1e12
    bf16 = matmul_tflops(device)
    line = (f"    packed training: {model_tflops * 1e3:.2f} model GFLOP/s (6 x params x tokens); bf16 matmul "
            f"measured {bf16 * 1e3:.1f} GFLOP/s: {model_tflops / bf16:.1%} of it")
    if device == "cpu":                      # many CPUs have no fast bf16: show fp32 beside it
        fp32 = matmul_tflops(device, torch.float32)
        line += f"; fp32 matmul {fp32 * 1e3:.1f} GFLOP/s: {model_tflops / fp32:.1%}"
    print(line)
    del opt
    for p in model.parameters():
        p.grad = None
    shared_training(model, args, device, autocast, step_words, image_size, question_words)
    memory_options(model, cots, args, device, autocast)


if __name__ == "__main__":
    main()
