#!/usr/bin/env python3
"""50 parallel downloads of one 10 MiB attachment through one gateway and one message
service, started like deploy/run-local.sh does but on free ports, a fresh database and a
private Redis channel prefix. Prints VmRSS/VmHWM of both processes before and after, and
the peak VmRSS sampled during the downloads.

usage: deploy/measure-downloads.py BIN_DIR [N=50]   (BIN_DIR: target/release, after
`cargo build --release --bins -p chat-gateway -p chat-message`; needs the local
Postgres (user postgres) and Redis of deploy/run-local.sh)
"""
import base64, hashlib, hmac, http.client, json, os, random, socket, subprocess, sys, threading, time

BIN = sys.argv[1]
N = int(sys.argv[2]) if len(sys.argv) > 2 else 50
SIZE = 10 * 1024 * 1024
SECRET = "measure-secret-0123456789abcdef0123456789"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def token(sub):
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": sub, "exp": int(time.time()) + 3600}).encode())
    sig = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) // 1024  # MiB
    return out


def request(port, method, path, user, body=None, ctype="application/json"):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Authorization": f"Bearer {token(user)}"}
    if body is not None:
        headers["Content-Type"] = ctype
    c.request(method, path, body=body, headers=headers)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, data


suffix = f"{os.getpid()}_{random.randint(0, 1 << 30)}"
db = f"chat_measure_{suffix}"
grpc, gw, mm = free_port(), free_port(), free_port()
env = dict(os.environ,
           DATABASE_URL=f"postgres://postgres@127.0.0.1:5432/{db}?sslmode=disable",
           REDIS_URL="redis://127.0.0.1:6379", REDIS_CHANNEL_PREFIX=f"measure{suffix}",
           JWT_SECRET=SECRET, RUST_LOG="warn", ENVIRONMENT="development")
procs = []
try:
    msg = subprocess.Popen([f"{BIN}/chat-message"], env=dict(env, MESSAGE_ADDR=f"127.0.0.1:{grpc}", METRICS_ADDR=f"127.0.0.1:{mm}"))
    procs.append(msg)
    gwp = subprocess.Popen([f"{BIN}/chat-gateway"], env=dict(env, GATEWAY_ADDR=f"127.0.0.1:{gw}", MESSAGE_SERVICE_URL=f"http://127.0.0.1:{grpc}"))
    procs.append(gwp)
    for _ in range(300):
        try:
            c = http.client.HTTPConnection("127.0.0.1", gw, timeout=2)
            c.request("GET", "/readyz")
            if c.getresponse().status == 200:
                break
        except OSError:
            pass
        time.sleep(0.2)
    data = random.Random(7).randbytes(SIZE)
    want = hashlib.sha256(data).hexdigest()
    users = [f"u{i}" for i in range(N)]
    st, body = request(gw, "POST", "/v1/rooms", "owner", json.dumps({"kind": "group", "name": "m", "members": users}).encode())
    assert st == 201, (st, body)
    room = json.loads(body)["room"]["id"]
    st, body = request(gw, "POST", "/v1/attachments?name=big.bin", "owner", data, "application/octet-stream")
    assert st == 201, (st, body)
    att = json.loads(body)["attachment"]["id"]
    st, body = request(gw, "POST", f"/v1/rooms/{room}/messages", "owner", json.dumps({"text": "", "attachments": [att]}).encode())
    assert st == 201, (st, body)
    time.sleep(1)
    before = {"gateway": status(gwp.pid), "message": status(msg.pid)}
    peak = {"gateway": 0, "message": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            for name, p in (("gateway", gwp), ("message", msg)):
                peak[name] = max(peak[name], status(p.pid)["VmRSS"])
            time.sleep(0.05)

    results = []

    def fetch(user):
        st, body = request(gw, "GET", f"/v1/attachments/{att}", user)
        results.append((st, hashlib.sha256(body).hexdigest() == want if st == 200 else False))

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.time()
    threads = [threading.Thread(target=fetch, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - started
    done.set()
    sampler.join()
    time.sleep(2)
    after = {"gateway": status(gwp.pid), "message": status(msg.pid)}
    ok = sum(1 for s, same in results if s == 200 and same)
    codes = sorted({s for s, _ in results})
    print(f"{N} parallel downloads of {SIZE} bytes: {ok} identical (sha256), statuses {codes}, {elapsed:.1f} s")
    for name in ("gateway", "message"):
        print(f"  {name:8} before: VmRSS {before[name]['VmRSS']} MiB (VmHWM {before[name]['VmHWM']}); "
              f"peak during: VmRSS {peak[name]} MiB; after: VmRSS {after[name]['VmRSS']} MiB, VmHWM {after[name]['VmHWM']} MiB")
finally:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
    subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-c", f"DROP DATABASE IF EXISTS {db}"], capture_output=True)
