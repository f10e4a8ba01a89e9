"""A local stand-in for an OpenAI-compatible chat-completions server (vLLM, SGLang), for the
engine tests and bench: it answers every request after a fixed latency, any number at once, and
counts the requests and the peak number in flight. Answers are a pure function of the request, so
a rerun gets the same texts. It listens on 127.0.0.1 only.
"""
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STEPS = ["Step 1: Restate the question.", "Step 2: The image shows 3 and 4.", "Step 3: Add them.",
         "Step 4: 3 + 4 = {s}.", "Step 5: The sum is {s}."]


def answer(body, i):
    """A structured CoT, or the continuation of an assistant prefix; right (7) or wrong (8) by a hash."""
    digest = hashlib.sha1(json.dumps([body["messages"], i]).encode()).digest()
    s = 7 if digest[0] % 2 else 8
    if body.get("continue_final_message"):
        done = body["messages"][-1]["content"].count("Step ")
        return "\n" + "\n".join(x.format(s=s) for x in STEPS[done:]) + f"\nFinal answer: {s}"
    return "\n".join(x.format(s=s) for x in STEPS) + f"\nFinal answer: {s}"



def send_json(handler, obj, code=200):
    """Answer an HTTP request with a JSON body (the stand-in servers of the tests share it)."""
    data = json.dumps(obj).encode()
    handler.send_response(code)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)

class StandIn:
    """`with StandIn(latency) as server:` server.url, server.requests, server.peak.

    After `server.reset(hold=k)` each request waits (at most `HOLD_S` seconds) until k requests have
    been in flight at once, then answers after the latency: a client that keeps k requests in flight
    reaches a peak of k however slowly its threads are scheduled, and one that does not stays below."""

    HOLD_S = 10.0

    def __init__(self, latency=0.2, port=0):
        self.latency, self.requests, self.peak, self.in_flight, self.hold = latency, 0, 0, 0, 0
        self.lock = threading.Condition()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests += 1
                    outer.in_flight += 1
                    outer.peak = max(outer.peak, outer.in_flight)
                    outer.lock.notify_all()
                    outer.lock.wait_for(lambda: outer.peak >= outer.hold, timeout=outer.HOLD_S)
                time.sleep(outer.latency)
                choices = [{"index": i, "message": {"role": "assistant", "content": answer(body, i)}}
                           for i in range(body.get("n", 1))]
                with outer.lock:
                    outer.in_flight -= 1
                send_json(self, {"choices": choices})

            def do_GET(self):                 # /stats: the counts; /reset: zero them
                if self.path.endswith("/reset"):
                    outer.reset()
                send_json(self, {"requests": outer.requests, "peak": outer.peak})

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.server.request_queue_size = 1024
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        return False

    def reset(self, hold=0):
        with self.lock:
            self.requests = self.peak = 0
            self.hold = hold


def write_questions(path, n):
    """n text-only questions (the answer key 7), JSON Lines."""
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"q{i}", "domain": "d", "question": f"What is 3 + 4? (#{i})",
                                "answer": "7"}) + "\n")
    return str(path)


class StandInProcess:
    """The stand-in in a process of its own, so that its threads do not share the measured client's
    interpreter lock: `with StandInProcess(latency) as server:` server.url, server.stats(), server.reset()."""

    def __init__(self, latency=0.2):
        import subprocess
        import sys
        self.proc = subprocess.Popen([sys.executable, __file__, str(latency)], stdout=subprocess.PIPE, text=True)
        self.url = self.proc.stdout.readline().strip()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()
        return False

    def _get(self, what):
        import urllib.request
        with urllib.request.urlopen(self.url.rsplit("/v1", 1)[0] + "/" + what) as r:
            return json.loads(r.read())

    def stats(self):
        return self._get("stats")

    def reset(self):
        self._get("reset")


if __name__ == "__main__":
    import sys
    with StandIn(float(sys.argv[1])) as server:
        print(server.url, flush=True)
        while True:
            time.sleep(3600)
