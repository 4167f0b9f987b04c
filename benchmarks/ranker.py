"""Ranker latency and answer validity: score mode vs generate mode vs llama-cpp-python's free-form chat.

Ranks the same candidate lists (k names each, drawn with a fixed seed from the Oxford-17 flower and COCO
class names in ../shared/data) in both modes on one loaded model, and, as the peer a user would
otherwise pick, asks llama-cpp-python's ``Llama.create_chat_completion`` the same question without
constraints (greedy, same prompt text, its own prefix reuse). Writes JSON::

    {"score_ms": {"p50", "p95", "mean"}, "generate_ms": {...}, "peer_chat_ms": {...},
     "score_over_generate_p50": ..., "score_over_generate_paired_median": ...,
     "in_list_rate": {"score", "generate", "peer_chat"},
     "fallback_rate": {"generate"}, "top1_agreement_score_generate": ..., "stats": {...}, ...}

The modes take turns on each query (score, generate, peer), so a change of load on a shared machine
hits them alike; ``*_paired_median`` is the median of the per-query time ratios. ``in_list_rate`` is the share of answers whose first choice is one of the candidates (the peer's answer
is read with the same parser, without repair). Usage::

    python benchmarks/ranker.py --model .cache/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf --n 50 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _class_names(shared: Path) -> tuple[list[str], list[str]]:
    flowers_dir = shared / "data" / "flowers17"
    flowers = (
        sorted(p.name.replace("_", " ") for p in flowers_dir.iterdir() if p.is_dir()) if flowers_dir.is_dir() else []
    )
    coco_file = shared / "data" / "coco128" / "classes.txt"
    coco = [c.strip() for c in coco_file.read_text().splitlines() if c.strip()] if coco_file.is_file() else []
    if not flowers:
        flowers = [
            "bluebell",
            "buttercup",
            "colts foot",
            "cowslip",
            "crocus",
            "daffodil",
            "daisy",
            "dandelion",
            "fritillary",
            "iris",
            "lily valley",
            "pansy",
            "snowdrop",
            "sunflower",
            "tigerlily",
            "tulip",
            "windflower",
        ]
    if not coco:
        coco = [
            "person",
            "bicycle",
            "car",
            "motorcycle",
            "airplane",
            "bus",
            "train",
            "truck",
            "boat",
            "bird",
            "cat",
            "dog",
            "horse",
            "sheep",
            "cow",
            "elephant",
            "bear",
            "zebra",
            "giraffe",
            "umbrella",
        ]
    return flowers, coco


def _queries(n: int, k: int, seed: int, shared: Path, with_images: bool) -> list[tuple[object, list[str]]]:
    """n (image or None, candidates) pairs; even ones from flower names, odd ones from COCO names."""
    flowers, coco = _class_names(shared)
    rng = np.random.default_rng(seed)
    photos = {}
    if with_images:
        root = shared / "data" / "flowers17"
        for d in sorted(p for p in root.iterdir() if p.is_dir()):
            photos[d.name.replace("_", " ")] = sorted(d.glob("*.jpg"))
    out = []
    for i in range(n):
        pool = flowers if i % 2 == 0 else coco
        cands = [str(c) for c in rng.choice(pool, size=min(k, len(pool)), replace=False)]
        image = None
        if with_images and i % 2 == 0 and photos.get(cands[0]):
            from PIL import Image

            # The photo's true class is among the candidates, not always first (retrieval is imperfect).
            truth = cands[int(rng.integers(len(cands)))]
            with Image.open(photos[truth][int(rng.integers(len(photos[truth])))]) as im:
                image = np.asarray(im.convert("RGB"))
        out.append((image, cands))
    return out


def _summary(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {
        "p50": float(np.percentile(a, 50)),
        "p95": float(np.percentile(a, 95)),
        "mean": float(a.mean()),
        "n": len(ms),
    }


class _PeerChat:
    """llama-cpp-python's own chat completion, unconstrained and greedy, on the same prompt text (it
    reuses the longest common token prefix of consecutive prompts by itself)."""

    def __init__(self, model: str, n_threads: int, n_ctx: int, n_gpu_layers: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(model, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers, verbose=False)

    def ask(self, cands: list[str]) -> tuple[str, bool]:
        from rar_edge.rank.prompts import RANKING_PROMPT_V1 as P
        from rar_edge.rank.prompts import parse_ranking

        msgs = [
            {"role": "system", "content": P.system},
            {"role": "user", "content": P.user_text(cands, image_marker=None)},
        ]
        out = self.llm.create_chat_completion(msgs, temperature=0.0, max_tokens=12 * len(cands) + 16)
        raw = out["choices"][0]["message"]["content"] or ""
        names, _ = parse_ranking(raw, cands)
        return raw, bool(names) and names[0] in cands

    def close(self) -> None:
        self.llm.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="GGUF language model or an mllm model folder")
    ap.add_argument("--mmproj", default=None, help="vision projector GGUF (then flower queries carry a photo)")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument(
        "--n-gpu-layers",
        type=int,
        default=0,
        help="layers offloaded by a GPU build of llama.cpp (-1: all), for the ranker and the peer alike",
    )
    ap.add_argument("--no-peer", action="store_true", help="skip llama-cpp-python's free-form chat baseline")
    ap.add_argument("--shared", default=os.environ.get("RAR_EDGE_SHARED", str(REPO.parent / "shared")))
    ap.add_argument("--json", required=True, help="output JSON file")
    args = ap.parse_args(argv)

    from rar_edge.rank.ranker import Ranker

    n_threads = args.threads or len(os.sched_getaffinity(0))
    queries = _queries(args.n, args.k, args.seed, Path(args.shared), with_images=args.mmproj is not None)
    t0 = time.perf_counter()
    ranker = Ranker.load(
        args.model, mmproj=args.mmproj, n_threads=n_threads, n_ctx=args.n_ctx, n_gpu_layers=args.n_gpu_layers
    )
    load_ms = (time.perf_counter() - t0) * 1000
    import llama_cpp

    res: dict = {
        "model": str(args.model),
        "mmproj": args.mmproj,
        "n": args.n,
        "k": args.k,
        "threads": n_threads,
        "n_gpu_layers": args.n_gpu_layers,
        "gpu_offload_supported": bool(llama_cpp.llama_supports_gpu_offload()),
        "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_ms": load_ms,
        "loadavg_start": os.getloadavg(),
    }
    peer = None
    if not args.no_peer and args.mmproj is None and not Path(args.model).is_dir():
        peer = _PeerChat(args.model, n_threads, args.n_ctx, args.n_gpu_layers)
    times: dict[str, list[float]] = {"score": [], "generate": [], "peer_chat": []}
    answers: dict[str, list] = {"score": [], "generate": [], "peer_chat": []}
    with ranker:
        t0 = time.perf_counter()
        ranker.rank(queries[0][0], queries[0][1], mode="score")  # evaluates the cached prefix once
        res["first_query_ms"] = (time.perf_counter() - t0) * 1000
        if peer is not None:
            peer.ask(queries[0][1])  # the same warm-up for the peer
        # The modes take turns on each query, so a load change on the machine hits all of them alike.
        for image, cands in queries:
            for mode in ("score", "generate"):
                t0 = time.perf_counter()
                answers[mode].append(ranker.rank(image, cands, mode=mode))
                times[mode].append((time.perf_counter() - t0) * 1000)
            if peer is not None:
                t0 = time.perf_counter()
                answers["peer_chat"].append(peer.ask(cands))
                times["peer_chat"].append((time.perf_counter() - t0) * 1000)
        res["stats"] = ranker.stats.__dict__
    if peer is not None:
        peer.close()
    for mode, ms in times.items():
        if ms:
            res[f"{mode}_ms"] = _summary(ms)
    sc, ge = np.array(times["score"]), np.array(times["generate"])
    res["score_over_generate_p50"] = res["score_ms"]["p50"] / res["generate_ms"]["p50"]
    res["score_over_generate_paired_median"] = float(np.median(sc / ge))
    res["in_list_rate"] = {
        m: float(
            np.mean([r.labels[0] in c and sorted(r.labels) == sorted(c) for r, (_, c) in zip(answers[m], queries)])
        )
        for m in ("score", "generate")
    }
    res["fallback_rate"] = {"generate": float(np.mean([r.fallback for r in answers["generate"]]))}
    res["top1_agreement_score_generate"] = float(
        np.mean([a.labels[0] == b.labels[0] for a, b in zip(answers["score"], answers["generate"])])
    )
    res["top1_is_first_listed"] = {
        m: float(np.mean([r.labels[0] == c[0] for r, (_, c) in zip(answers[m], queries)]))
        for m in ("score", "generate")
    }
    res["examples"] = [
        {"candidates": c, "score": list(s.labels), "generate_raw": g.raw}
        for (_, c), s, g in list(zip(queries, answers["score"], answers["generate"]))[:3]
    ]
    if peer is not None:
        res["in_list_rate"]["peer_chat"] = float(np.mean([ok for _, ok in answers["peer_chat"]]))
        res["score_over_peer_chat_paired_median"] = float(np.median(sc / np.array(times["peer_chat"])))
        res["examples_peer"] = [raw for raw, _ in answers["peer_chat"][:3]]
    try:
        res["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    keys = ("in_list_rate", "score_over_generate_p50", "score_over_generate_paired_median")
    print(json.dumps({k: res[k] for k in res if k.endswith("_ms") or k in keys}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
