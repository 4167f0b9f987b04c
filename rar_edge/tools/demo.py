"""``rar-edge demo``: RAR end to end on real photos, saying plainly which models it used.

Real where real is available: the ImageNet-pretrained MobileNet v1 from the shared folder for
few-shot image-to-image retrieval on Oxford Flowers; a CLIP from a local folder or the hub when
reachable. Otherwise tiny random-weight models of the real architectures, built through the same
export code a user runs, and the output says that their answers are meaningless.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from rar_edge import defaults

HUB_CLIP = "openai/clip-vit-base-patch32"
MOBILENET = Path("models/mobilenet_v1_embedding/mobilenet_v1_1.0_224_quant_embedding_extractor.tflite")


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def find_shared(explicit: str | None = None) -> Path | None:
    """The shared data folder: ``explicit``, ``$RAR_EDGE_SHARED``, or ``../shared`` beside the checkout."""
    candidates = [
        explicit,
        os.environ.get("RAR_EDGE_SHARED"),
        Path.cwd().parent / "shared",
        Path(__file__).resolve().parents[2] / "shared",
    ]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c).resolve()
    return None


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _export_once(out: Path, make) -> Path:
    from rar_edge.manifest import MANIFEST_NAME

    if not (out / MANIFEST_NAME).is_file():
        make(out)
    return out


def _clip_model(models: Path, clip: str | None) -> tuple[Path, str]:
    """A CLIP model folder and a plain description of what it is."""
    from rar_edge_export import export_clip

    if clip:
        out = models / ("clip_" + Path(clip).name.replace("/", "_"))
        _export_once(out, lambda o: export_clip(clip, o))
        return out, f"CLIP from {clip} (real weights as given)"
    if _hub_reachable():
        try:
            out = models / "clip_vit_b32"
            _export_once(out, lambda o: export_clip(HUB_CLIP, o))
            return out, f"{HUB_CLIP} from the Hugging Face hub (real pretrained weights)"
        except Exception as e:  # noqa: BLE001 - any hub failure falls back, and is said
            _say(f"    could not export {HUB_CLIP} from the hub ({type(e).__name__}: {e}); falling back")
    from rar_edge_export.tiny_clip import build_tiny_clip

    out = models / "tiny_random_clip"
    if not (out / "manifest.json").is_file():
        src = build_tiny_clip(models / "tiny_random_clip_hf")
        export_clip(src, out, overwrite=True)
    return out, (
        "a tiny RANDOM-weight CLIP (real CLIP architecture and tokenizer, no training) built offline "
        "because the hub is unreachable: its zero-shot answers are meaningless"
    )


def _ranker_model(models: Path, ranker: str | None) -> tuple[Any, str]:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None, "none (llama-cpp-python is not installed: pip install 'rar-edge[llm]')"
    from rar_edge.rank.ranker import Ranker

    if ranker:
        return Ranker.load(ranker), f"{ranker} (as given)"
    from rar_edge_export.mllm import export_mllm

    vlm = models / "tiny_random_smolvlm_ranker"
    txt = models / "tiny_random_text_ranker"
    if (vlm / "manifest.json").is_file():
        return Ranker.load(vlm), _TINY_VLM_DESC
    src = _llama_cpp_sources(models)
    if src is not None:
        from rar_edge_export.tiny_models import build_tiny_vlm

        hf = build_tiny_vlm(
            "smolvlm", models / "tiny_random_smolvlm_hf", vocab_gguf=src / "models" / "ggml-vocab-gpt-2.gguf"
        )
        export_mllm(hf, vlm, quant="Q8_0", llama_cpp_src=src, overwrite=True)
        return Ranker.load(vlm), _TINY_VLM_DESC
    if not (txt / "manifest.json").is_file():
        from rar_edge_export.tiny_models import write_tiny_text_gguf

        gguf = write_tiny_text_gguf(models / "tiny_random_llama_f32.gguf", seed=0)
        export_mllm(gguf, txt, quant="Q8_0", overwrite=True)
    return Ranker.load(txt), (
        "a tiny RANDOM-weight text-only llama GGUF exported through `export mllm` (llama.cpp's "
        "converters were not found: run tools/fetch_llm.sh --sdist for the multimodal one); it "
        "shows the ranking machinery, its choices are arbitrary"
    )


_TINY_VLM_DESC = (
    "a tiny RANDOM-weight SmolVLM (Idefics3 architecture: vision tower + projector + language model) "
    "converted to GGUF + mmproj by `export mllm` with llama.cpp's own converters (no pretrained "
    "multimodal GGUF can be downloaded here): it sees the image, but its choices are arbitrary"
)


def _llama_cpp_sources(models: Path) -> Path | None:
    """llama.cpp's converter scripts from the llama-cpp-python source package in .cache/sdist, if present."""
    from rar_edge_export.mllm import llama_cpp_source

    for d in (
        Path(os.environ.get("RAR_EDGE_LLAMA_CPP_SDIST", ".cache/sdist")),
        Path(__file__).resolve().parents[1] / ".cache" / "sdist",
    ):
        if d.exists():
            try:
                return llama_cpp_source(sdist=d, cache_dir=models / "llama_cpp_src", download=False)
            except Exception:  # noqa: BLE001 - no usable sources: the text-only ranker is used, and said
                return None
    return None


def run_demo(
    *,
    workdir: str | os.PathLike = "artifacts/demo",
    shared: str | None = None,
    n_images: int = 8,
    clip: str | None = None,
    ranker: str | None = None,
) -> int:
    """Runs the demo; returns the process exit code."""
    # transformers would import TensorFlow (installed for the TFLite converter): slow and noisy, unused.
    os.environ.setdefault("USE_TF", "0")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from rar_edge.datasets import few_shot_split
    from rar_edge.encoders import Encoder, EncoderConfig
    from rar_edge.index.memory import Memory
    from rar_edge.pipeline import Pipeline, PipelineConfig
    from rar_edge_export import export_tflite

    work = Path(workdir)
    models = work / "models"
    models.mkdir(parents=True, exist_ok=True)
    used: list[str] = []
    shared_dir = find_shared(shared)
    _say("rar_edge demo: retrieve k distinct classes from a memory, then rank them with a small LLM")
    _say(f"  shared data: {shared_dir if shared_dir else 'NOT FOUND (set RAR_EDGE_SHARED)'}")

    # 1. Image encoder for few-shot retrieval.
    t0 = time.perf_counter()
    tflite = shared_dir / MOBILENET if shared_dir else None
    if tflite is not None and tflite.is_file():
        mn_dir = _export_once(models / "mobilenet_v1", lambda o: export_tflite(tflite, o))
        img_enc = Encoder(mn_dir, config=EncoderConfig())
        used.append(
            f"image encoder: MobileNet v1 ImageNet-pretrained embedder (REAL weights) from {tflite}, "
            f"exported to ONNX by `rar-edge export tflite` -> {mn_dir}"
        )
    else:
        img_enc = None
    _say(f"[1/4] image encoder ready ({time.perf_counter() - t0:.1f} s)")

    # 2. CLIP for zero-shot (and as the image encoder when no real embedder exists).
    t0 = time.perf_counter()
    clip_dir, clip_desc = _clip_model(models, clip)
    clip_enc = Encoder(clip_dir)
    used.append(f"CLIP (zero-shot text + image towers): {clip_desc} -> {clip_dir}")
    if img_enc is None:
        img_enc = clip_enc
        used.append("image encoder: the CLIP above (no real image embedder found)")
    _say(f"[2/4] CLIP ready ({time.perf_counter() - t0:.1f} s)")

    # 3. Few-shot memory + retrieval-only classification of held-out photos.
    flowers = shared_dir / "data" / "flowers17" if shared_dir else None
    rk, rk_desc = _ranker_model(models, ranker)
    used.append(f"ranker: {rk_desc}")
    if flowers is not None and flowers.is_dir():
        split = few_shot_split(flowers, shots=4, seed=0)
        t0 = time.perf_counter()
        mem = Memory.from_folder(flowers, encoder=img_enc, shots=4, seed=0)
        mem_path = mem.save(work / "flowers_4shot.rarmem")
        _say(
            f"[3/4] few-shot memory: {mem.size} photos of {len(mem.classes)} flower classes (4 per class, seed 0) "
            f"in {time.perf_counter() - t0:.1f} s -> {mem_path}"
        )
        step = max(1, len(split.queries) // n_images)
        queries = split.queries[::step][:n_images]
        hits = 0
        with Pipeline(memory=mem, encoder=img_enc, config=PipelineConfig(k=defaults.K)) as pipe:
            for path, truth in queries:
                r = pipe.classify(path)
                hits += r.label == truth
                cands = ", ".join(f"{c.label} {c.score:.2f}" for c in r.retrieved)
                _say(
                    f"    {path.parent.name}/{path.name}: {r.label:<12} {'ok ' if r.label == truth else 'MISS'} "
                    f"[{cands}] {r.timings_ms['total']:.1f} ms"
                )
        _say(f"    retrieval-only: {hits}/{len(queries)} correct on these held-out photos")
        if rk is not None:
            with Pipeline(memory=mem, encoder=img_enc, ranker=rk, config=PipelineConfig(k=defaults.K)) as pipe:
                path, truth = queries[0]
                r = pipe.classify(path)
                _say(
                    f"    with the ranker: {path.name}: retrieved {[c.label for c in r.retrieved]} -> ranked "
                    f"{[c.label for c in r.candidates]} (answer '{r.label}' is always a candidate; "
                    f"rank {r.timings_ms.get('rank', 0):.0f} ms)"
                )
    else:
        _say("[3/4] skipped few-shot retrieval: Oxford Flowers not found in the shared folder")

    # 4. Zero-shot memory from class names.
    names = (
        sorted(p.name.replace("_", " ") for p in flowers.iterdir() if p.is_dir())
        if flowers is not None and flowers.is_dir()
        else ["daisy", "sunflower", "tulip", "tabby cat", "airliner"]
    )
    zs = Memory.from_class_names(names, encoder=clip_enc)
    zs.save(work / "zeroshot.rarmem")
    query = split.queries[0][0] if flowers is not None and flowers.is_dir() else None
    if query is not None:
        r = Pipeline(memory=zs, encoder=clip_enc, config=PipelineConfig(k=3)).classify(query)
        _say(
            f"[4/4] zero-shot memory of {len(names)} class names; {query.name} -> {r.label} "
            f"(top 3: {[c.label for c in r.candidates]})"
        )
    else:
        _say(f"[4/4] zero-shot memory of {len(names)} class names built")
    if rk is not None:
        rk.close()
    _say("\nmodels used:")
    for u in used:
        _say(f"  - {u}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_demo())
