"""
Resident memory through three bf16 training steps of ``benchmarks/run.py``'s set-up (batch 8, 224x224), sampled
every 3 ms from ``/proc/self/statm`` by a thread, with glibc's ``mallinfo2`` (heap in use / free, mapped blocks)
after each forward and optimizer step and at the highest sample: where the peak is and how much of it is allocator
slack. Used to choose the allocator setting and the checkpointing granularity (``benchmarks/README.md``). The
environment selects the variant: ``PROBE_MALLOPT=-3=2097152`` (``mallopt`` calls, made BEFORE the imports, like
``MALLOC_MMAP_THRESHOLD_``), ``PROBE_CKPT=1`` (timm's stage-level checkpointing through the features wrapper, as
before issue 18), ``PROBE_BLOCK=1`` (with ``PROBE_CKPT=1``: block-level, what ``TimmImageEncoder`` now does),
``PROBE_STAGES=0,1`` (per-block checkpointing of these ConvNeXt stages only), ``PROBE_STEPS``. Example::

    PROBE_MALLOPT=-3=2097152 PROBE_CKPT=1 PROBE_BLOCK=1 OMP_NUM_THREADS=1 python benchmarks/memory_timeline.py
"""
import os, sys, threading, time, ctypes, json, resource
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
class MI(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]
_libc = ctypes.CDLL("libc.so.6"); _libc.mallinfo2.restype = MI
def mi():
    m = _libc.mallinfo2(); M = 2**20
    return (
        f"arena {m.arena/M:.0f} inuse {m.uordblks/M:.0f} free {m.fordblks/M:.0f} mmapped {m.hblkhd/M:.0f} ({m.hblks})"
    )
def cur():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * 4096 / 2**20
mall = os.environ.get("PROBE_MALLOPT")
if mall:
    libc = ctypes.CDLL("libc.so.6")
    for kv in mall.split(","):
        k, v = kv.split("=")
        print("mallopt", k, v, libc.mallopt(int(k), int(v)))
import monai, timm, torch, transformers, himix_monai.networks
import run as R
torch.set_num_threads(1)
print("after imports", round(cur()), flush=True)
if os.environ.get("PROBE_TRIM"):
    libc = ctypes.CDLL("libc.so.6"); libc.malloc_trim(0); print("after trim", round(cur()))
ckpt = bool(int(os.environ.get("PROBE_CKPT", "0")))
settings = R.make_settings(False, True)
net, loss_fn, opt, inferer, batch = R._train_setup(settings, "bf16", allocator=False, gradient_checkpointing=ckpt)
if ckpt and not os.environ.get("PROBE_BLOCK"):  # stage-level, as timm's features wrapper does it
    net.image_encoder.set_gradient_checkpointing(False)
    net.image_encoder.backbone.set_grad_checkpointing(True)
if os.environ.get("PROBE_STAGES") is not None:  # per-block checkpointing of these stages only, e.g. "0,1"
    chosen = {int(i) for i in os.environ["PROBE_STAGES"].split(",") if i}
    for index in range(4):
        getattr(net.image_encoder.backbone, f"stages_{index}").grad_checkpointing = index in chosen
print("after setup", round(cur()), flush=True)
samples = []; phase = ["setup"]; stop = False
best = [0, ""]
def sampler():
    while not stop:
        v = cur()
        samples.append((phase[0], v))
        if v > best[0]:
            best[0] = v; best[1] = phase[0] + " " + mi()
        time.sleep(0.003)
t = threading.Thread(target=sampler, daemon=True); t.start()
timer = R.Timer()
image, label, ids, mask = batch
steptimes = []
for step in range(int(os.environ.get("PROBE_STEPS", "3"))):
    t0 = time.perf_counter()
    phase[0] = f"s{step}text"
    with R.autocast_context("bf16"):
        texts = net.encode_text(ids, mask)
    phase[0] = f"s{step}fwd"
    with R.precomputed_text(net, texts):
        loss = loss_fn(inferer(image, net, ids, mask), label)
    phase[0] = f"s{step}bwd"; print(step, "after fwd", round(cur()), mi(), flush=True)
    loss.backward()
    phase[0] = f"s{step}opt"
    opt.step(); opt.zero_grad(set_to_none=True)
    steptimes.append(time.perf_counter() - t0)
    phase[0] = f"s{step}end"; print(step, "after opt", round(cur()), mi(), flush=True)
    del loss, texts
    time.sleep(0.02)
stop = True; t.join()
agg = {}
for p, v in samples:
    a = agg.setdefault(p, [v, v, v]); a[1] = max(a[1], v); a[2] = v
for p, (first, mx, last) in agg.items():
    print(f"{p:10s} first {first:7.0f} max {mx:7.0f} last {last:7.0f}")
print("at max", best)
print("step times", [round(x, 2) for x in steptimes])
print("PEAK", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
