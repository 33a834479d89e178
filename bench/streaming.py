"""Server peak memory of the streaming fit stage vs Flower's legacy loop, GPT-2 XL-shaped payloads (issue 6).

Each run is a fresh server process (peak RSS = ``VmHWM``) that runs ONE fit round of CollabEdit
over N clients through a Grid: :class:`fedke.simulations.streaming.StreamingServer` (``streaming``)
or Flower's own ``Server.fit_round`` over ``GridClientProxy`` (``legacy``; it collects every reply
before ``aggregate_fit``). The Grid stands in for a SuperLink in another process: what the server
pushes leaves the process (the message's content is dropped), and a reply is read from disk only
when the server pulls it, as Flower bytes (the default payload: Delta, packed K K^T, R K^T, float32,
16 edits; bench/privacy.py's large_layers replies). The replies are converted Message ->
``FitRes`` by Flower's own compat functions on both paths.

Usage: ``python bench/streaming.py [--quick | --shape D_IN,D_OUT,LAYERS] [--clients 2,4] [--paths streaming,legacy] [--out JSON]``
(full size: ~0.8 GiB of replies per client on disk, several GiB of RAM; wrap in
``flock /tmp/fedke-heavy.lock``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table, write_json  # noqa: E402

_SERVER = r"""
import json, sys, threading, time
from pathlib import Path
from types import SimpleNamespace
from flwr.app import Message, RecordDict
from flwr.common import Code, FitRes, Parameters, Status
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.compat.common import recorddict_compat as compat
from flwr.server import Server, SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.supercore.task_identity import TaskIdentity
from fedke.simulations.streaming import StreamingServer
from fedke.simulations.synthetic import synthetic_regularisers, synthetic_specs, peak_rss_mb  # VmHWM
from fedke.strategies import CollabEdit

d_in, d_out, layers, n = (int(x) for x in sys.argv[1:5]); path = sys.argv[5]; folder = Path(sys.argv[6])
TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID  # as start_grid sets them
baseline = peak_rss_mb()

class DiskGrid:
    run = SimpleNamespace(run_id=1)
    def __init__(self):
        self.inbox, self.counter, self.lock, self.pulled = {}, 0, threading.Lock(), 0
    def get_node_ids(self):
        return list(range(n))
    def push_messages(self, messages):
        ids = []
        with self.lock:
            for message in messages:
                self.counter += 1
                message_id = f"m{self.counter}"
                message.metadata.__dict__["_message_id"] = message_id
                message.content = RecordDict()  # sent: the SuperLink's process holds it now
                self.inbox[message_id] = message
                ids.append(message_id)
        return ids
    def pull_messages(self, message_ids):
        out = []
        for message_id in message_ids:
            with self.lock:
                message = self.inbox.pop(message_id, None)
                self.pulled += message is not None
            if message is None:
                continue
            tensors = [p.read_bytes() for p in sorted((folder / str(message.metadata.dst_node_id)).iterdir())]
            reply = FitRes(Status(Code.OK, ""), Parameters(tensors, "numpy.ndarray"), 16, {})
            del tensors
            out.append(Message(compat.fitres_to_recorddict(reply, keep_input=False), reply_to=message))
        return out
    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))

specs = synthetic_specs(d_in, d_out, layers)
strategy = CollabEdit(layer_specs=specs, regularisers=synthetic_regularisers(specs), max_norm=None, psd_tol=None,
                      min_fit_clients=n, min_available_clients=n, min_evaluate_clients=0, fraction_evaluate=0.0)
grid = DiskGrid()
manager = SimpleClientManager()
for node_id in grid.get_node_ids():
    manager.register(GridClientProxy(node_id=node_id, grid=grid, run_id=1))
server = (StreamingServer(client_manager=manager, strategy=strategy, poll_interval=0.05) if path == "streaming"
          else Server(client_manager=manager, strategy=strategy))
ready = peak_rss_mb()
t0 = time.perf_counter()
_, metrics, _ = server.fit_round(1, None)
assert metrics["applied"] and metrics["n_accepted"] == n, metrics
print(json.dumps({"n": n, "path": path, "seconds": time.perf_counter() - t0, "baseline_rss_mb": baseline,
                  "ready_rss_mb": ready, "peak_rss_mb": peak_rss_mb(), "pulled": grid.pulled}))
"""


def log(message: str) -> None:
    print(f"[streaming {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _server_run(specs, n: int, path: str, folder: Path) -> dict:
    spec = specs[0]
    out = subprocess.run([sys.executable, "-c", _SERVER, str(spec.d_in), str(spec.d_out), str(len(specs)), str(n),
                          path, str(folder)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"server run ({path}, {n} clients) failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON output path")
    parser.add_argument("--quick", action="store_true", help="layers of (160, 640) instead of GPT-2 XL's (1600, 6400)")
    parser.add_argument("--shape", help="d_in,d_out,layers (overrides --quick and GPT-2 XL's 6400,1600,5)")
    parser.add_argument("--clients", default="2,4", help="comma-separated numbers of clients")
    parser.add_argument("--paths", default="streaming", help="comma-separated: streaming, legacy")
    args = parser.parse_args(argv)
    from privacy import _write_replies  # the large_layers replies: same payloads as bench/privacy.py

    from fedke.simulations.synthetic import synthetic_specs

    specs = synthetic_specs(640, 160, 5) if args.quick else synthetic_specs()
    if args.shape:
        d_in, d_out, layers = (int(x) for x in args.shape.split(","))
        specs = synthetic_specs(d_in, d_out, layers)
    counts = sorted({int(c) for c in args.clients.split(",")})
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if set(paths) - {"streaming", "legacy"}:
        parser.error(f"unknown paths {paths}")
    spec = specs[0]
    log(f"{len(specs)} layers of ({spec.d_out}, {spec.d_in}); clients {counts}; paths {paths}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedke-stream-") as tmp:
        nbytes = _write_replies(Path(tmp), specs, max(counts), "float32")
        for path in paths:
            for n in counts:
                run = _server_run(specs, n, path, Path(tmp))
                log(f"{path}, {n} clients: peak {run['peak_rss_mb']:.0f} MiB")
                rows.append({"path": path, "clients": n, "ready_MiB": run["ready_rss_mb"], "peak_rss_MiB": run["peak_rss_mb"],
                             "peak_minus_ready_MiB": run["peak_rss_mb"] - run["ready_rss_mb"], "seconds": run["seconds"]})
    gram_mib = len(specs) * 8 * spec.d_in ** 2 / 2**20
    print_table(rows, ["path", "clients", "ready_MiB", "peak_rss_MiB", "peak_minus_ready_MiB", "seconds"],
                f"Server peak RSS, one CollabEdit round ({nbytes / 2**20:.0f} MiB per reply; layers x d_in^2 float64 = {gram_mib:.0f} MiB)")
    write_json(args.out, {"layers": len(specs), "d_in": spec.d_in, "d_out": spec.d_out, "bytes_per_reply": int(nbytes),
                          "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
