"""Benchmark: speed ratios measured side by side in one run (not collected by pytest).

    python tests/bench.py                       # tiny backbone on CPU
    python tests/bench.py --n 8 --steps 5 --repeats 5

Prints (1) scoring time per question for N CoTs: one forward per step prefix against packed
(all N CoTs in one forward). Needs only torch and transformers.
"""
import argparse
import os
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8, help="CoTs per question")
    ap.add_argument("--steps", type=int, default=5, help="steps per CoT")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args(argv)
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


if __name__ == "__main__":
    main()
