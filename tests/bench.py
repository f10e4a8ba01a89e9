"""Benchmark: speed ratios measured side by side in one run (not collected by pytest).

    python tests/bench.py                       # tiny backbone on CPU
    python tests/bench.py --n 8 --steps 5 --repeats 5

Prints (1) scoring time per question for N CoTs: one forward per step prefix against packed
(all N CoTs in one forward); (3) one bi-level outer iteration (U lower steps + the hypergradient)
against U plain lower steps, and the peak memory of each (CPU: peak RSS of a child process running
only that loop; CUDA: torch.cuda.max_memory_allocated). Needs only torch and transformers.
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
import prm  # noqa: E402


def timed(fn, repeats):
    """Median wall time of fn() over repeats, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def question_cots(model, n, steps, image):
    """N CoTs of one question, `steps` steps each, of different lengths."""
    words = "we read the image and count the red circles then add the blue squares to get the total".split()
    return [prm.encode_cot(model.tokenizer, "How many shapes are in the image?",
                           [f"Step {i + 1}: " + " ".join(words[: 6 + (3 * b + 5 * i) % 12]) for i in range(steps)],
                           str(b), image, model.image_processor) for b in range(n)]


def training_loop(model, mode, U, batch, iterations, device):
    """Run `iterations` outer iterations of plain (U lower steps) or bilevel training; returns the
    median seconds per iteration."""
    import bilevel_train as bt
    train, meta = bt.synthetic_data(0, 32, 32)
    phi = [p for p in model.parameters() if p.requires_grad]
    a = torch.zeros(3, device=device, requires_grad=True)
    opt_phi, opt_a = torch.optim.AdamW(phi, lr=1e-4), torch.optim.Adam([a], lr=0.01)
    args = argparse.Namespace(no_aggregation=False, upper_loss="mse", weighting="domain", fd_radius=0.01)
    autocast = torch.autocast(device, enabled=False)
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
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times[1:])[len(times[1:]) // 2]


def peak_memory_child(mode, args):
    """Peak RSS (MiB) of a child process that loads the model and runs only this loop."""
    out = subprocess.run([sys.executable, __file__, "--_loop", mode, "--U", str(args.U), "--batch", str(args.batch),
                          "--iterations", "3"], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8, help="CoTs per question")
    ap.add_argument("--steps", type=int, default=5, help="steps per CoT")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--U", type=int, default=5, help="lower steps per outer iteration")
    ap.add_argument("--batch", type=int, default=8, help="train and meta CoTs per step")
    ap.add_argument("--iterations", type=int, default=10, help="timed outer iterations")
    ap.add_argument("--_loop", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._loop:        # child process: one loop, then its peak memory
        with tempfile.TemporaryDirectory() as tmp:
            model = prm.PRM.from_backbone(prm.save_tiny_backbone(os.path.join(tmp, "tiny"))).train()
            training_loop(model, args._loop, args.U, args.batch, args.iterations, "cpu")
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return
    from PIL import Image
    with tempfile.TemporaryDirectory() as tmp:
        model = prm.PRM.from_backbone(prm.save_tiny_backbone(os.path.join(tmp, "tiny"))).to(args.device).eval()
        image = Image.new("RGB", (112, 112), (200, 30, 30))
        cots = question_cots(model, args.n, args.steps, image)
        with torch.no_grad():
            t_prefix = timed(lambda: prm.prefix_values(model, cots), args.repeats)
            t_packed = timed(lambda: prm.step_values(model, cots), args.repeats)
    print(f"device={args.device} size=tiny N={args.n} steps={args.steps} threads={torch.get_num_threads()}")
    print("(1) scoring one question (N CoTs)")
    print(f"    per-prefix  {t_prefix * 1e3:9.2f} ms")
    print(f"    packed      {t_packed * 1e3:9.2f} ms   per-prefix / packed = {t_prefix / t_packed:.1f}x")
    with tempfile.TemporaryDirectory() as tmp:
        model = prm.PRM.from_backbone(prm.save_tiny_backbone(os.path.join(tmp, "tiny"))).to(args.device).train()
        t_plain = training_loop(model, "plain", args.U, args.batch, args.iterations, args.device)
        t_bilevel = training_loop(model, "bilevel", args.U, args.batch, args.iterations, args.device)
    print(f"(3) one outer iteration, U={args.U}, {args.batch} train and {args.batch} meta CoTs per step")
    print(f"    U plain lower steps   {t_plain * 1e3:9.2f} ms")
    print(f"    bi-level iteration    {t_bilevel * 1e3:9.2f} ms   bi-level / plain = {t_bilevel / t_plain:.2f}x")
    if args.device == "cpu":
        m_plain, m_bilevel = peak_memory_child("plain", args), peak_memory_child("bilevel", args)
        print(f"    peak RSS plain {m_plain:.0f} MiB, bi-level {m_bilevel:.0f} MiB   ratio {m_bilevel / m_plain:.2f}")


if __name__ == "__main__":
    main()
