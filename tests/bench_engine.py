"""Engine bench: how full gen_cots.py and mc_label.py keep an OpenAI-compatible server.

A local stand-in server (tests/engine_server.py) answers every request after a fixed latency, any
number at once. For each stage it prints the requests, the peak requests in flight, the wall time
and its ratio to the ideal, requests x latency / concurrency + one latency + the start-up (the
time of the same command rerun with nothing left to do).
Not a test: the figures depend on the machine.

    python tests/bench_engine.py                       # 1,024 requests per stage at 0.2 s, concurrency 64
    python tests/bench_engine.py --questions 64 --concurrency 8
"""
import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=1024, help="questions for gen_cots.py (one request each)")
    ap.add_argument("--n", type=int, default=4, help="CoTs per question")
    ap.add_argument("--label-cots", type=int, default=256, help="CoTs for mc_label.py (4 requests each: 5 steps)")
    ap.add_argument("--latency", type=float, default=0.2, help="seconds per request")
    ap.add_argument("--concurrency", type=int, default=64, help="--concurrency of both stages")
    ap.add_argument("--root", default=os.path.dirname(HERE), help="the project checkout to measure")
    args = ap.parse_args()
    sys.path[:0] = [args.root, HERE]
    import gen_cots
    import mc_label
    from engine_server import StandInProcess, write_questions

    with StandInProcess(args.latency) as server, tempfile.TemporaryDirectory() as tmp:
        questions = write_questions(os.path.join(tmp, "q.jsonl"), args.questions)
        cots = os.path.join(tmp, "cots.jsonl")
        common = ["--policy", "openai", "--base-url", server.url, "--concurrency", str(args.concurrency)]
        print(f"stand-in server: {args.latency} s per request; --concurrency {args.concurrency}")

        def stage(name, fn, flags):
            server.reset()
            t0 = time.perf_counter()
            fn(flags + common)
            wall = time.perf_counter() - t0
            stats = server.stats()
            t0 = time.perf_counter()
            fn(flags + common)                 # the same command again: all done, so this is its start-up
            startup = time.perf_counter() - t0
            ideal = stats["requests"] * args.latency / args.concurrency + args.latency + startup
            print(f"{name:12s} requests {stats['requests']:5d}   peak in flight {stats['peak']:4d}   "
                  f"wall {wall:7.2f} s   ideal {ideal:6.2f} s (start-up {startup:.2f} s)   "
                  f"wall / ideal = {wall / ideal:.2f}x")

        stage("gen_cots.py", gen_cots.main, ["--questions", questions, "--out", cots, "--n", str(args.n)])
        sub = os.path.join(tmp, "label_cots.jsonl")              # mc_label on the first label-cots CoTs
        with open(sub, "w") as f:
            f.write("".join(line for line in open(cots).readlines()[:args.label_cots]))
        stage("mc_label.py", mc_label.main, ["--cots", sub, "--out", os.path.join(tmp, "l.jsonl"), "--rollouts", "4"])


if __name__ == "__main__":
    main()
