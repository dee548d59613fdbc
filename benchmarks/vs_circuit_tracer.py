"""Our attribution engine against circuit-tracer 0.5.0 on SmolLM2-135M-Instruct: edges, time, memory.

Each engine runs in its own subprocess (ours in the main venv, theirs in `.venv-ct` through
`interop/ct_attribute.py`), one after the other, on the same token ids, transcoders, batch size and position-0
convention, so wall time and peak RSS compare. Each child runs one model forward before measuring (our loader
maps weights lazily: the first forward pages them in, which is loading, not attribution). Prints, per prompt, the
largest |edge difference| after mapping node orders (features by (layer, position, feature); errors, tokens,
logits by layout), also relative to the largest |edge| and split by (target kind <- source kind); then wall time
and peak RSS of `attribute()` on a ~64-token
prompt; with `--sweep`, the longest prompt each engine completes under an RSS cap (the parent polls the child's
RSS and kills it above the cap; model load included). The sweep caps `max_feature_nodes` and uses a small batch so
that it takes minutes on 2 cores: its memory is then that of the batched frozen forward (∝ batch × n_pos² for the
attention patterns), which is what limits prompt length on both engines.

    .venv/bin/python -m benchmarks.vs_circuit_tracer                     # random CLT, 128 features/layer
    .venv/bin/python -m benchmarks.vs_circuit_tracer --kind plt --sweep  # random PLT, plus the memory sweep
    .venv/bin/python -m benchmarks.vs_circuit_tracer --transcoders DIR   # trained transcoders

Without `--transcoders`, random transcoders (ReLU, no skip, unit-norm decoder rows) are saved to a temporary
directory; each feature's encoder bias is `-(mean + z·std)` of its pre-activations on calibration text,
`z = Φ⁻¹(1 - rate)`, so about `rate` of (token, feature) pairs fire (the feature counts are printed). Cost grows
with active features × tokens: at `--rate 0.01` a 64-token prompt has ~2500 active features and each engine needs
~30 s per `attribute()` on 2 idle cores, hence the default 0.0025 (~740 features, ~8 s). `--profile` runs ours once
more under cProfile and prints its hot spots (share of `attribute()` time) and the Python stack at its peak RSS.
Timings are wall-clock minima over `--repeats` runs per process and `--rounds` processes per engine (alternating);
the machine's load averages are printed, since other processes on a 2-core machine distort wall times severalfold.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from benchmarks.interop.rss import release_freed_memory, reset_peak_rss, rss_bytes, run_metadata

REPO = Path(__file__).resolve().parents[1]
CT_PYTHON = Path(os.environ.get("CT_VENV", REPO / ".venv-ct")) / "bin" / "python"
CT_ATTRIBUTE = REPO / "benchmarks" / "interop" / "ct_attribute.py"
MODEL = "smollm2-135m-instruct"
N_LAYERS = 30

PROMPTS = {
    "ioi": "When Mary and John went to the store, John gave a drink to",
    "eiffel": "The Eiffel Tower is located in the city of",
    "1+1": "1+1=",
}
# Prose for calibration and for long prompts (cut to any length in tokens, repeated if needed).
LONG_TEXT = (
    "The history of the city begins with a small settlement on the banks of the river, where fishermen and "
    "traders met to exchange goods. Over the centuries the village grew into a market town, and later into a "
    "busy port that connected the inland farms with distant harbours. Merchants built warehouses along the "
    "quays, churches rose in the squares, and a university was founded by a wealthy family who wanted their "
    "children to study law and medicine without travelling abroad. During the industrial age, factories "
    "spread along the railway lines, and thousands of workers arrived from the countryside in search of wages. "
    "The old walls were torn down to make room for wide avenues, parks and tram lines, while engineers dug "
    "tunnels for water and sewage. Today the city is known for its museums, its music festivals and its "
    "covered markets, where visitors can taste cheese, bread and fruit from the surrounding valleys. "
)


# ---------------------------------------------------------------------------------------------------------
# child side: run our engine, write the same file layout as interop/ct_attribute.py


class _PeakStackSampler(threading.Thread):
    """Polls RSS every few ms; keeps the main thread's Python stack whenever RSS reaches a new maximum."""

    def __init__(self, interval: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = 0
        self.stack: list[str] = []
        self._main = threading.main_thread().ident
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            rss = rss_bytes("VmRSS")
            if rss > self.peak:
                self.peak = rss
                switch = sys.getswitchinterval()
                sys.setswitchinterval(1.0)  # keep the GIL while walking the frames: a consistent snapshot
                try:
                    frame, frames = sys._current_frames().get(self._main or 0), []
                    while frame is not None and len(frames) < 6:
                        frames.append((frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name))
                        frame = frame.f_back
                finally:
                    sys.setswitchinterval(switch)
                self.stack = [f"{_short(file)}:{line}:{name}" for file, line, name in reversed(frames)]
            time.sleep(self.interval)

    def halt(self) -> None:
        self._halt.set()
        self.join()


def run_ours(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from atlas.attribution.engine import AttributionConfig, attribute
    from atlas.models import load_model
    from atlas.transcoders import load_transcoder

    t_setup = time.perf_counter()
    model = load_model(MODEL)
    transcoder = load_transcoder(args.transcoders)
    config = AttributionConfig(
        zero_positions=(0,) if args.zero_bos else (),
        batch_size=args.batch_size,
        max_feature_nodes=args.max_feature_nodes,
        prefix_buckets=args.prefix_buckets,
    )
    with torch.no_grad():  # warm-up: our loader maps the weights lazily; page them in before RSS is measured
        model.model(torch.tensor([json.loads(Path(args.tokens[0]).read_text())]))
    setup_seconds = time.perf_counter() - t_setup
    for tokens_path, out_path in zip(args.tokens, args.out, strict=True):
        ids = json.loads(Path(tokens_path).read_text())
        tokens = torch.tensor(ids, dtype=torch.long)
        times, cpu_times = [], []
        sampler = profiler = None
        warm = (-1, -1)
        for repeat in range(args.repeats):
            graph = None
            release_freed_memory()
            before = rss_bytes("VmRSS")
            peak_reset = reset_peak_rss()
            if args.profile and repeat == args.repeats - 1:  # the last run: warm, as the timed ones
                sampler, profiler = _PeakStackSampler(), cProfile.Profile()
                sampler.start()
                profiler.enable()
            start, cpu_start = time.perf_counter(), time.process_time()
            graph = attribute(model, transcoder, tokens, config=config)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
            peak = rss_bytes("VmHWM") if peak_reset else -1
            if repeat == 0:
                rss_before, attribute_peak = before, peak
            elif repeat == args.repeats - 1:
                warm = (before, peak)
            if sampler and profiler:
                profiler.disable()
                sampler.halt()
        assert graph is not None
        index = graph.index
        features = [[f.layer, f.position, f.feature] for f in index.features]
        out = {
            "features": torch.tensor(features, dtype=torch.int64).view(-1, 3),
            "logit_tokens": torch.tensor([node.token_id for node in index.logits], dtype=torch.int64),
            "logit_probabilities": graph.target_probabilities.float().contiguous(),
            "input_tokens": torch.tensor(graph.tokens, dtype=torch.int64),
        }
        if not args.no_adjacency:
            out["adjacency"] = graph.edges.to_dense().float().contiguous()
        meta = {
            "n_pos": str(len(ids)),
            "n_active": str(graph.folded_features.get("n_active", index.n_features)),
            "n_selected": str(index.n_features),
            "n_nodes": str(index.n_nodes),
            "n_edges": str(int(graph.edges.weight.numel())),
            **run_metadata(times, cpu_times, setup_seconds, rss_before, attribute_peak, torch.get_num_threads(), warm),
            "phase_seconds": json.dumps({k: round(v, 3) for k, v in graph.settings.get("timings", {}).items()}),
        }
        if sampler and profiler:
            profiler.dump_stats(str(Path(out_path).with_suffix(".prof")))
            meta["peak_stack"] = json.dumps(sampler.stack)
            meta["sampled_peak_rss_bytes"] = str(sampler.peak)
        del graph
        save_file(out, out_path, metadata=meta)
    return 0


# ---------------------------------------------------------------------------------------------------------
# parent side: run both engines


@dataclass
class Run:
    ok: bool
    tensors: dict[str, torch.Tensor]
    meta: dict[str, str]
    peak_rss: int = 0  # max VmRSS of the child process as polled by the parent (bytes)
    note: str = ""

    def get(self, key: str) -> float:
        return float(self.meta.get(key, "nan"))


def _read(path: Path) -> Run:
    with safe_open(str(path), "pt") as st:
        meta = dict(st.metadata() or {})
    return Run(True, load_file(str(path)), meta)


def _run_child(cmd: list[str], outs: list[Path], cap_bytes: int | None, timeout: float) -> list[Run]:
    """Run `cmd`, killing it when its RSS exceeds `cap_bytes` or it runs past `timeout`; read `outs` back."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        peak, note = 0, ""
        while proc.poll() is None:
            rss = rss_bytes("VmRSS", proc.pid)
            peak = max(peak, rss)
            if not note and cap_bytes is not None and rss > cap_bytes:
                proc.send_signal(signal.SIGKILL)
                note = f"killed at RSS {rss / 2**30:.2f} GiB > cap"
            elif not note and time.perf_counter() - start > timeout:
                proc.send_signal(signal.SIGKILL)
                note = f"killed after {timeout:.0f}s"
            time.sleep(0.02)
        if proc.returncode != 0:
            log.seek(0)
            tail = log.read().decode(errors="replace").strip().splitlines()[-1:]
            return [Run(False, {}, {}, peak, note or f"exit {proc.returncode}: {' '.join(tail)[:200]}") for _ in outs]
    runs = [_read(out) for out in outs]
    for run in runs:
        run.peak_rss = peak
    return runs


def run_side(
    side: str,
    transcoders: Path,
    prompts: dict[str, list[int]],
    work: Path,
    args: argparse.Namespace,
    *,
    batch_size: int,
    repeats: int = 1,
    adjacency: bool = True,
    max_feature_nodes: int | None = None,
    cap_bytes: int | None = None,
    profile: bool = False,
) -> dict[str, Run]:
    """One child process of `side` ("ours" | "theirs") attributing every prompt in turn."""
    tokens, outs = [], []
    for name, ids in prompts.items():
        tokens.append(work / f"{name}.tokens.json")
        tokens[-1].write_text(json.dumps(ids))
        outs.append(work / f"{name}.{side}{'.prof' if profile else ''}.safetensors")
    flags = ["--transcoders", str(transcoders), "--tokens", *map(str, tokens), "--out", *map(str, outs)]
    flags += ["--batch-size", str(batch_size), "--zero-bos", str(args.zero_bos), "--threads", str(args.threads)]
    flags += ["--repeats", str(repeats)]
    if max_feature_nodes is not None:
        flags += ["--max-feature-nodes", str(max_feature_nodes)]
    if not adjacency:
        flags.append("--no-adjacency")
    if side == "ours":
        cmd = [sys.executable, "-m", "benchmarks.vs_circuit_tracer", "_ours", *flags]
        if profile:
            cmd.append("--profile")
    else:
        cmd = [str(CT_PYTHON), str(CT_ATTRIBUTE), *flags]
    return dict(zip(prompts, _run_child(cmd, outs, cap_bytes, args.child_timeout), strict=True))


@dataclass
class EdgeComparison:
    max_abs: float
    max_edge: float
    by_block: dict[str, float]
    n_features: tuple[int, int, int]  # ours, theirs, common
    logits_ours: list[int]
    logits_theirs: list[int]
    n_nodes: int


def _layout(n_feat: int, n_pos: int, n_logits: int) -> dict[str, range]:
    errors = n_feat + N_LAYERS * n_pos
    return {
        "feature": range(0, n_feat),
        "error": range(n_feat, errors),
        "token": range(errors, errors + n_pos),
        "logit": range(errors + n_pos, errors + n_pos + n_logits),
    }


def compare_edges(ours: Run, theirs: Run) -> EdgeComparison:
    """Map both node orders onto the nodes they share and compare adjacency entries block by block."""
    a_ours, a_theirs = ours.tensors["adjacency"], theirs.tensors["adjacency"]
    f_ours = [tuple(r) for r in ours.tensors["features"].tolist()]
    f_theirs = [tuple(r) for r in theirs.tensors["features"].tolist()]
    l_ours, l_theirs = ours.tensors["logit_tokens"].tolist(), theirs.tensors["logit_tokens"].tolist()
    n_pos = int(ours.meta["n_pos"])
    lay_o, lay_t = _layout(len(f_ours), n_pos, len(l_ours)), _layout(len(f_theirs), n_pos, len(l_theirs))
    at_o, at_t = {f: i for i, f in enumerate(f_ours)}, {f: i for i, f in enumerate(f_theirs)}
    common = [f for f in f_ours if f in at_t]
    logit_o, logit_t = {t: i for i, t in enumerate(l_ours)}, {t: i for i, t in enumerate(l_theirs)}
    common_logits = [t for t in l_ours if t in logit_t]
    idx = {
        "feature": ([at_o[f] for f in common], [at_t[f] for f in common]),
        "error": (list(lay_o["error"]), list(lay_t["error"])),
        "token": (list(lay_o["token"]), list(lay_t["token"])),
        "logit": (
            [lay_o["logit"][logit_o[t]] for t in common_logits],
            [lay_t["logit"][logit_t[t]] for t in common_logits],
        ),
    }
    by_block: dict[str, float] = {}
    covered = torch.zeros_like(a_ours, dtype=torch.bool)
    for target in ("feature", "logit"):
        for source in ("feature", "error", "token"):
            (ro, rt), (co, ct) = idx[target], idx[source]
            if not (ro and co):
                continue
            block_o = a_ours[torch.tensor(ro)][:, torch.tensor(co)]
            block_t = a_theirs[torch.tensor(rt)][:, torch.tensor(ct)]
            by_block[f"{target}<-{source}"] = float((block_o - block_t).abs().max())
            covered[torch.tensor(ro).view(-1, 1), torch.tensor(co)] = True
    # Rows of errors/tokens, columns of logits: nothing there on our side (theirs is zero by construction).
    by_block["rest(ours)"] = float(a_ours[~covered].abs().max()) if bool((~covered).any()) else 0.0
    return EdgeComparison(
        max_abs=max(by_block.values()),
        max_edge=float(max(a_ours.abs().max(), a_theirs.abs().max())),
        by_block=by_block,
        n_features=(len(f_ours), len(f_theirs), len(common)),
        logits_ours=l_ours,
        logits_theirs=l_theirs,
        n_nodes=int(a_ours.shape[0]),
    )


# ---------------------------------------------------------------------------------------------------------
# random transcoders with calibrated sparsity


@torch.no_grad()
def make_random_transcoders(model, kind: str, n_features: int, rate: float, directory: Path, seed: int = 0) -> Path:
    from atlas.config import DEFAULT_FEATURE_INPUT_HOOK
    from atlas.transcoders import ActivationConfig, TranscoderSpec, build_transcoder, save_transcoder

    torch.manual_seed(seed)
    info = model.info
    spec = TranscoderSpec(
        kind=kind,  # type: ignore[arg-type]
        n_layers=info.n_layers,
        d_model=info.d_model,
        n_features=n_features,
        activation=ActivationConfig("relu"),
    )
    tc = build_transcoder(spec)
    tokens = model.tokenize(LONG_TEXT + " ".join(PROMPTS.values()))[0]
    names = [f"blocks.{layer}.{DEFAULT_FEATURE_INPUT_HOOK}" for layer in range(info.n_layers)]
    _, cache = model.model.run_with_cache(tokens.view(1, -1), names_filter=lambda n: n in names)
    z = float(torch.special.ndtri(torch.tensor(1.0 - rate)))
    for layer, name in enumerate(names):
        pre = cache[name][0, 1:].float() @ tc.W_enc[layer].T  # (n_tokens, F); BOS left out (an outlier)
        # Gaussian fit per feature: a quantile of ~200 tokens cannot resolve rates below 1/200.
        tc.b_enc[layer] = -(pre.mean(0) + z * pre.std(0))
    for w in [tc.W_dec] if kind == "plt" else list(tc.W_dec):
        w.div_(w.norm(dim=-1, keepdim=True))  # unit-norm decoder rows (per output layer for a CLT)
    return save_transcoder(tc, directory, model_name=MODEL, metadata={"note": "random, calibrated sparsity"})


# ---------------------------------------------------------------------------------------------------------
# printing


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 0 else "n/a"


def _short(filename: str) -> str:
    for marker in (str(REPO) + "/", "site-packages/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return Path(filename).name


def _load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def print_profile(prof: Path, total: float, top: int = 15) -> None:
    stats = pstats.Stats(str(prof)).stats  # type: ignore[attr-defined]
    rows = [(tt, ct, nc, f"{_short(fn)}:{line}:{func}") for (fn, line, func), (_, nc, tt, ct, _) in stats.items()]
    print(f"  cProfile, ours (attribute() {total:.1f}s under the profiler); top {top} by own time:")
    for tottime, cumtime, ncalls, where in sorted(rows, reverse=True)[:top]:
        print(f"    {100 * tottime / total:5.1f}% own {100 * cumtime / total:5.1f}% cum {ncalls:>6} calls  {where}")
    print("  atlas functions by cumulative time:")
    atlas_rows = sorted((r for r in rows if r[3].startswith("atlas/")), key=lambda r: -r[1])[:10]
    for tottime, cumtime, ncalls, where in atlas_rows:
        print(f"    {100 * cumtime / total:5.1f}% cum {100 * tottime / total:5.1f}% own {ncalls:>6} calls  {where}")


def print_edges(name: str, ours: Run, theirs: Run) -> None:
    if not (ours.ok and theirs.ok):
        print(f"  {name}: failed: ours {ours.note or 'ok'}; theirs {theirs.note or 'ok'}")
        return
    cmp = compare_edges(ours, theirs)
    rel = cmp.max_abs / cmp.max_edge if cmp.max_edge else 0.0
    fo, ft, fc = cmp.n_features
    logits = "same" if cmp.logits_ours == cmp.logits_theirs else f"DIFFER {cmp.logits_ours} vs {cmp.logits_theirs}"
    print(
        f"  {name:9s} {ours.meta['n_pos']:>3} tok  features ours/theirs/common {fo}/{ft}/{fc}  {cmp.n_nodes} nodes"
        f"  {len(cmp.logits_ours)} logits {logits}"
    )
    print(f"            max |Δedge| {cmp.max_abs:.2e} of max |edge| {cmp.max_edge:.3g} (relative {rel:.1e})")
    print("            by block: " + ", ".join(f"{k} {v:.1e}" for k, v in cmp.by_block.items()))
    to, tt = ours.get("attribute_seconds"), theirs.get("attribute_seconds")
    print(f"            attribute() ours {to:.2f}s, theirs {tt:.2f}s")


def _merge_times(first: Run, again: Run) -> None:
    """Fold another round's timings into `first` (memory figures stay those of the first round)."""
    if not (first.ok and again.ok):
        return
    for key in ("attribute_seconds_all", "attribute_cpu_seconds_all"):
        first.meta[key] = json.dumps(json.loads(first.meta.get(key, "[]")) + json.loads(again.meta.get(key, "[]")))
    for key in ("attribute_seconds", "attribute_cpu_seconds"):
        first.meta[key] = str(min(first.get(key), again.get(key)))


def print_time_memory(ours: Run, theirs: Run, batch_size: int) -> None:
    print(
        f"\n== time and memory at {ours.meta['n_pos']} tokens ({ours.meta['n_active']} features, batch {batch_size}) =="
    )
    to, tt = ours.get("attribute_seconds"), theirs.get("attribute_seconds")
    print(f"  attribute() wall time (min over runs): ours {to:.2f}s, theirs {tt:.2f}s, ours/theirs {to / tt:.2f}")
    co, ct = ours.get("attribute_cpu_seconds"), theirs.get("attribute_cpu_seconds")
    print(f"  attribute() CPU time (min of runs): ours {co:.2f}s, theirs {ct:.2f}s, ours/theirs {co / ct:.2f}")
    print(f"    all runs (s): ours {ours.meta['attribute_seconds_all']}, theirs {theirs.meta['attribute_seconds_all']}")
    print(f"    ours by phase (last run): {ours.meta.get('phase_seconds')}")
    po, pt = ours.get("peak_rss_bytes"), theirs.get("peak_rss_bytes")
    print(f"  peak RSS of the process (model load included): ours {_gib(po)}, theirs {_gib(pt)}, ratio {po / pt:.2f}")
    ao, at = ours.get("attribute_peak_rss_bytes"), theirs.get("attribute_peak_rss_bytes")
    bo, bt = ours.get("rss_before_bytes"), theirs.get("rss_before_bytes")
    print(f"  RSS before attribute(): ours {_gib(bo)}, theirs {_gib(bt)}")
    print(
        f"  peak RSS during the first attribute(): ours {_gib(ao)}, theirs {_gib(at)}, ratio {ao / at:.2f};"
        f" growth ours {_gib(ao - bo)}, theirs {_gib(at - bt)}, ratio {(ao - bo) / max(at - bt, 1):.2f}"
    )
    wbo, wbt = ours.get("warm_rss_before_bytes"), theirs.get("warm_rss_before_bytes")
    wpo, wpt = ours.get("warm_attribute_peak_rss_bytes"), theirs.get("warm_attribute_peak_rss_bytes")
    if min(wbo, wbt, wpo, wpt) > 0:
        print(
            f"  last (warm) attribute(): RSS before ours {_gib(wbo)}, theirs {_gib(wbt)}; peak ours {_gib(wpo)},"
            f" theirs {_gib(wpt)}, ratio {wpo / wpt:.2f}; working memory (peak - before) ours {_gib(wpo - wbo)},"
            f" theirs {_gib(wpt - wbt)}, ratio {(wpo - wbo) / max(wpt - wbt, 1):.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_ours"]:
        return run_ours(_child_parser().parse_args(argv[1:]))
    args = _parser().parse_args(argv)
    if not CT_PYTHON.exists():
        print(f"circuit-tracer venv missing at {CT_PYTHON}: run benchmarks/interop/setup_ct_env.sh", file=sys.stderr)
        return 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from atlas.models import load_model

    t0 = time.perf_counter()
    model = load_model(MODEL)
    with tempfile.TemporaryDirectory(prefix="vs-ct-") as tmp:
        work = Path(tmp)
        if args.transcoders:
            tdir, label = args.transcoders.resolve(), str(args.transcoders)
        else:
            tdir = make_random_transcoders(model, args.kind, args.features, args.rate, work / "transcoders")
            label = f"random {args.kind.upper()}, {args.features} features/layer, rate {args.rate:g}"
        zero = "(0,) / slice(0, 1)" if args.zero_bos else "() / slice(0, 0)"
        print(f"transcoders: {label}; batch size {args.batch_size}; zero positions {zero}")
        print(
            f"torch threads per child: {args.threads or torch.get_num_threads()}; children run one at a time; {_load()}"
        )

        # 1 + 2. one child per engine: the long prompt first (so its process peak is its own), then the short ones
        long_name = f"prose{args.long_tokens}"
        long_ids = model.tokenize(LONG_TEXT * (1 + args.long_tokens // 150))[0].tolist()[: args.long_tokens]
        prompts = {long_name: long_ids, **{name: model.tokenize(text)[0].tolist() for name, text in PROMPTS.items()}}
        if not args.sweep_only:
            runs = {
                side: run_side(side, tdir, prompts, work, args, batch_size=args.batch_size, repeats=args.repeats)
                for side in ("ours", "theirs")
            }
            print("\n== edges: ours vs circuit-tracer on the same token ids ==")
            for name in prompts:
                print_edges(name, runs["ours"][name], runs["theirs"][name])
            ours, theirs = runs["ours"][long_name], runs["theirs"][long_name]
            for _ in range(1, args.rounds):  # more timing runs, alternating engines, so both see similar load
                for side, first in (("ours", ours), ("theirs", theirs)):
                    again = run_side(
                        side, tdir, {long_name: long_ids}, work, args, batch_size=args.batch_size, repeats=args.repeats
                    )[long_name]
                    _merge_times(first, again)
            if ours.ok and theirs.ok:
                print_time_memory(ours, theirs, args.batch_size)
            print(f"  ({_load()})")

        if args.profile:
            prof_run = run_side(
                "ours", tdir, {long_name: long_ids}, work, args, batch_size=args.batch_size, repeats=2, profile=True
            )[long_name]
            prof = work / f"{long_name}.ours.prof.prof"
            if prof_run.ok and prof.exists():
                print_profile(prof, json.loads(prof_run.meta["attribute_seconds_all"])[-1])
                print(
                    f"  where ours stood when its RSS peaked ({_gib(prof_run.get('sampled_peak_rss_bytes'))}; the live"
                    " memory then is mostly the batched forward's autograd graph, not this line's allocation):"
                )
                for frame in json.loads(prof_run.meta.get("peak_stack", "[]")):
                    print(f"    {frame}")

        # 3. longest prompt under a memory cap
        if args.sweep or args.sweep_only:
            sweep(model, tdir, work, args)
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")
    return 0


def sweep(model, tdir: Path, work: Path, args: argparse.Namespace) -> None:
    cap = int(args.mem_cap_gib * 2**30)
    lengths = [int(x) for x in args.sweep_lengths.split(",")]
    cap_features = args.sweep_max_features or None
    print(
        f"\n== memory sweep: RSS cap {args.mem_cap_gib:g} GiB per process (model load included; the parent kills a"
        f" child above it), batch {args.sweep_batch_size}, max_feature_nodes {cap_features or 'all'} =="
    )
    ids_all = model.tokenize(LONG_TEXT * (1 + max(lengths) // 150))[0].tolist()
    longest = {"ours": 0, "theirs": 0}
    alive = {"ours", "theirs"}
    for n in lengths:
        parts = []
        for side in ("ours", "theirs"):
            if side not in alive:
                continue  # failed at a shorter length
            run = run_side(
                side,
                tdir,
                {f"sweep{n}": ids_all[:n]},
                work,
                args,
                batch_size=args.sweep_batch_size,
                adjacency=False,
                max_feature_nodes=cap_features,
                cap_bytes=cap,
            )[f"sweep{n}"]
            if run.ok:
                longest[side] = n
                parts.append(
                    f"{side} ok {run.get('attribute_seconds'):.1f}s, peak {_gib(run.peak_rss)}"
                    f" ({run.meta['n_active']} active features)"
                )
            else:
                alive.discard(side)
                parts.append(f"{side} FAILED ({run.note}; peak seen {_gib(run.peak_rss)})")
        if not parts:
            break
        print(f"  {n:5d} tokens: " + "; ".join(parts))
    print(f"  longest completed under the cap: ours {longest['ours']}, theirs {longest['theirs']}  ({_load()})")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--transcoders", type=Path, help="transcoder dir (circuit-tracer format); default: random")
    p.add_argument("--kind", choices=("clt", "plt"), default="clt", help="random transcoders' kind")
    p.add_argument("--features", type=int, default=128, help="random transcoders' features per layer")
    p.add_argument("--rate", type=float, default=0.0025, help="random transcoders' firing rate")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--zero-bos", type=int, choices=(0, 1), default=1, help="zero features/errors at position 0")
    p.add_argument("--threads", type=int, default=0, help="torch threads per child (0: torch's default)")
    p.add_argument("--long-tokens", type=int, default=64, help="length of the timing prompt")
    p.add_argument("--repeats", type=int, default=2, help="attribute() runs per prompt and process")
    p.add_argument("--rounds", type=int, default=2, help="processes per engine for the timing prompt, alternating")
    p.add_argument("--profile", action="store_true", help="profile ours on the timing prompt")
    p.add_argument("--sweep", action="store_true", help="find the longest prompt each completes under the cap")
    p.add_argument("--sweep-only", action="store_true", help="skip the edge/timing comparison (implies --sweep)")
    p.add_argument("--sweep-lengths", default="256,512,768,1024,1536")
    p.add_argument("--sweep-batch-size", type=int, default=4)
    p.add_argument("--sweep-max-features", type=int, default=8, help="max_feature_nodes in the sweep (0: all)")
    p.add_argument("--mem-cap-gib", type=float, default=8.0)
    p.add_argument("--child-timeout", type=float, default=1200.0)
    return p


def _child_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vs_circuit_tracer _ours")
    p.add_argument("--transcoders", required=True)
    p.add_argument("--tokens", required=True, nargs="+")
    p.add_argument("--out", required=True, nargs="+")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--zero-bos", type=int, choices=(0, 1), default=1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--max-feature-nodes", type=int, default=None)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--no-adjacency", action="store_true")
    p.add_argument("--prefix-buckets", type=int, default=2)
    p.add_argument("--profile", action="store_true")
    return p


if __name__ == "__main__":
    sys.exit(main())
