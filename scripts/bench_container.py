#!/usr/bin/env python3
"""Update time on the compose mesh: a container restart against a hot swap, under the same load.

Paper benchmarks, item 1. The usual way to update a containerised inference service is to
restart its container with the new version; isomesh instead swaps the module inside the running
node. This script measures both on the real compose mesh (compose.yaml, images from
`make images`), with the broker and device node d1 only (0.25 CPU: 130-300 ms a photo), while the
host's `isomesh camera` sends photos to d1 at a steady rate (2/s by default) and every answer is
timestamped here on arrival:

  restart  `docker-compose restart d1`: SIGTERM, the node answers the jobs it accepted, stops, and
           a new process starts with the same volume and MQTT session. Measured: the command's
           duration, the time from the command to the first answer of the new process, the
           longest gap between consecutive answers, and the answers that came meanwhile.
  swap     the rollout service's one-shot `isomesh rollout` of module 0.2.0, as
           tests/compose/main.rs runs it (`rollout_command`, `--node=d1 --wait`). Measured: the
           command's duration (it compiles the module, publishes it, and waits until d1 serves
           it), the time to the first answer computed by 0.2.0, the longest gap between answers,
           and the answers 0.1.0 gave meanwhile.
  model    then a model rollout: `isomesh rollout 0.2.0.wasm --model ... --version 0.3.0` in the
           rollout container (models/files mounted), the broker holding 0.2.0's manifest: the
           command publishes the model alone and d1 builds its plan, compiling nothing. The same
           figures.

The longest gap is what a client sees of an update; jobs lost or failed are what it must not
see. Both come from the same camera run, so load, module and machine are the same. The camera
counts sent, answered, missing, errors and duplicates for the whole run; each lost job is put
down to the update it was sent during. The script exits 1 if any update lost a job or any job
failed: a job sent to a restarting node waits in its MQTT session and must be answered when the
node is back.

  python3 scripts/bench_container.py [--rate 2] [--quick] [--out bench-out/container.json]
"""

import argparse
import io
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The rollout service's command as tests/compose/main.rs `rollout_command` builds it, with the
# flags its broker-restart test adds to roll out to d1 alone (the only node running here).
ROLLOUT_S = 120
ROLLOUT = [
    "run", "--rm", "-T", "rollout",
    "/usr/bin/isomesh", "rollout", "/usr/share/isomesh/mobilenet_v2-0.2.0.wasm",
    "--name=mobilenet_v2", "--version=0.2.0", "--key=/keys/rollout.key",
    "--broker=mqtt://broker:1883", "--compile-cache=/var/cache/isomesh",
    "--node=d1", "--wait", f"--timeout-s={ROLLOUT_S}",
]
# Then a model rollout on that code: the model alone (`--model`), from the repository's models/files
# mounted into the rollout container; the broker holds 0.2.0's manifest, signed by the same key.
MODEL_VERSION = "0.3.0"


def model_rollout(project_dir):
    return [
        "run", "--rm", "-T", "-v", f"{project_dir / 'models/files'}:/models:ro", "rollout",
        "/usr/bin/isomesh", "rollout", "/usr/share/isomesh/mobilenet_v2-0.2.0.wasm",
        "--model=/models/mobilenet_v2_1.0_224_dequant.onnx",
        "--labels=/models/imagenet_labels.txt", f"--version={MODEL_VERSION}",
        "--key=/keys/rollout.key", "--broker=mqtt://broker:1883",
        "--node=d1", "--wait", f"--timeout-s={ROLLOUT_S}",
    ]


# d1 drains at most a job or two, within the 30 s stop_grace_period of compose.yaml.
RESTART_S = 45
# As the compose tests allow for the mesh to come up on a loaded machine.
READY_S = 240


def fail(message):
    sys.exit(f"bench_container: {message}")


def log(message):
    print(f"bench_container: {message}", file=sys.stderr, flush=True)


def run(args, **kw):
    return subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, **kw)


def preflight(project_dir):
    if not shutil.which("docker") or run(["docker", "info"]).returncode != 0:
        fail("`docker info` failed: is Docker Engine installed and running?")
    if not shutil.which("docker-compose"):
        fail("docker-compose is missing (Debian package docker-compose)")
    for image in ["isomesh:latest", "isomesh-rollout:latest"]:
        if run(["docker", "image", "inspect", image]).returncode != 0:
            fail(f"image {image} is missing: run `make images`")
    # compose.yaml mounts ./target/compose/keys into the rollout service; the nodes trust the
    # public key baked into the image. A key from another checkout would have the rollout
    # refused only after minutes of load, so compare them now.
    pub = project_dir / "target/compose/keys/rollout.key.pub"
    if not pub.is_file() or not pub.with_suffix("").is_file():
        fail(f"{pub.with_suffix('')} is missing: run `make images` (it makes the rollout key), "
             "or point --project-dir at the checkout whose `make images` built the images")
    container = run(["docker", "create", "isomesh:latest"], text=True).stdout.strip()
    try:
        tar = run(["docker", "cp", f"{container}:/etc/isomesh/rollout.key.pub", "-"]).stdout
    finally:
        run(["docker", "rm", container])
    baked = tarfile.open(fileobj=io.BytesIO(tar)).extractfile("rollout.key.pub").read()
    if baked != pub.read_bytes():
        fail(f"the images trust another rollout key than {pub}: point --project-dir at the "
             "checkout whose `make images` built them, or run `make images` here")


def machine():
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model name")), platform.processor())
    version = lambda *cmd: run(list(cmd), text=True).stdout.strip()
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        # Other work on the machine (a build, another compose project) slows the rollout's compile.
        "loadavg_at_start": list(os.getloadavg()),
        "docker": version("docker", "version", "--format", "{{.Server.Version}}"),
        "docker_compose": version("docker-compose", "version", "--short"),
    }


class Mesh:
    """A compose project of its own (own name, host port and subnet), beside any other."""

    def __init__(self, project_dir, images):
        self.project = f"isomesh-bench-{os.getpid()}"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.cwd = project_dir
        self.env = dict(os.environ, ISOMESH_MQTT_PORT=str(self.port), ISOMESH_IMAGES=str(images),
                        # The compose tests take 10.213.x.0/24; a test run may be going on.
                        ISOMESH_SUBNET=f"10.214.{os.getpid() % 250}.0/24")
        self.env.pop("ISOMESH_BROKER_URL", None)

    def compose(self, *args, check=True):
        out = run(["docker-compose", "-p", self.project, "-f", str(REPO / "compose.yaml"),
                   "--project-directory", str(self.cwd), *args],
                  cwd=self.cwd, env=self.env, text=True)
        if check and out.returncode != 0:
            fail(f"docker-compose {' '.join(args)} exited {out.returncode}:\n{out.stdout}{out.stderr}")
        return out

    def broker_url(self):
        return f"mqtt://127.0.0.1:{self.port}"


class Camera:
    """`isomesh camera --json`, every answer timestamped on arrival by a reader thread."""

    def __init__(self, isomesh, images, broker, rate, count):
        self.proc = subprocess.Popen(
            [str(isomesh), "camera", str(images), "--broker", broker, "--node", "d1",
             "--rate", str(rate), "--count", str(count), "--budget-ms", "0",
             "--id", f"bench-camera-{os.getpid()}", "--wait-ready-s", str(READY_S),
             "--timeout-s", "60", "--json"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.answers = []  # (time.monotonic() on arrival, answer)
        self.summary = None
        self.stderr = []
        self.out = threading.Thread(target=self._read, daemon=True)
        self.out.start()
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()

    def _read(self):
        for line in iter(self.proc.stdout.readline, ""):
            arrived = time.monotonic()
            try:
                value = json.loads(line)
            except ValueError:
                self.stderr.append(f"(stdout) {line}")
                continue
            if "summary" in value:
                self.summary = value["summary"]
            else:
                self.answers.append((arrived, value))

    def ended(self):
        return not self.out.is_alive()

    def wait(self, what, found, within):
        """Polls `found()` until it is not None; fails after `within` s or if the camera ends."""
        deadline = time.monotonic() + within
        while (result := found()) is None:
            if self.ended():
                fail(f"the camera ended before {what} (exit {self.proc.wait()}):\n"
                     + "".join(self.stderr[-20:]))
            if time.monotonic() > deadline:
                fail(f"no {what} within {within} s")
            time.sleep(0.05)
        return result

    def steady_for(self, span, after, max_gap):
        """When answers arriving after `after` first span `span` s with no gap over `max_gap`."""
        start = prev = None
        for t, _ in list(self.answers):
            if t < after:
                continue
            if prev is None or t - prev > max_gap:
                start = t
            prev = t
            if t - start >= span:
                return t
        return None

    def first(self, after, test=lambda answer: True):
        return next((t for t, a in list(self.answers) if t > after and test(a)), None)


def window(answers, t0, back, end):
    """Figures of one update started at t0, serving again at `back`, watched until `end`."""
    before = [t for t, _ in answers if t < t0]
    inside = [(t, a) for t, a in answers if t0 <= t <= end]
    # The gap that spans the command's start counts: it starts at the last answer before it.
    times = before[-1:] + [t for t, _ in inside]
    gaps = [(b - a, a) for a, b in zip(times, times[1:])]
    gap, at = max(gaps) if gaps else (0.0, t0)
    return {
        "longest_gap_s": round(gap, 3),
        "longest_gap_from_s": round(at - t0, 3),
        "answers_during": sum(1 for t, _ in inside if t < back),
        "error_answers": sum(1 for _, a in inside if "error" in a),
        "max_round_trip_ms": round(max((a.get("round_trip_ms", 0) for _, a in inside), default=0)),
    }


def rollout_phase(mesh, camera, events, name, command, version, tail, max_gap):
    """Runs the rollout service's `command` (a rollout to d1 that waits for it) under the
    camera's stream; its figures, with its command's times added to `events` as `{name}_command`
    and `{name}_command_end`."""
    log(f"{name}: docker-compose {' '.join(command[:4])} ... {version} --node=d1 --wait")
    t0 = time.monotonic()
    rollout = mesh.compose(*command, check=False)
    t_cmd = time.monotonic()
    if rollout.returncode != 0:
        fail(f"the {name} rollout exited {rollout.returncode}:\n{rollout.stdout}{rollout.stderr}")
    events.update({f"{name}_command": t0, f"{name}_command_end": t_cmd})
    new = lambda a: a.get("module", {}).get("version") == version
    back = camera.wait(f"answer from {version}", lambda: camera.first(t0, new),
                       max(5, ROLLOUT_S - (t_cmd - t0)))
    end = camera.wait(f"steady answers after the {name} rollout",
                      lambda: camera.steady_for(tail, max(back, t_cmd), max_gap), tail + 60)
    log(f"{name}: {version} answering after {back - t0:.1f} s (rollout command "
        f"{t_cmd - t0:.1f} s)")
    # The command's own account (`isomesh rollout --wait`, started inside its container, so
    # without docker-compose starting that container): when d1's status said it served.
    said = re.search(r"^d1\s+\S+\s+serving \S+ ([0-9.]+) s after the rollout started",
                     rollout.stdout, re.MULTILINE)
    return {"command_s": round(t_cmd - t0, 3), "first_new_version_s": round(back - t0, 3),
            "rollout_to_serving_s": float(said.group(1)) if said else None,
            **window(camera.answers, t0, back, end),
            "old_version_answers_after_first_new": sum(
                1 for t, a in camera.answers if back < t <= end and not new(a)),
            "rollout": command,
            "rollout_output": (rollout.stdout + rollout.stderr).strip().splitlines()[-8:]}


def bench(args, mesh, phases):
    warmup, settle, tail = phases
    # Enough photos for every phase at its longest; the camera is stopped (SIGINT: it stops
    # sending, waits for the answers due, prints its summary) once the last phase is done.
    count = math.ceil(args.rate * (warmup + RESTART_S + settle + 2 * (ROLLOUT_S + tail) + 10))
    max_gap = max(2.0, 4 / args.rate)  # a few missed photos, not jitter, break "steady"
    started = time.monotonic()
    mesh.compose("up", "-d", "--no-color", "--quiet-pull", "broker", "d1")
    log(f"project {mesh.project} up (broker on 127.0.0.1:{mesh.port}); "
        f"camera: {count} photos at {args.rate}/s to d1")
    camera = Camera(args.isomesh, args.images, mesh.broker_url(), args.rate, count)
    try:
        first = camera.wait("answer from d1", lambda: camera.first(0), READY_S)
        log(f"d1 answering {first - started:.1f} s after `up`")
        steady = camera.wait("steady answers", lambda: camera.steady_for(warmup, first, max_gap),
                             warmup + 60)
        base = [(t, a) for t, a in camera.answers if first <= t <= steady]

        log("restart: docker-compose restart d1")
        t0 = time.monotonic()
        mesh.compose("restart", "d1")
        t_cmd = time.monotonic()
        # Answers after the command returned come from the new process.
        back = camera.wait("answer after the restart", lambda: camera.first(t_cmd), RESTART_S)
        end = camera.wait("steady answers after the restart",
                          lambda: camera.steady_for(settle, back, max_gap), settle + 60)
        events = {"restart_command": t0, "restart_command_end": t_cmd}
        restart = {"command_s": round(t_cmd - t0, 3), "next_answer_s": round(back - t0, 3),
                   **window(camera.answers, t0, back, end)}
        log(f"restart: d1 answering again after {back - t0:.1f} s")

        swap = rollout_phase(mesh, camera, events, "swap", ROLLOUT, "0.2.0", tail, max_gap)
        model = rollout_phase(mesh, camera, events, "model", model_rollout(mesh.cwd),
                              MODEL_VERSION, tail, max_gap)
        log("stopping the camera")

        camera.proc.send_signal(signal.SIGINT)
        try:
            code = camera.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            fail("the camera did not stop within 120 s of SIGINT")
        camera.out.join(timeout=10)
    finally:
        if camera.proc.poll() is None:
            camera.proc.kill()
    # The node's own account of each module load (each start, the swap) and of the drain: how
    # long loading took, and whether the machine code came from a cache.
    marks = ("module loaded", "swapped in", "shutting down", "model rollout", "nothing to compile",
             "module written", "model plan built", "self-test passed")
    node_log = [line.split("|", 1)[-1].strip() for line in
                mesh.compose("logs", "--no-color", "d1", check=False).stdout.splitlines()
                if any(mark in line for mark in marks)]
    if camera.summary is None:
        fail(f"the camera printed no summary (exit {code}):\n" + "".join(camera.stderr[-20:]))
    # Which update each lost job belongs to, by when it was sent (estimated from its neighbours').
    restart["lost"], swap["lost"], model["lost"] = [], [], []
    for job_id in camera.summary.get("missing_ids", []):
        sent_at = sent_time(camera.answers, job_id, args.rate)
        if sent_at is None or sent_at < events["swap_command"]:
            phase = restart
        elif sent_at < events["model_command"]:
            phase = swap
        else:
            phase = model
        phase["lost"].append(job_id)
    gaps = [b - a for (a, _), (b, _) in zip(base, base[1:])]
    return {
        "steady": {
            "answers": len(base),
            "longest_gap_s": round(max(gaps, default=0), 3),
            "median_round_trip_ms": round(statistics.median(a.get("round_trip_ms", 0) for _, a in base)),
        },
        "restart": restart,
        "swap": swap,
        "model_swap": model,
        "camera": {"exit": code, "summary": camera.summary},
        "d1_log": node_log,
        # Every answer, to plot or to look into a gap: seconds since d1's first answer, module
        # version (or "error"), round trip in ms; the commands' times on the same clock.
        "timeline": {
            "events_s": {k: round(t - first, 3) for k, t in events.items()},
            "answers": [[round(t - first, 3), a.get("module", {}).get("version", "error"),
                         round(a.get("round_trip_ms", 0))] for t, a in camera.answers],
        },
        "total_s": round(time.monotonic() - started, 1),
    }


def sequence(job_id):
    """The camera's job number: its ids end in `-N`."""
    try:
        return int(job_id.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return None


def sent_time(answers, job_id, rate):
    """When the camera sent `job_id`: the nearest answered job's send time (arrival minus round
    trip), moved by the photos between them at `rate`."""
    n = sequence(job_id)
    known = [(sequence(a.get("job_id", "")), t - a.get("round_trip_ms", 0) / 1000)
             for t, a in answers]
    known = [(m, at) for m, at in known if m is not None]
    if n is None or not known:
        return None
    m, at = min(known, key=lambda k: abs(k[0] - n))
    return at + (n - m) / rate


def table(result):
    r, s, m = result["restart"], result["swap"], result["model_swap"]
    rows = [
        ("command (s)", r["command_s"], s["command_s"], m["command_s"]),
        ("to serving again (s)", r["next_answer_s"], s["first_new_version_s"],
         m["first_new_version_s"]),
        ("isomesh rollout to d1 serving (s)", "-",
         *("-" if p["rollout_to_serving_s"] is None else p["rollout_to_serving_s"] for p in (s, m))),
        ("longest gap (s)", r["longest_gap_s"], s["longest_gap_s"], m["longest_gap_s"]),
        ("answers during", r["answers_during"], s["answers_during"], m["answers_during"]),
        ("error answers", r["error_answers"], s["error_answers"], m["error_answers"]),
        ("jobs lost", len(r.get("lost", [])), len(s.get("lost", [])), len(m.get("lost", []))),
        ("max round trip (ms)", r["max_round_trip_ms"], s["max_round_trip_ms"],
         m["max_round_trip_ms"]),
    ]
    lines = [f"{'':22}{'restart d1':>14}{'hot swap 0.2.0':>16}{'model 0.3.0':>14}"]
    lines += [f"{name:22}{a:>14}{b:>16}{c:>14}" for name, a, b, c in rows]
    st, c = result["steady"], result["camera"]["summary"]
    lines.append(f"steady load: longest gap {st['longest_gap_s']} s, "
                 f"median round trip {st['median_round_trip_ms']} ms")
    lines.append("camera: " + ", ".join(f"{k} {c.get(k)}" for k in
                                        ["sent", "answered", "missing", "errors", "duplicates"]))
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=Path, default=REPO / "photos",
                   help="folder of photos the camera sends (default photos/)")
    p.add_argument("--rate", type=float, default=2.0, help="photos per second (default 2)")
    p.add_argument("--isomesh", type=Path,
                   default=REPO / "target/x86_64-unknown-linux-musl/release/isomesh",
                   help="the host's isomesh binary (default: the one `make build` made)")
    p.add_argument("--out", type=Path, default=REPO / "bench-out/container.json")
    p.add_argument("--quick", action="store_true", help="shorter steady phases (CI)")
    p.add_argument("--project-dir", type=Path, default=REPO,
                   help="the checkout whose `make images` built the images: compose.yaml's "
                        "./target/compose/keys (the rollout key) is read there (default: this one)")
    args = p.parse_args()
    args.images, args.project_dir = args.images.resolve(), args.project_dir.resolve()
    if not os.access(args.isomesh, os.X_OK):
        fail(f"{args.isomesh} is missing: build it (`make build`) or pass --isomesh")
    if not args.images.is_dir():
        fail(f"no photo folder {args.images} (--images)")
    if not args.rate > 0:
        fail("--rate must be positive")
    preflight(args.project_dir)
    # (warmup before the restart, steady time between the updates, after the swap), s
    phases = (5, 8, 5) if args.quick else (10, 15, 15)
    info = machine()
    mesh = Mesh(args.project_dir, args.images)
    try:
        result = bench(args, mesh, phases)
    finally:
        log(f"docker-compose -p {mesh.project} down -v")
        mesh.compose("down", "-v", "--remove-orphans", "-t", "5", check=False)
    photos = sorted(f.name for f in args.images.iterdir()
                    if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
    report = {
        "machine": {**info, "loadavg_at_end": list(os.getloadavg())},
        "setup": {"rate": args.rate, "count": result["camera"]["summary"].get("sent"),
                  "images": str(args.images), "photos": photos, "node": "d1 (0.25 CPU)",
                  "steady_phases_s": dict(zip(["before_restart", "between", "after_swap"], phases)),
                  "rollout": ROLLOUT},
        **result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(result))
    print(f"wrote {args.out} ({result['total_s']} s)")
    summary = result["camera"]["summary"]
    failed = summary.get("errors", 1)
    lost = {k: result[k]["lost"] for k in ("restart", "swap", "model_swap")}
    if any(lost.values()) or failed:
        fail("; ".join(f"{k}: {len(v)} job(s) lost ({v})" for k, v in lost.items())
             + f"; {failed} failed")


if __name__ == "__main__":
    main()
