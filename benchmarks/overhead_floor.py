"""Where one-call classify overhead comes from, against what a hand-written loop pays for the same work.

One photo at a time (``rar-edge bench``'s "one call" mode), retrieval only, in three regimes. On each photo
rar_edge and the peer take turns (their order alternates photo by photo, the regimes' order turns), and each
timed call follows an untimed call of its own on the previous photo, in the same regime:

* ``model``: the real encoder call between calls, as ``rar-edge bench`` measures it;
* ``busy``: the encoder call replaced by a busy wait as long as the model's median call, returning the output
  the model last gave (for this photo in the timed call), so the search does the same work but no model runs.
  The wait spins in Python, which keeps the interpreter's own code warm: it is not an idle period either;
* ``back_to_back``: the same output at once, with no wait, so the timed call follows the previous one directly.

The peer is what a user writes without rar_edge:
1. Pillow with draft mode and the manifest's resize (stretched, or shortest edge then centre crop) and filter
   (without the EXIF orientation rar_edge applies: the flower photos carry none);
2. the same ONNX Runtime session;
3. numpy: the manifest's input normalisation and layout; then dequantise, normalise, dot with the support
   vectors, best entry per class, top k.

``decode_floor_ms`` is libjpeg-turbo (simplejpeg) alone, decoding the timed photos (up to 200; JPEGs only,
None without any) at the same DCT scale warm (best of 3 back to back, median over photos).

overhead = call wall time - time inside ``session.run`` (or the wait that stands in for it).
``share_with_model`` = mean overhead / (mean overhead + the real model's mean call): the overhead share each
regime's overhead would give with the real model.

    python benchmarks/overhead_floor.py --encoder MODEL_DIR [--images FOLDER] [--runs 200] --json out.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import shared_dir, write_json  # noqa: E402

REGIMES = ("model", "busy", "back_to_back")


class _StandIn:
    """The encoder's session as each regime sees it; accumulates the time spent 'inside the model'."""

    def __init__(self, session) -> None:
        self.session = session
        self.regime = "model"
        self.wait_s = 0.0
        self.inside_s = 0.0
        self.last = None

    def run(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            if self.regime == "model" or self.last is None:
                self.last = self.session.run(*args, **kwargs)
            elif self.regime == "busy":
                end = t0 + self.wait_s
                while time.perf_counter() < end:
                    pass
            return self.last
        finally:
            self.inside_s += time.perf_counter() - t0

    def __getattr__(self, name: str):
        return getattr(self.session, name)


def _peer(encoder, stand_in: _StandIn, support: np.ndarray, labels: np.ndarray, classes: list[str], k: int):
    """rar_edge's classify written by hand with Pillow, ONNX Runtime and numpy, following the encoder's manifest
    (resize or shortest-edge resize + centre crop, normalisation, layout) the way its model card says."""
    from PIL import Image

    from rar_edge.image.transform import RESAMPLE as _RESAMPLE

    spec = encoder.image_spec
    h, w = spec.size_px
    resample = _RESAMPLE[spec.resample]  # the manifest's filter name as a Pillow filter
    deq = spec.output_dequantize
    mean = np.asarray(spec.mean, np.float32)
    std = np.asarray(spec.std, np.float32)
    in_name, out_name = encoder._image_input, encoder._image_output  # noqa: SLF001 - the same session
    n_classes = len(classes)
    short = spec.resize_shortest_edge_px or (min(h, w) if spec.crop_mode == "center" else max(h, w))

    def pixels(path: Path) -> np.ndarray:
        with Image.open(path) as im:
            im.draft("RGB", (w, h))
            im = im.convert("RGB")
            if spec.resize_mode == "squash":
                return np.asarray(im.resize((w, h), resample))
            s = short / min(im.size)
            im = im.resize((max(round(im.width * s), w), max(round(im.height * s), h)), resample)
            left, top = (im.width - w) // 2, (im.height - h) // 2
            return np.asarray(im.crop((left, top, left + w, top + h)))

    def classify(path: Path) -> list[str]:
        x = pixels(path)[None]
        if spec.dtype != "uint8":
            x = (x.astype(np.float32) * np.float32(spec.rescale) - mean) / std
        if spec.layout == "NCHW":
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        raw = stand_in.run([out_name], {in_name: x})[0]
        y = raw.reshape(-1).astype(np.float32)
        if deq is not None and np.issubdtype(raw.dtype, np.integer):  # as the manifest says: integer outputs
            y = (y - np.float32(deq[1])) * np.float32(deq[0])
        y /= max(float(np.linalg.norm(y)), 1e-12)
        scores = support @ y
        best = np.full(n_classes, -np.inf, np.float32)
        np.maximum.at(best, labels, scores)
        return [classes[i] for i in np.argsort(-best, kind="stable")[:k]]

    return classify


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values)
    return {"p50": float(np.median(a)), "mean": float(a.mean()), "p95": float(np.percentile(a, 95))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", required=True, help="an image encoder folder (rar-edge export tflite|clip)")
    ap.add_argument(
        "--images",
        default=str(shared_dir() / "data" / "flowers17"),
        help="a folder with one sub-folder per class (default: ../shared/data/flowers17)",
    )
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--runs", type=int, default=200, help="photos timed (each in every regime, for both; >= 1)")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (1: as the bench's one-call run)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be >= 1")

    from rar_edge import Encoder, EncoderConfig, Memory, Pipeline, PipelineConfig
    from rar_edge.datasets import few_shot_split
    from rar_edge.image.codec import _decode_jpeg_fast
    from rar_edge.image.transform import draft_size

    if not Path(args.images).is_dir():
        raise SystemExit(f"no image folder {args.images} (set RAR_EDGE_SHARED or pass --images)")
    encoder = Encoder(args.encoder, config=EncoderConfig(threads=args.threads, allow_spinning=False))
    split = few_shot_split(args.images, shots=args.shots, seed=args.seed)
    sup_paths = [p for ps in split.support.values() for p in ps]
    sup_labels = [c for c, ps in split.support.items() for _ in ps]
    support = encoder.embed_images(sup_paths)  # embedded once: the memory's entries and the peer's matrix
    memory = Memory.empty(encoder=encoder)
    memory.add(support, sup_labels, sources=[str(p) for p in sup_paths])
    classes = sorted(set(sup_labels))
    labels = np.asarray([classes.index(c) for c in sup_labels])
    photos = [Path(p) for p, _ in split.queries]
    if not photos:
        raise SystemExit(f"no query photos left in {args.images} after {args.shots} shots per class")
    photos = [photos[i] for i in np.random.default_rng(args.seed).permutation(len(photos))]
    queries = [photos[i % len(photos)] for i in range(args.runs)]
    for p in photos[: args.runs + 20]:
        p.read_bytes()  # the page cache, as the bench does: decoding, not a cold disk

    stand_in = _StandIn(encoder._image_sess)  # noqa: SLF001 - benchmark-only stand-in
    encoder._image_sess = stand_in  # noqa: SLF001
    pipe = Pipeline(memory=memory, encoder=encoder, config=PipelineConfig(k=args.k))
    peer = _peer(encoder, stand_in, support, labels, classes, args.k)

    # warm-up, and the model's median call for the busy wait
    model_calls = []
    for j in range(20):
        p = photos[j % len(photos)]
        t0 = stand_in.inside_s
        pipe.classify(p)
        model_calls.append(stand_in.inside_s - t0)
        peer(p)
    stand_in.wait_s = float(np.median(model_calls))

    over: dict[str, dict[str, list[float]]] = {r: {"rar_edge": [], "peer": []} for r in REGIMES}
    model_ms: list[float] = []
    stages: dict[str, dict[str, list[float]]] = {r: {"decode": [], "preprocess": [], "search": []} for r in REGIMES}
    agree = 0
    tops: dict[str, str] = {}
    for i, p in enumerate(queries):
        for regime in REGIMES[i % 3 :] + REGIMES[: i % 3]:  # the order turns photo by photo
            stand_in.regime = regime
            for who in ("rar_edge", "peer") if i % 2 == 0 else ("peer", "rar_edge"):
                # the call before, untimed, on the previous photo: the timed call follows one of its own
                prev = photos[(i - 1) % len(photos)]
                pipe.classify(prev) if who == "rar_edge" else peer(prev)
                m0 = stand_in.inside_s
                t0 = time.perf_counter()
                out = pipe.classify(p) if who == "rar_edge" else peer(p)
                wall = time.perf_counter() - t0
                inside = stand_in.inside_s - m0
                over[regime][who].append((wall - inside) * 1e3)
                if who == "rar_edge":
                    for s in stages[regime]:
                        stages[regime][s].append(out.timings_ms[s])
                    if regime == "model":
                        model_ms.append(inside * 1e3)
                        tops["rar_edge"] = out.label
                elif regime == "model":
                    tops["peer"] = out[0]
            agree += regime == "model" and tops["rar_edge"] == tops["peer"]

    model_mean = float(np.mean(model_ms))
    regimes = {}
    for regime in REGIMES:
        block = {}
        for who in ("rar_edge", "peer"):
            st = _stats(over[regime][who])
            st["share_with_model"] = st["mean"] / (st["mean"] + model_mean)
            block[who] = st
        block["peer_over_rar_edge_overhead"] = block["peer"]["mean"] / block["rar_edge"]["mean"]
        block["rar_edge_stages_p50_ms"] = {s: float(np.median(v)) for s, v in stages[regime].items()}
        regimes[regime] = block

    draft = draft_size(encoder.image_spec)
    floor = []
    for p in photos[: min(args.runs, 200)]:  # the timed photos (up to 200)
        data = p.read_bytes()
        best = []
        for _ in range(3):
            t0 = time.perf_counter()
            out = _decode_jpeg_fast(data, draft, 1 << 62, str(p))
            best.append(time.perf_counter() - t0)
        if out is not None:
            floor.append(min(best) * 1e3)

    write_json(
        args.json,
        {
            "setup": {
                "encoder": encoder.name,
                "images": args.images,
                "shots": args.shots,
                "k": args.k,
                "runs": args.runs,
                "threads": args.threads,
                "busy_wait_ms": stand_in.wait_s * 1e3,
                "support_entries": len(sup_paths),
            },
            "model_ms": _stats(model_ms),
            "regimes": regimes,
            "decode_floor_ms": _stats(floor) if floor else None,
            "peer_top1_agrees_with_rar_edge": agree / len(queries),
        },
    )


if __name__ == "__main__":
    main()
