"""The ``rar-edge`` command (also ``python -m rar_edge``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import warnings
from typing import Any, Sequence

from rar_edge import defaults
from rar_edge._fs import write_text
from rar_edge.errors import InvalidInputError, RarEdgeError

log = logging.getLogger("rar_edge")


def _write_json(obj: Any, out: str | None) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False)  # class names stay readable
    if out is None or out == "-":
        print(text)
        return
    write_text(out, text + "\n")


def _at_least(lo: int):
    """An argparse type: an integer >= ``lo`` (argparse names the option in its message)."""

    def parse(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {v!r}") from None
        if n < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {n}")
        return n

    parse.__name__ = "integer"
    return parse


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (unless it has none, or says it already)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if (
            action.option_strings
            and not any(d is x for x in (None, False, argparse.SUPPRESS))
            and "default" not in text
            and not isinstance(action, (argparse._VersionAction, argparse._HelpAction))
        ):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help shows defaults; its subcommands' parsers are of this class too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


ON_ERROR_HELP = (
    "what to do with an image that cannot be read (corrupt, truncated, missing, too large): skip it "
    "with a warning naming it and go on, or stop there (results so far are kept)"
)


def _crop_scale_arg(v: str) -> float | str:
    if v == "adaptive":
        return v
    try:
        return float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number (e.g. 1.5) or 'adaptive', got {v!r}") from None


def _encoder(args) -> "Any":
    from rar_edge.encoders import Encoder, EncoderConfig

    return Encoder(
        args.encoder, config=EncoderConfig(provider=args.provider, threads=args.threads, batch_size=args.batch_size)
    )


def _add_encoder_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--encoder", required=required, help="encoder model folder (rar-edge export clip|tflite)")
    p.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "tensorrt"], help="ONNX Runtime provider")
    p.add_argument(
        "--threads", type=_at_least(1), default=None, help="ONNX Runtime intra-op threads (default: all cores)"
    )
    p.add_argument(
        "--batch-size", type=_at_least(1), default=defaults.BATCH_SIZE, help="images or texts per model call"
    )


def _add_edit_output_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument(
        "-o",
        "--output",
        required=required,
        default=None,
        help="memory to write (.rarmem file or .rarmemd store)" + ("" if required else "; default: in place"),
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing memory at --output")


def _add_few_shot_eval_args(p: argparse.ArgumentParser, *, queries_help: str) -> None:
    """The options `eval` and `eval-detect` share: the encoder, the few-shot split, k, other queries."""
    _add_encoder_args(p, required=True)
    p.add_argument("--shots", type=_at_least(1), required=True, help="examples per class in the memory")
    p.add_argument("--seed", type=int, default=0, help="seed of the few-shot split")
    p.add_argument(
        "-k",
        type=_at_least(1),
        default=defaults.K,
        help="classes retrieved (and ranked) per query; at most the memory's class count",
    )
    p.add_argument("--queries", default=None, help=queries_help)


def _add_ranker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ranker", default=None, help="MLLM ranker model folder or GGUF (rar-edge export mllm)")
    p.add_argument(
        "--ranker-mode",
        default="score",
        choices=["score", "generate"],
        help="score: candidate log-likelihoods; generate: the model writes the ranked list",
    )
    p.add_argument(
        "--n-gpu-layers",
        type=int,
        default=0,
        help="ranker layers offloaded to the GPU by a CUDA build of llama.cpp (-1: all)",
    )
    p.add_argument(
        "--gate-margin",
        type=float,
        default=None,
        help="skip the ranker when the retrieval margin (1st - 2nd score) is at least this (default: always rank)",
    )


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


def _add_on_error_arg(p: argparse.ArgumentParser, more_help: str = "") -> None:
    p.add_argument("--on-error", default="skip", choices=["skip", "stop"], help=ON_ERROR_HELP + more_help)


def _add_max_pixels_arg(p: argparse.ArgumentParser) -> None:
    from rar_edge.image.codec import DEFAULT_MAX_PIXELS

    p.add_argument(
        "--max-pixels",
        type=_at_least(1),
        default=DEFAULT_MAX_PIXELS,
        help="refuse images that decode to more pixels than this (a decompression-bomb guard; JPEGs "
        "count the pixels of their reduced-scale decode)",
    )


def _memory_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "exact", "hnsw"],
        help="search: exact native scan, HNSW graph, or auto (HNSW from 500k entries where its ef can reach the k-th "
        "class, else exact)",
    )
    p.add_argument("--hnsw-m", type=_at_least(2), default=defaults.HNSW_M, help="HNSW graph degree")
    p.add_argument(
        "--ef-construction",
        type=_at_least(1),
        default=defaults.HNSW_EF_CONSTRUCTION,
        help="HNSW build-time candidate list size",
    )
    p.add_argument("--ef", type=_at_least(1), default=defaults.HNSW_EF, help="HNSW search-time candidate list size")


# -- commands -----------------------------------------------------------------------------------
def _check_output(path: str, overwrite: bool) -> None:
    """Refuses an output path that exists, unless ``overwrite`` and it is a memory (never another file)."""
    from pathlib import Path

    from rar_edge.index.memory import is_memory

    p = Path(path)
    if not p.exists():
        return
    if not is_memory(p):
        raise InvalidInputError(f"{p} exists and is not a memory: refusing to replace it; choose another output path")
    if not overwrite:
        raise InvalidInputError(f"{p} exists: pass --overwrite to replace that memory")


def _memory_encoder(args, mem) -> Any:
    """--encoder, else the encoder folder the memory records (the error says to pass --encoder if it moved)."""
    if args.encoder is None:
        args.encoder = str(mem.encoder_folder())
    enc = _encoder(args)
    mem.check_encoder(enc)
    return enc


def cmd_memory_add(args) -> int:
    from pathlib import Path

    from rar_edge.datasets import read_image_folder
    from rar_edge.index.memory import Memory

    out = args.output or args.memory
    if args.output:
        _check_output(args.output, args.overwrite)
    mem = Memory.load(args.memory)
    if args.label is None:
        if len(args.inputs) != 1 or not Path(args.inputs[0]).is_dir():
            raise InvalidInputError("give one FOLDER (a sub-folder per class), or images with --label L")
        per_class = read_image_folder(args.inputs[0])
        images = [p for ps in per_class.values() for p in ps]
        labels = [c for c, ps in per_class.items() for _ in ps]
    else:
        images = []
        for x in args.inputs:
            if Path(x).is_dir():
                raise InvalidInputError(
                    f"{x} is a folder: with --label give image files (or drop --label to read "
                    "a folder of class sub-folders)"
                )
            images.append(x)
        labels = [args.label] * len(images)
    enc = _memory_encoder(args, mem)
    ids = mem.add_images(images, labels, encoder=enc, progress=not args.quiet, on_error=args.on_error)
    mem.save(out)
    print(f"added {len(ids)} entries to {out}: {mem.size} entries, {len(mem.classes)} classes")
    return 0


def cmd_memory_remove(args) -> int:
    from rar_edge.index.memory import Memory

    out = args.output or args.memory
    if args.output:
        _check_output(args.output, args.overwrite)
    if args.label is None and not args.ids:
        raise InvalidInputError("give --label L and/or --ids ID ...")
    mem = Memory.load(args.memory)
    n = mem.remove(ids=args.ids or None, label=args.label)
    mem.save(out)
    print(f"removed {n} entries from {args.memory}, wrote {out}: {mem.size} entries, {len(mem.classes)} classes")
    return 0


def cmd_memory_merge(args) -> int:
    from rar_edge.index.memory import Memory

    _check_output(args.output, args.overwrite)
    a = Memory.load(args.memory_a)
    b = Memory.load(args.memory_b)
    n = len(a.add_memory(b))
    a.save(args.output)
    print(f"wrote {args.output}: {a.size} entries ({n} from {args.memory_b}), {len(a.classes)} classes")
    return 0


def cmd_memory_export(args) -> int:
    from rar_edge.index.memory import Memory

    _check_output(args.output, args.overwrite)
    mem = Memory.load(args.memory)
    mem.save(args.output, layout="file")
    print(f"wrote {args.output}: {mem.size} entries, {len(mem.classes)} classes")
    return 0


def cmd_pack(args) -> int:
    from rar_edge.pack import write_pack

    out = write_pack(
        args.output,
        memory=args.memory,
        encoder=args.encoder,
        ranker=args.ranker,
        mmproj=args.mmproj,
        overwrite=args.overwrite,
    )
    print(f"wrote pack {out}")
    return 0


def cmd_memory_build(args) -> int:
    from rar_edge.index.memory import HnswParams, Memory

    _check_output(args.output, args.overwrite)  # before any model is loaded or image embedded
    enc = _encoder(args)
    hnsw = HnswParams(M=args.hnsw_m, ef_construction=args.ef_construction, ef=args.ef)
    sources = [x for x in (args.folder, args.classes, getattr(args, "boxes", None)) if x]
    if len(sources) != 1:
        raise InvalidInputError(
            "give exactly one of FOLDER (few-shot images), --classes FILE (zero-shot) or --boxes DATASET"
        )
    if args.engine == "ray":
        from rar_edge.datasets import read_class_names
        from rar_edge.tools.distributed import build_memory

        mem = build_memory(
            args.folder,
            encoder=enc,
            classes=read_class_names(args.classes) if args.classes else None,
            boxes=getattr(args, "boxes", None),
            shots=args.shots,
            seed=args.seed,
            backend=args.backend,
            hnsw=hnsw,
            on_error=args.on_error,
            options=_ray_options(args),
            progress=not args.quiet,
        )
    elif args.classes:
        from rar_edge.datasets import read_class_names

        mem = Memory.from_class_names(read_class_names(args.classes), encoder=enc, backend=args.backend, hnsw=hnsw)
    elif getattr(args, "boxes", None):
        from rar_edge.index.build import memory_from_boxes

        mem = memory_from_boxes(
            args.boxes,
            encoder=enc,
            shots=args.shots,
            seed=args.seed,
            backend=args.backend,
            hnsw=hnsw,
            progress=not args.quiet,
        )
    else:
        mem = Memory.from_folder(
            args.folder,
            encoder=enc,
            shots=args.shots,
            seed=args.seed,
            backend=args.backend,
            hnsw=hnsw,
            progress=not args.quiet,
            on_error=args.on_error,
        )
    mem.save(args.output)
    info = mem.info()
    if args.json:
        skipped = []
        if args.folder:  # the sampled photos that got no entry (each was named in a warning)
            from rar_edge.datasets import few_shot_split

            have = set(mem.sources)
            skipped = [
                str(p)
                for ps in few_shot_split(args.folder, shots=args.shots, seed=args.seed).support.values()
                for p in ps
                if str(p) not in have
            ]
        _write_json({"output": str(args.output), **info, "skipped_images": skipped}, None)
    else:
        print(
            f"wrote {args.output}: {info['n_entries']} entries, {info['n_classes']} classes, dim {info['dim']}, "
            f"backend {info['active_backend']}, encoder {enc.name} ({enc.fingerprint[:12]})"
        )
    return 0


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engine",
        default="local",
        choices=["local", "ray"],
        help="local: this process; ray: an actor pool on Ray Data (needs the 'ray' extra)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to join (auto, HOST:6379, ray://HOST:10001); default: start a local Ray",
    )
    p.add_argument("--ray-concurrency", type=int, default=1, help="actors, each holding one encoder session")
    p.add_argument("--ray-batch-size", type=int, default=64, help="images per actor call")
    p.add_argument(
        "--ray-cpus-per-actor",
        type=float,
        default=1.0,
        help="CPUs reserved per actor (also its ONNX Runtime threads unless --threads is given)",
    )
    p.add_argument(
        "--ray-gpus-per-actor",
        type=float,
        default=None,
        help="GPUs reserved per actor (default: 1 with --provider cuda/tensorrt, else 0)",
    )
    p.add_argument(
        "--ray-ship-files",
        default=None,
        action=argparse.BooleanOptionalAction,
        help="send the model folder (and memory file) to nodes through Ray's object store "
        "(default: when joining a cluster)",
    )


def _ray_options(args) -> Any:
    from rar_edge.tools.distributed import RayOptions

    return RayOptions(
        address=args.ray_address,
        concurrency=args.ray_concurrency,
        batch_size=args.ray_batch_size,
        num_cpus_per_actor=args.ray_cpus_per_actor,
        num_gpus_per_actor=args.ray_gpus_per_actor,
        ship_files=args.ray_ship_files,
    )


def cmd_classify_batch(args) -> int:
    from rar_edge.encoders import EncoderConfig
    from rar_edge.tools.batch import BatchConfig, classify_batch

    cfg = BatchConfig(
        k=args.k,
        encoder=EncoderConfig(provider=args.provider, threads=args.threads, batch_size=args.batch_size),
        ranker_mode=args.ranker_mode,
        gate_margin=args.gate_margin,
        n_gpu_layers=args.n_gpu_layers,
    )
    res = classify_batch(
        args.src,
        memory=args.memory,
        output=args.output,
        encoder=args.encoder,
        ranker=args.ranker,
        config=cfg,
        engine=args.engine,
        options=_ray_options(args) if args.engine == "ray" else None,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(f"wrote {res.output}: {res.rows} rows, {res.errors} with an error (engine {res.engine})")
    return 0


def cmd_memory_info(args) -> int:
    from rar_edge.index.memory import Memory

    info = Memory.load(args.memory).info()
    if args.json:
        _write_json(info, None)
    else:
        print(
            f"{info['path']}: {info['n_entries']} entries, {info['n_classes']} classes, dim {info['dim']}, "
            f"backend {info['backend']} (active: {info['active_backend']}), storage {info['storage']}"
        )
        enc = info["encoder"] or {}
        print(f"encoder: {enc.get('name')} at {enc.get('path')} (fingerprint {str(enc.get('fingerprint'))[:12]})")
        for c, n in info["entries_per_class"].items():
            print(f"  {c}: {n}")
    return 0


def _pipeline(args):
    from rar_edge.encoders import EncoderConfig
    from rar_edge.pipeline import Pipeline, PipelineConfig

    cfg = PipelineConfig(
        k=args.k,
        encoder=EncoderConfig(provider=args.provider, threads=args.threads, batch_size=args.batch_size),
        gate_margin=getattr(args, "gate_margin", None),
        max_pixels=args.max_pixels,
    )
    pack = getattr(args, "pack", None)
    if pack is None:
        if not args.memory:
            raise InvalidInputError("give --memory M (or --pack PACK)")
        return Pipeline(memory=args.memory, encoder=args.encoder, ranker=_ranker(args), config=cfg)
    from rar_edge.pack import open_pack

    if args.memory:
        raise InvalidInputError("give --memory or --pack, not both")
    opened = open_pack(pack)
    ranker = _ranker(args)
    if ranker is None and opened.ranker is not None:
        from rar_edge.rank.ranker import Ranker

        ranker = Ranker.load(opened.ranker, mmproj=opened.mmproj, mode=args.ranker_mode, n_gpu_layers=args.n_gpu_layers)
    return Pipeline(memory=opened.memory, encoder=args.encoder or opened.encoder, ranker=ranker, config=cfg)


def cmd_classify(args) -> int:
    from rar_edge.types import ImageError

    pipe = _pipeline(args)
    rows: list[dict] = []
    failed = 0
    try:
        # decodes the next image meanwhile; an unreadable one gives an ImageError in its place (--on-error skip)
        for img, r in zip(args.images, pipe.iter_classify(args.images, on_error=args.on_error)):
            if isinstance(r, ImageError):
                failed += 1
                rows.append({"image": img, "error": r.error, "error_type": r.error_type})
                continue
            rows.append({"image": img, **r.to_dict()})
            if not args.json:
                cands = ", ".join(f"{c.label} {c.score:.3f}" for c in r.candidates)
                ranked = " (ranked)" if r.ranker_ran else ""
                print(f"{img}: {r.label}{ranked}  [{cands}]  {r.timings_ms['total']:.1f} ms", flush=True)
    finally:  # --on-error stop, Ctrl-C: what was computed is still printed
        if args.json:
            _write_json(rows, None)  # always a list, one object per image: the same shape for one image or many
        _close(pipe)
    if failed:
        print(f"rar-edge: {failed} of {len(args.images)} images could not be classified (named above)", file=sys.stderr)
        return 1
    return 0


def cmd_detect(args) -> int:
    from rar_edge.datasets import read_boxes_file

    pipe = _pipeline(args)
    boxes = read_boxes_file(args.boxes, image=args.image)
    if len(boxes) == 0:
        (print if not args.json else lambda m: print(f"rar-edge: {m}", file=sys.stderr))(f"no boxes in {args.boxes}")
    dets = pipe.detect(args.image, boxes, on_invalid=args.on_invalid)
    skipped = _skipped_boxes(args.image, boxes, dets) if args.on_invalid == "skip" else {}
    for why in skipped.values():
        if args.json:
            print(f"rar-edge: warning: skipped {why}", file=sys.stderr)
    if args.json:
        _write_json([d.to_dict() for d in dets], None)
    else:
        by_index = {d.index: d for d in dets}
        for i in range(len(boxes)):
            if i in skipped:
                print(f"skipped {skipped[i]}")
                continue
            d = by_index[i]
            x1, y1, x2, y2 = d.box
            print(f"[{x1:.0f},{y1:.0f},{x2:.0f},{y2:.0f}] {d.label} {d.score:.3f}")
    _close(pipe)
    return 0


def _skipped_boxes(image: str, boxes: Any, dets: list) -> dict[int, str]:
    """Box index -> why `detect` left it out, as `validate_boxes` says it ("box 1 has zero or negative area...")."""
    from rar_edge.datasets import _image_size
    from rar_edge.image.boxes import validate_boxes

    kept = {d.index for d in dets}
    if len(kept) == len(boxes):
        return {}
    w, h = _image_size(image)
    _, ok, reasons = validate_boxes(boxes, (h, w), on_invalid="skip")
    missing = [i for i in range(len(boxes)) if i not in kept]
    return {i: (reasons[n] if n < len(reasons) else f"box {i}") for n, i in enumerate(missing)}


def cmd_eval(args) -> int:
    from rar_edge.encoders import EncoderConfig
    from rar_edge.index.memory import HnswParams
    from rar_edge.pipeline import PipelineConfig
    from rar_edge.tools.evaluate import evaluate_classification

    enc = _encoder(args)
    ranker = _ranker(args)
    cfg = PipelineConfig(
        k=args.k,
        encoder=EncoderConfig(provider=args.provider, threads=args.threads, batch_size=args.batch_size),
        gate_margin=args.gate_margin,
        max_pixels=args.max_pixels,
    )
    res = evaluate_classification(
        args.folder,
        encoder=enc,
        shots=args.shots,
        seed=args.seed,
        k=args.k,
        queries_folder=args.queries,
        ranker=ranker,
        config=cfg,
        backend=args.backend,
        hnsw=HnswParams(M=args.hnsw_m, ef_construction=args.ef_construction, ef=args.ef),
        progress=not args.quiet,
        on_error=args.on_error,
    )
    _write_json(res, args.json)
    k = res["setup"]["k"]  # -k above the class count is lowered to it
    line = f"top1 {res['top1']:.4f}  recall@{k} {res['recall'][str(k)]:.4f}  n={res['n_queries']}"
    if "ranked_top1" in res:
        line += f"  (retrieval-only top1 {res['retrieval_top1']:.4f}, ranker changed {res['ranker_changed_rate']:.3f})"
    print(line, file=sys.stderr if args.json in (None, "-") else sys.stdout)
    return 0


def cmd_eval_detect(args) -> int:
    from rar_edge.tools.evaluate import evaluate_detection

    enc = _encoder(args)
    res = evaluate_detection(
        args.dataset,
        encoder=enc,
        shots=args.shots,
        seed=args.seed,
        k=args.k,
        queries=args.queries,
        ranker=_ranker(args),
        crop_scale=args.crop_scale,
        blur_sigma_px=args.blur_sigma,
        gate_margin=args.gate_margin,
        progress=not args.quiet,
    )
    _write_json(res, args.json)
    k = res["setup"]["k"]  # -k above the class count is lowered to it
    print(
        f"top1 {res['top1']:.4f}  recall@{k} {res['recall'][str(k)]:.4f}  n={res['n_queries']}",
        file=sys.stderr if args.json in (None, "-") else sys.stdout,
    )
    return 0


def cmd_finetune_data(args) -> int:
    from rar_edge.tools.finetune_data import run_finetune_data

    enc = _encoder(args)
    info = run_finetune_data(
        args.folder, enc.embed_images, k=args.k, out=args.output, seed=args.seed, neighbours=args.neighbours
    )
    if args.json:
        _write_json({"output": str(args.output), **info}, None)
        return 0
    print(
        f"wrote {args.output}: {info['rows']} rows ({info['images_a']} images in Da, {info['images_b']} in Db, "
        f"{info['classes']} classes, k={info['k']}, prompt {info['prompt_version']})"
    )
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


def _memory_parsers(sub: "argparse._SubParsersAction") -> None:
    """memory build / info / add / remove / merge / export."""
    pm = sub.add_parser("memory", help="build or inspect a memory")
    msub = pm.add_subparsers(dest="memory_cmd", required=True)
    b = msub.add_parser(
        "build",
        help="few-shot from FOLDER (one sub-folder per class), zero-shot from --classes, "
        "or few-shot crops from --boxes DATASET",
    )
    b.add_argument("folder", nargs="?", help="image folder, one sub-folder per class")
    b.add_argument("--classes", help="text file of class names, one a line (zero-shot, CLIP text tower)")
    b.add_argument("--boxes", help="YOLO folder or COCO json: labelled boxes whose crops become exemplars")
    _add_encoder_args(b, required=True)
    b.add_argument(
        "--shots", type=_at_least(1), default=None, help="images per class (a seeded random sample); default all"
    )
    b.add_argument("--seed", type=int, default=0, help="seed of the --shots sample")
    _memory_args(b)
    b.add_argument(
        "-o",
        "--output",
        required=True,
        help="memory to write: NAME.rarmem (one file) or NAME.rarmemd "
        "(a directory store: later edits save only what changed)",
    )
    b.add_argument("--overwrite", action="store_true", help="replace an existing memory at --output")
    _add_on_error_arg(b, " (FOLDER builds)")
    b.add_argument("--json", action="store_true", help="print what was built as JSON (with the images skipped)")
    _add_engine_args(b)
    b.set_defaults(func=cmd_memory_build)
    i = msub.add_parser("info", help="describe a memory file")
    i.add_argument("memory", help="a memory file (rar-edge memory build)")
    i.add_argument("--json", action="store_true", help="print the description as JSON")
    i.set_defaults(func=cmd_memory_info)
    ma = msub.add_parser("add", help="embed images into an existing memory (saved in place, or to -o)")
    ma.add_argument("memory", help="the memory to add to")
    ma.add_argument("inputs", nargs="+", help="one FOLDER (a sub-folder per class), or image files with --label")
    ma.add_argument("--label", default=None, help="the class of the image files given")
    _add_encoder_args(ma, required=False)
    _add_on_error_arg(ma)
    _add_edit_output_args(ma, required=False)
    ma.set_defaults(func=cmd_memory_add)
    mr = msub.add_parser("remove", help="remove a class or entries by id (saved in place, or to -o)")
    mr.add_argument("memory")
    mr.add_argument("--label", default=None, help="remove every entry of this class")
    mr.add_argument("--ids", type=int, nargs="+", default=None, help="remove these entry ids")
    _add_edit_output_args(mr, required=False)
    mr.set_defaults(func=cmd_memory_remove)
    mm = msub.add_parser("merge", help="one memory from two built by the same encoder (B's entries get new ids)")
    mm.add_argument("memory_a", metavar="A")
    mm.add_argument("memory_b", metavar="B")
    _add_edit_output_args(mm, required=True)
    mm.set_defaults(func=cmd_memory_merge)
    me = msub.add_parser("export", help="write a memory (e.g. a directory store) as one .rarmem file")
    me.add_argument("memory")
    _add_edit_output_args(me, required=True)
    me.set_defaults(func=cmd_memory_export)


def _pack_parser(sub: "argparse._SubParsersAction") -> None:
    """pack: a memory, its encoder and a ranker in one folder."""
    pk = sub.add_parser("pack", help="one folder with a memory, its encoder and a ranker, to copy anywhere")
    pk.add_argument("--memory", required=True, help="the memory")
    pk.add_argument("--encoder", default=None, help="its encoder folder (default: the one the memory records)")
    pk.add_argument("--ranker", default=None, help="a ranker model folder or GGUF (optional)")
    pk.add_argument("--mmproj", default=None, help="the vision projector GGUF of a bare GGUF ranker")
    pk.add_argument("-o", "--output", required=True, help="the pack folder to write")
    pk.add_argument("--overwrite", action="store_true", help="replace an existing pack at --output")
    pk.set_defaults(func=cmd_pack)


def _classify_parsers(sub: "argparse._SubParsersAction") -> None:
    """classify, classify-batch and detect."""
    c = sub.add_parser("classify", help="classify images with a memory (and a ranker)")
    c.add_argument("images", nargs="+", help="image files")
    c.add_argument("--memory", default=None, help="a memory file (rar-edge memory build)")
    c.add_argument("--pack", default=None, help="a pack (rar-edge pack): memory, encoder and ranker in one folder")
    _add_encoder_args(c, required=False)
    c.add_argument("-k", type=_at_least(1), default=defaults.K, help="classes retrieved (and ranked) per image")
    _add_ranker_args(c)
    c.add_argument(
        "--json",
        action="store_true",
        help="print the results as a JSON list, one object per image (an image that failed: its error)",
    )
    _add_on_error_arg(c, "; exit status 1 when any image failed")
    _add_max_pixels_arg(c)
    c.set_defaults(func=cmd_classify)

    cb = sub.add_parser("classify-batch", help="label a folder or a list of paths/URIs: one Parquet row per image")
    cb.add_argument("src", help="a folder (recursive), a file listing one path or URI a line, or one image")
    cb.add_argument("--memory", required=True, help="a memory file (rar-edge memory build)")
    _add_encoder_args(cb, required=False)
    cb.add_argument("-k", type=_at_least(1), default=defaults.K, help="classes retrieved (and ranked) per image")
    _add_ranker_args(cb)
    cb.add_argument(
        "-o",
        "--output",
        required=True,
        help="Parquet file (local engine) or folder of Parquet shards (ray engine); a path or a URI",
    )
    cb.add_argument("--overwrite", action="store_true", help="replace an existing output (file or folder of shards)")
    _add_engine_args(cb)
    cb.set_defaults(func=cmd_classify_batch)

    d = sub.add_parser("detect", help="classify the boxes of an image")
    d.add_argument("image", help="an image file")
    d.add_argument("--boxes", required=True, help="YOLO txt, COCO-style json list, or json list of [x1,y1,x2,y2]")
    d.add_argument("--memory", required=True, help="a memory file (rar-edge memory build)")
    _add_encoder_args(d, required=False)
    d.add_argument("-k", type=_at_least(1), default=defaults.K, help="classes retrieved (and ranked) per box")
    _add_ranker_args(d)
    d.add_argument(
        "--on-invalid",
        default="raise",
        choices=["raise", "skip"],
        help="a box with a NaN coordinate, no area or outside the image: stop with an error, or skip it (and say so)",
    )
    d.add_argument("--json", action="store_true", help="print the detections as a JSON list")
    _add_max_pixels_arg(d)
    d.set_defaults(func=cmd_detect)


def _eval_parsers(sub: "argparse._SubParsersAction") -> None:
    """eval, eval-detect and finetune-data."""
    e = sub.add_parser("eval", help="few-shot accuracy on an image folder")
    e.add_argument("folder", help="image folder, one sub-folder per class")
    _add_few_shot_eval_args(e, queries_help="query every image of this folder instead of the rest of FOLDER")
    _add_ranker_args(e)
    _memory_args(e)
    e.add_argument("--json", default=None, metavar="FILE", help="write the results here ('-': stdout; default: stdout)")
    _add_on_error_arg(e, "; skipped queries are listed in the JSON")
    _add_max_pixels_arg(e)
    e.set_defaults(func=cmd_eval)

    ed = sub.add_parser("eval-detect", help="few-shot box classification accuracy on a YOLO folder or COCO json")
    ed.add_argument("dataset", help="YOLO folder (images/, labels/, classes.txt) or COCO json")
    _add_few_shot_eval_args(ed, queries_help="classify every box of this dataset instead")
    ed.add_argument("--crop-scale", default=None, type=_crop_scale_arg, help="box enlargement factor, or 'adaptive'")
    ed.add_argument("--blur-sigma", type=float, default=None, help="Gaussian sigma (px) around the box; 0 = off")
    _add_ranker_args(ed)
    ed.add_argument(
        "--json", default=None, metavar="FILE", help="write the results here ('-': stdout; default: stdout)"
    )
    ed.set_defaults(func=cmd_eval_detect)

    f = sub.add_parser("finetune-data", help="ranking fine-tuning rows (RAR recipe) as conversation JSONL")
    f.add_argument("folder", help="image folder, one sub-folder per class")
    _add_encoder_args(f, required=True)
    f.add_argument("-k", type=_at_least(1), default=defaults.K, help="candidates per row")
    f.add_argument("--seed", type=int, default=0, help="seed of the Da/Db split")
    f.add_argument("--neighbours", type=_at_least(1), default=20, help="nearest neighbours searched per image")
    f.add_argument("-o", "--output", required=True, help="JSONL file to write")
    f.add_argument("--json", action="store_true", help="print what was written as JSON")
    f.set_defaults(func=cmd_finetune_data)


def _demo_parser(sub: "argparse._SubParsersAction") -> None:
    """demo: the end-to-end run of `make demo`."""
    dm = sub.add_parser("demo", help="end-to-end demo: export, build a memory, classify (says which models it used)")
    dm.add_argument("--workdir", default="artifacts/demo", help="where the demo writes its models and memories")
    dm.add_argument("--shared", default=None, help="the shared data folder (default: $RAR_EDGE_SHARED or ../shared)")
    dm.add_argument("-n", type=int, default=8, help="query images to classify")
    dm.add_argument("--clip", default=None, help="a CLIP model (local folder or hub id) for zero-shot")
    dm.add_argument("--ranker", default=None, help="a ranker model folder or GGUF")
    dm.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    from rar_edge import __version__
    from rar_edge.tools.bench import add_bench_subcommand

    parser = _Parser(prog="rar-edge", description="RAR retrieval + ranking on the edge")
    parser.add_argument("--version", action="version", version=f"rar-edge {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars (they are shown only when stderr is a terminal)"
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    _export_parser(sub)
    _memory_parsers(sub)
    _pack_parser(sub)
    _classify_parsers(sub)
    _eval_parsers(sub)
    add_bench_subcommand(sub)
    _demo_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    with warnings.catch_warnings():  # restores the process's warning display when main() returns
        # the SDK's warnings (e.g. a GPU provider that fell back to the CPU) as one line, not a source excerpt
        warnings.showwarning = lambda message, *_: print(f"rar-edge: warning: {message}", file=sys.stderr)
        with _ctrl_c_once():
            return _run(args)


#: A Ctrl-C this long after the first one ends the process at once (a clean-up that hangs).
_FORCE_QUIT_AFTER_S = 3.0


@contextlib.contextmanager
def _ctrl_c_once():
    """The first Ctrl-C raises KeyboardInterrupt; more in the next seconds are ignored, so that they cannot cut
    the clean-up short (a ranker half-freed by a second interrupt crashed at exit). One after that kills."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    first: list[float] = []

    def on_sigint(signum: int, frame: Any) -> None:
        if not first:
            first.append(time.monotonic())
            raise KeyboardInterrupt
        if time.monotonic() - first[0] >= _FORCE_QUIT_AFTER_S:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        # After a Ctrl-C the process is on its way out: later ones are ignored until it is gone. SIG_IGN, not a
        # Python handler, which the interpreter's shutdown would reset to the default (killed by the signal).
        signal.signal(signal.SIGINT, signal.SIG_IGN if first else before)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except RarEdgeError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print("rar-edge: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `rar-edge classify ... | head -1`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:  # an output path that is a folder, a read-only location, a full disk
        where = f"{e.filename}: " if e.filename else ""
        return _fail(f"{where}{e.strerror or e}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
