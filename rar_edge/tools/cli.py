"""The ``rar-edge`` command (also ``python -m rar_edge``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from typing import Any, Sequence

from rar_edge._fs import write_text
from rar_edge.errors import InvalidInputError, RarEdgeError

log = logging.getLogger("rar_edge")


def _write_json(obj: Any, out: str | None) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False)
    if out is None or out == "-":
        print(text)
        return
    write_text(out, text + "\n")


def _crop_scale_arg(v: str) -> float | str:
    if v == "adaptive":
        return v
    try:
        return float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number (e.g. 1.5) or 'adaptive', got {v!r}") from None


def _encoder(args) -> "Any":
    from rar_edge.encoders import Encoder, EncoderConfig

    return Encoder(args.encoder, config=EncoderConfig(provider=args.provider, threads=args.threads,
                                                       batch_size=args.batch_size))


def _add_encoder_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--encoder", required=required, help="encoder model folder (rar-edge export clip|tflite)")
    p.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "tensorrt"], help="ONNX Runtime provider")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--batch-size", type=int, default=16, help="images or texts per model call")


def _add_few_shot_eval_args(p: argparse.ArgumentParser, *, queries_help: str) -> None:
    """The options `eval` and `eval-detect` share: the encoder, the few-shot split, k, other queries."""
    _add_encoder_args(p, required=True)
    p.add_argument("--shots", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--queries", default=None, help=queries_help)


def _add_ranker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ranker", default=None, help="MLLM ranker model folder or GGUF (rar-edge export mllm)")
    p.add_argument("--ranker-mode", default="score", choices=["score", "generate"],
                   help="score: candidate log-likelihoods; generate: the model writes the ranked list")
    p.add_argument("--n-gpu-layers", type=int, default=0,
                   help="ranker layers offloaded to the GPU by a CUDA build of llama.cpp (-1: all)")
    p.add_argument("--gate-margin", type=float, default=None,
                   help="skip the ranker when the retrieval margin (1st - 2nd score) is at least this")


def _ranker(args) -> Any:
    if not getattr(args, "ranker", None):
        return None
    from rar_edge.rank.ranker import Ranker

    return Ranker.load(args.ranker, mode=args.ranker_mode, n_gpu_layers=args.n_gpu_layers)


def _close(pipe) -> None:
    """Closes a pipeline and the ranker `_ranker` loaded for it (a pipeline leaves rankers passed in open)."""
    pipe.close()
    if pipe.ranker is not None:
        pipe.ranker.close()


def _memory_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", choices=["auto", "exact", "hnsw"])
    p.add_argument("--hnsw-m", type=int, default=16)
    p.add_argument("--ef-construction", type=int, default=200)
    p.add_argument("--ef", type=int, default=512)


# -- commands -----------------------------------------------------------------------------------
def cmd_memory_build(args) -> int:
    from rar_edge.index.memory import HnswParams, Memory

    enc = _encoder(args)
    hnsw = HnswParams(M=args.hnsw_m, ef_construction=args.ef_construction, ef=args.ef)
    sources = [x for x in (args.folder, args.classes, getattr(args, "boxes", None)) if x]
    if len(sources) != 1:
        raise InvalidInputError("give exactly one of FOLDER (few-shot images), --classes FILE (zero-shot) or --boxes DATASET")
    if args.classes:
        from rar_edge.datasets import read_class_names

        mem = Memory.from_class_names(read_class_names(args.classes), encoder=enc, backend=args.backend, hnsw=hnsw)
    elif getattr(args, "boxes", None):
        from rar_edge.index.build import memory_from_boxes

        mem = memory_from_boxes(args.boxes, encoder=enc, shots=args.shots, seed=args.seed, backend=args.backend,
                                hnsw=hnsw, progress=not args.quiet)
    else:
        mem = Memory.from_folder(args.folder, encoder=enc, shots=args.shots, seed=args.seed, backend=args.backend,
                                 hnsw=hnsw, progress=not args.quiet)
    mem.save(args.output)
    info = mem.info()
    print(f"wrote {args.output}: {info['n_entries']} entries, {info['n_classes']} classes, dim {info['dim']}, "
          f"backend {info['active_backend']}, encoder {enc.name} ({enc.fingerprint[:12]})")
    return 0


def cmd_memory_info(args) -> int:
    from rar_edge.index.memory import Memory

    info = Memory.load(args.memory).info()
    if args.json:
        _write_json(info, None)
    else:
        print(f"{info['path']}: {info['n_entries']} entries, {info['n_classes']} classes, dim {info['dim']}, "
              f"backend {info['backend']} (active: {info['active_backend']}), storage {info['storage']}")
        enc = info["encoder"] or {}
        print(f"encoder: {enc.get('name')} at {enc.get('path')} (fingerprint {str(enc.get('fingerprint'))[:12]})")
        for c, n in info["entries_per_class"].items():
            print(f"  {c}: {n}")
    return 0


def _pipeline(args):
    from rar_edge.encoders import EncoderConfig
    from rar_edge.pipeline import Pipeline, PipelineConfig

    cfg = PipelineConfig(k=args.k, encoder=EncoderConfig(provider=args.provider, threads=args.threads,
                                                          batch_size=args.batch_size),
                         gate_margin=getattr(args, "gate_margin", None))
    return Pipeline(memory=args.memory, encoder=args.encoder, ranker=_ranker(args), config=cfg)


def cmd_classify(args) -> int:
    pipe = _pipeline(args)
    rows = []
    for img, r in zip(args.images, pipe.iter_classify(args.images)):  # decodes the next image meanwhile
        rows.append({"image": img, **r.to_dict()})
        if not args.json:
            cands = ", ".join(f"{c.label} {c.score:.3f}" for c in r.candidates)
            ranked = " (ranked)" if r.ranker_ran else ""
            print(f"{img}: {r.label}{ranked}  [{cands}]  {r.timings_ms['total']:.1f} ms")
    if args.json:
        _write_json(rows, None)  # always a list, one object per image: the same shape for one image or many
    _close(pipe)
    return 0


def cmd_detect(args) -> int:
    from rar_edge.datasets import read_boxes_file

    pipe = _pipeline(args)
    boxes = read_boxes_file(args.boxes, image=args.image)
    dets = pipe.detect(args.image, boxes, on_invalid=args.on_invalid)
    if args.json:
        _write_json([d.to_dict() for d in dets], None)
    else:
        for d in dets:
            x1, y1, x2, y2 = d.box
            print(f"[{x1:.0f},{y1:.0f},{x2:.0f},{y2:.0f}] {d.label} {d.score:.3f}")
    _close(pipe)
    return 0


def cmd_eval(args) -> int:
    from rar_edge.encoders import EncoderConfig
    from rar_edge.index.memory import HnswParams
    from rar_edge.pipeline import PipelineConfig
    from rar_edge.tools.evaluate import evaluate_classification

    enc = _encoder(args)
    ranker = _ranker(args)
    cfg = PipelineConfig(k=args.k, encoder=EncoderConfig(provider=args.provider, threads=args.threads,
                                                          batch_size=args.batch_size), gate_margin=args.gate_margin)
    res = evaluate_classification(args.folder, encoder=enc, shots=args.shots, seed=args.seed, k=args.k,
                                  queries_folder=args.queries, ranker=ranker, config=cfg, backend=args.backend,
                                  hnsw=HnswParams(M=args.hnsw_m, ef_construction=args.ef_construction, ef=args.ef),
                                  progress=not args.quiet)
    _write_json(res, args.json)
    line = f"top1 {res['top1']:.4f}  recall@{args.k} {res['recall'][str(args.k)]:.4f}  n={res['n_queries']}"
    if "ranked_top1" in res:
        line += f"  (retrieval-only top1 {res['retrieval_top1']:.4f}, ranker changed {res['ranker_changed_rate']:.3f})"
    print(line, file=sys.stderr if args.json in (None, "-") else sys.stdout)
    return 0


def cmd_eval_detect(args) -> int:
    from rar_edge.tools.evaluate import evaluate_detection

    enc = _encoder(args)
    res = evaluate_detection(args.dataset, encoder=enc, shots=args.shots, seed=args.seed, k=args.k,
                             queries=args.queries, ranker=_ranker(args), crop_scale=args.crop_scale,
                             blur_sigma_px=args.blur_sigma, gate_margin=args.gate_margin, progress=not args.quiet)
    _write_json(res, args.json)
    print(f"top1 {res['top1']:.4f}  recall@{args.k} {res['recall'][str(args.k)]:.4f}  n={res['n_queries']}",
          file=sys.stderr if args.json in (None, "-") else sys.stdout)
    return 0


def cmd_finetune_data(args) -> int:
    from rar_edge.tools.finetune_data import run_finetune_data

    enc = _encoder(args)
    info = run_finetune_data(args.folder, enc.embed_images, k=args.k, out=args.output, seed=args.seed,
                             neighbours=args.neighbours)
    print(f"wrote {args.output}: {info['rows']} rows ({info['images_a']} images in Da, {info['images_b']} in Db, "
          f"{info['classes']} classes, k={info['k']}, prompt {info['prompt_version']})")
    return 0


def cmd_demo(args) -> int:
    from rar_edge.tools.demo import run_demo

    return run_demo(workdir=args.workdir, shared=args.shared, n_images=args.n, clip=args.clip, ranker=args.ranker)


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="export models to a rar_edge model folder (needs the 'export' extras)")
    esub = p.add_subparsers(dest="export_cmd", required=True, metavar="{clip,tflite,mllm}")
    try:
        from rar_edge_export import add_export_subcommands
    except ImportError as e:  # the runtime can be installed without the export tools
        msg = f"export tools unavailable ({e}); pip install 'rar-edge[export]'"  # `e` is gone after except
        for name in ("clip", "tflite", "mllm"):  # each subcommand answers with the install hint
            sp = esub.add_parser(name, help="needs the 'export' extras")
            sp.add_argument("args", nargs=argparse.REMAINDER)
            sp.set_defaults(func=lambda a: _fail(msg))
        return
    add_export_subcommands(esub)


def _fail(msg: str) -> int:
    print(f"rar-edge: error: {msg}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rar-edge", description="RAR retrieval + ranking on the edge")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="cmd", required=True)

    _export_parser(sub)

    pm = sub.add_parser("memory", help="build or inspect a memory")
    msub = pm.add_subparsers(dest="memory_cmd", required=True)
    b = msub.add_parser("build", help="few-shot from FOLDER (one sub-folder per class), zero-shot from --classes, "
                                      "or few-shot crops from --boxes DATASET")
    b.add_argument("folder", nargs="?", help="image folder, one sub-folder per class")
    b.add_argument("--classes", help="text file of class names, one a line (zero-shot, CLIP text tower)")
    b.add_argument("--boxes", help="YOLO folder or COCO json: labelled boxes whose crops become exemplars")
    _add_encoder_args(b, required=True)
    b.add_argument("--shots", type=int, default=None, help="images per class (a seeded random sample); default all")
    b.add_argument("--seed", type=int, default=0)
    _memory_args(b)
    b.add_argument("-o", "--output", required=True, help="memory file to write")
    b.set_defaults(func=cmd_memory_build)
    i = msub.add_parser("info", help="describe a memory file")
    i.add_argument("memory")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_memory_info)

    c = sub.add_parser("classify", help="classify images with a memory (and a ranker)")
    c.add_argument("images", nargs="+")
    c.add_argument("--memory", required=True)
    _add_encoder_args(c, required=False)
    c.add_argument("-k", type=int, default=5)
    _add_ranker_args(c)
    c.add_argument("--json", action="store_true", help="print the results as a JSON list, one object per image")
    c.set_defaults(func=cmd_classify)

    d = sub.add_parser("detect", help="classify the boxes of an image")
    d.add_argument("image")
    d.add_argument("--boxes", required=True, help="YOLO txt, COCO-style json list, or json list of [x1,y1,x2,y2]")
    d.add_argument("--memory", required=True)
    _add_encoder_args(d, required=False)
    d.add_argument("-k", type=int, default=5)
    _add_ranker_args(d)
    d.add_argument("--on-invalid", default="raise", choices=["raise", "skip"])
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_detect)

    e = sub.add_parser("eval", help="few-shot accuracy on an image folder")
    e.add_argument("folder")
    _add_few_shot_eval_args(e, queries_help="query every image of this folder instead of the rest of FOLDER")
    _add_ranker_args(e)
    _memory_args(e)
    e.add_argument("--json", default=None, help="write the results here (default: stdout)")
    e.set_defaults(func=cmd_eval)

    ed = sub.add_parser("eval-detect", help="few-shot box classification accuracy on a YOLO folder or COCO json")
    ed.add_argument("dataset")
    _add_few_shot_eval_args(ed, queries_help="classify every box of this dataset instead")
    ed.add_argument("--crop-scale", default=None, type=_crop_scale_arg, help="box enlargement factor, or 'adaptive'")
    ed.add_argument("--blur-sigma", type=float, default=None, help="Gaussian sigma (px) around the box; 0 = off")
    _add_ranker_args(ed)
    ed.add_argument("--json", default=None, help="write the results here (default: stdout)")
    ed.set_defaults(func=cmd_eval_detect)

    f = sub.add_parser("finetune-data", help="ranking fine-tuning rows (RAR recipe) as conversation JSONL")
    f.add_argument("folder")
    _add_encoder_args(f, required=True)
    f.add_argument("-k", type=int, default=5)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--neighbours", type=int, default=20)
    f.add_argument("-o", "--output", required=True)
    f.set_defaults(func=cmd_finetune_data)

    from rar_edge.tools.bench import add_bench_subcommand

    add_bench_subcommand(sub)

    dm = sub.add_parser("demo", help="end-to-end demo: export, build a memory, classify (says which models it used)")
    dm.add_argument("--workdir", default="artifacts/demo")
    dm.add_argument("--shared", default=None, help="the shared data folder (default: $RAR_EDGE_SHARED or ../shared)")
    dm.add_argument("-n", type=int, default=8, help="query images to classify")
    dm.add_argument("--clip", default=None, help="a CLIP model (local folder or hub id) for zero-shot")
    dm.add_argument("--ranker", default=None, help="a ranker model folder or GGUF")
    dm.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    with warnings.catch_warnings():  # restores the process's warning display when main() returns
        # the SDK's warnings (e.g. a GPU provider that fell back to the CPU) as one line, not a source excerpt
        warnings.showwarning = lambda message, *_: print(f"rar-edge: warning: {message}", file=sys.stderr)
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except RarEdgeError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `rar-edge classify ... | head -1`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:  # an output path that is a folder, a read-only location, a full disk
        where = f"{e.filename}: " if e.filename else ""
        return _fail(f"{where}{e.strerror or e}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
