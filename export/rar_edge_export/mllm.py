"""MLLM -> GGUF (+ mmproj) + quantization, for the ranker (`rar_edge.rank.ranker`).

``export_mllm(src, out_dir)`` accepts

* a local Hugging Face folder (or a hub id, when ``huggingface_hub`` and a network are available) of a
  vision-language model. The language model and the vision projector are converted with llama.cpp's own
  converters, taken from the llama-cpp-python source package of the same version as the installed
  ``llama_cpp`` (see `llama_cpp_source`): ``convert_hf_to_gguf.py`` (and ``--mmproj``) for SmolVLM /
  Idefics3, Qwen2-VL, Qwen2.5-VL and Gemma 3; for LLaVA-1.5 (``model_type`` ``"llava"`` with a CLIP
  tower), whose projector the modern converter rejects, the vision tower and projector are split out the way
  ``llava_surgery_v2.py`` does and converted by the legacy ``convert_image_encoder_to_gguf.py``. A plain
  causal LM folder gives a text-only model. The language model is then quantized with
  ``llama_cpp.llama_model_quantize``; the mmproj stays F16 (quantizing it costs accuracy for little size).
* an existing GGUF language model (and optionally ``mmproj=`` an mmproj GGUF): checked with
  ``gguf.GGUFReader`` (architecture, chat template, that the mmproj is a ``clip`` GGUF) and placed in the
  folder as a *hard link* (no second gigabyte on disk; the manifest needs the files inside the folder, so
  symlinks are not used). Pass ``copy=True`` to copy instead, e.g. across file systems.

The folder gets a ``manifest.json`` of kind ``"mllm"``, whose fields are documented in `rar_edge.rank.ranker`.
torch and transformers are imported only inside the functions that need them, and the converters run in a
subprocess (they put their own ``gguf-py`` first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Mapping

from rar_edge.errors import ExportError, MissingDependencyError
from rar_edge.manifest import Manifest, load_manifest, write_manifest
from rar_edge.rank.prompts import RANKING_PROMPT_V1

from ._common import atomic_output_dir, exporter_id, looks_like_path

__all__ = [
    "QUANTS",
    "add_subcommand",
    "export_mllm",
    "gguf_summary",
    "llama_cpp_source",
]

logger = logging.getLogger("rar_edge")
SDIST_DOWNLOAD_TIMEOUT_S = 300
#: pip's per-connection timeout and retries for that download: an unreachable index fails in about half a
#: minute (pip's own defaults, 15 s x 5 retries with back-off, or a configured 180 s, read as minutes of silence).
SDIST_INDEX_TIMEOUT_S = 15
SDIST_INDEX_RETRIES = 1

DEFAULT_LLAMA_CPP_PYTHON = "0.3.36"
# llama_ftype values (llama.h) for the quantizations offered.
QUANTS: Mapping[str, int] = {"F16": 1, "Q8_0": 7, "Q4_K_M": 15}
# Families the modern converter handles with --mmproj, by config.json model_type.
_MMPROJ_FAMILIES = {
    "idefics3": "MTMDChatHandler",
    "smolvlm": "MTMDChatHandler",
    "qwen2_vl": "Qwen25VLChatHandler",
    "qwen2_5_vl": "Qwen25VLChatHandler",
    "gemma3": "MTMDChatHandler",
}
_SRC_MEMBERS = (
    "vendor/llama.cpp/convert_hf_to_gguf.py",
    "vendor/llama.cpp/conversion/",
    "vendor/llama.cpp/gguf-py/gguf/",
    "vendor/llama.cpp/models/ggml-vocab-gpt-2.gguf",  # the tiny test models' tokenizer
    "vendor/llama.cpp/tools/mtmd/legacy-models/",
)


# ------------------------------------------------------------------------------------------------------
# llama.cpp's converter scripts
# ------------------------------------------------------------------------------------------------------


def _installed_llama_cpp_version() -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("llama-cpp-python")
    except PackageNotFoundError:
        return None


def llama_cpp_source(
    *,
    version: str | None = None,
    sdist: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> Path:
    """The folder of llama.cpp's converter scripts (``convert_hf_to_gguf.py``, ``gguf-py``, ...).

    Looks in this order: ``$RAR_EDGE_LLAMA_CPP_SRC`` (a llama.cpp checkout); the cache
    ``<cache_dir>/<version>/vendor/llama.cpp`` (default cache ``~/.cache/rar_edge/llama_cpp_src``); else
    extracts the needed files from the llama-cpp-python source package: ``sdist`` (a ``.tar.gz`` or a
    folder holding it), ``$RAR_EDGE_LLAMA_CPP_SDIST``, or ``pip download`` of it when ``download``.

    Args:
        version: the llama-cpp-python version; default: the installed one, else 0.3.36.
        sdist: a source package file or a folder with one.
        cache_dir: where extracted sources are kept.
        download: allow ``pip download --no-deps --no-binary :all: llama-cpp-python==<version>``.

    Raises:
        ExportError: no source found and downloading is off or failed.
    """
    env_src = os.environ.get("RAR_EDGE_LLAMA_CPP_SRC")
    if env_src:
        p = Path(env_src)
        if (p / "convert_hf_to_gguf.py").is_file():
            return p
        raise ExportError(f"$RAR_EDGE_LLAMA_CPP_SRC={env_src} has no convert_hf_to_gguf.py")
    version = version or _installed_llama_cpp_version() or DEFAULT_LLAMA_CPP_PYTHON
    cache = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "rar_edge" / "llama_cpp_src"
    root = cache / version / "vendor" / "llama.cpp"
    if (root / "convert_hf_to_gguf.py").is_file():
        return root

    sdist = sdist or os.environ.get("RAR_EDGE_LLAMA_CPP_SDIST")
    name = f"llama_cpp_python-{version}.tar.gz"
    tgz: Path | None = None
    tmp_dl = None
    if sdist is not None:
        p = Path(sdist)
        tgz = p / name if p.is_dir() else p
        if not tgz.is_file():
            raise ExportError(f"llama-cpp-python source package not found: {tgz}")
    elif download:
        tmp_dl = tempfile.mkdtemp(prefix="rar_edge_sdist_")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--timeout",
            str(SDIST_INDEX_TIMEOUT_S),
            "--retries",
            str(SDIST_INDEX_RETRIES),
            f"llama-cpp-python=={version}",
            "-d",
            tmp_dl,
        ]
        logger.warning(
            "downloading the llama-cpp-python==%s sources (about 77 MB) from the package index for "
            "llama.cpp's converters (skip with --sdist DIR or $RAR_EDGE_LLAMA_CPP_SDIST)",
            version,
        )
        hint = (
            f"pass --sdist DIR holding llama_cpp_python-{version}.tar.gz (on a machine with network: "
            f"pip download --no-deps --no-binary :all: llama-cpp-python=={version} -d DIR)"
        )
        try:
            # pip's own progress goes to our stderr (stdout stays for results); its errors are kept for the message
            try:
                progress_to = sys.stderr.fileno()
            except (AttributeError, OSError, ValueError):  # a stderr without a file (captured): no progress
                progress_to = subprocess.DEVNULL
            proc = subprocess.run(
                cmd, stdout=progress_to, stderr=subprocess.PIPE, text=True, timeout=SDIST_DOWNLOAD_TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            shutil.rmtree(tmp_dl, ignore_errors=True)
            raise ExportError(
                f"downloading llama-cpp-python=={version} sources took over "
                f"{SDIST_DOWNLOAD_TIMEOUT_S} s (no network?); {hint}"
            ) from None
        tgz = Path(tmp_dl) / name
        if proc.returncode != 0 or not tgz.is_file():
            shutil.rmtree(tmp_dl, ignore_errors=True)
            last = " ".join(proc.stderr.strip().splitlines()[-2:])[-500:]
            raise ExportError(
                f"could not download llama-cpp-python=={version} sources from the package index "
                f"(unreachable?): {last}; {hint}"
            )
    else:
        raise ExportError(
            "llama.cpp's converter scripts are needed: pass sdist=, set $RAR_EDGE_LLAMA_CPP_SDIST, or allow download"
        )
    try:
        _extract_sources(tgz, cache / version, f"llama_cpp_python-{version}/")
    finally:
        if tmp_dl is not None:
            shutil.rmtree(tmp_dl, ignore_errors=True)
    return root


def _extract_sources(tgz: Path, dest: Path, top: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest.parent))
    try:
        with tarfile.open(tgz, "r:gz") as tf:
            members = []
            for m in tf:
                if not m.name.startswith(top):
                    continue
                rel = m.name[len(top) :]
                if (m.isfile() or m.isdir()) and any(rel.startswith(p) for p in _SRC_MEMBERS):
                    m.name = rel
                    members.append(m)
            if hasattr(tarfile, "data_filter"):
                tf.extractall(tmp, members=members, filter="data")
            else:  # Python < 3.10.12 / 3.11.4: the names were checked against _SRC_MEMBERS above
                tf.extractall(tmp, members=members)
        if not (tmp / "vendor/llama.cpp/convert_hf_to_gguf.py").is_file():
            raise ExportError(f"{tgz} does not contain vendor/llama.cpp/convert_hf_to_gguf.py")
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / "vendor/llama.cpp/convert_hf_to_gguf.py").is_file():  # lost a race: fine if complete
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(*jobs: tuple[list[str], str, Path | None]) -> None:
    """Runs converter commands ``(cmd, what, gguf_py)`` side by side; raises if any fails.

    The text and vision conversions are independent and each spends seconds importing torch, so they
    run concurrently.
    """
    env = dict(os.environ)
    env.setdefault("USE_TF", "0")  # transformers would otherwise import TensorFlow when it is installed
    env.setdefault("USE_FLAX", "0")
    procs = []
    failures = []
    try:
        for cmd, what, gguf_py in jobs:
            logger.info("%s: %s", what, " ".join(cmd))
            job_env = dict(env)
            if gguf_py is not None:  # the legacy converter does `from gguf import *` without adding gguf-py
                job_env["PYTHONPATH"] = str(gguf_py) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            log = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")  # a pipe could fill and stall
            procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=job_env), what, log))
        for proc, what, log in procs:
            if proc.wait() != 0:
                log.seek(0)
                tail = "\n".join(log.read().splitlines()[-25:])
                failures.append(f"{what} failed (exit {proc.returncode}):\n{tail}")
    finally:
        for proc, _, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    if failures:
        raise ExportError("\n".join(failures))


# ------------------------------------------------------------------------------------------------------
# GGUF inspection
# ------------------------------------------------------------------------------------------------------


def gguf_summary(path: str | os.PathLike) -> dict[str, Any]:
    """The GGUF metadata the manifest needs: architecture, chat template, context length, vision settings.

    Raises:
        ExportError: not a readable GGUF.
    """
    try:
        import gguf
    except ImportError as e:
        raise MissingDependencyError("gguf", "export", "Reading GGUF files") from e
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - any parse error means "not a GGUF"
        raise ExportError(f"{path} is not a readable GGUF file: {e}") from e

    def get(key: str) -> Any:
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    arch = get("general.architecture")
    if not isinstance(arch, str):
        raise ExportError(f"{path} has no general.architecture: not a llama.cpp GGUF")
    out: dict[str, Any] = {
        "architecture": arch,
        "name": get("general.name"),
        "chat_template": get("tokenizer.chat_template"),
        "context_length": get(f"{arch}.context_length"),
        "file_type": get("general.file_type"),
    }
    if arch == "clip":
        ptype = get("clip.projector_type") or get("clip.vision.projector_type")
        if ptype is None and get("clip.has_llava_projector"):
            ptype = "mlp"
        out["vision"] = {
            "projector_type": ptype,
            "image_size_px": get("clip.vision.image_size"),
            "patch_size_px": get("clip.vision.patch_size"),
            "has_vision_encoder": bool(get("clip.has_vision_encoder")),
        }
    return out


def _handler_for(vision: Mapping[str, Any] | None, chat_template: str | None) -> str | None:
    if vision is None:
        return None
    ptype = str(vision.get("projector_type") or "")
    if ptype in ("mlp", "ldp", "ldpv2", "mlp_norm"):
        return "Llava15ChatHandler"
    if ptype.startswith("qwen2"):
        return "Qwen25VLChatHandler"
    return "MTMDChatHandler" if chat_template else "Llava15ChatHandler"


# ------------------------------------------------------------------------------------------------------
# conversion
# ------------------------------------------------------------------------------------------------------


def _quantize(src: Path, dst: Path, quant: str, n_threads: int | None) -> None:
    try:
        import llama_cpp
    except ImportError as e:
        raise MissingDependencyError("llama-cpp-python", "llm", "Quantizing a GGUF") from e
    from rar_edge.rank._llama import _install_log_callback

    _install_log_callback(llama_cpp, None)  # llama.cpp's per-tensor report goes to logging, not stderr
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTS[quant]
    params.nthread = n_threads or 0
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        raise ExportError(f"llama_model_quantize to {quant} failed (code {rc}) for {src}")


def _load_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"cannot read {folder / 'config.json'}: {e}") from e


def _resolve_hf(src: str) -> Path:
    p = Path(src)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ExportError(f"{p} is not a Hugging Face model folder (no config.json)")
        return p
    if p.suffix == ".gguf" or p.exists():
        raise ExportError(f"{src} is neither a folder with config.json nor a GGUF file")
    if looks_like_path(src):
        raise ExportError(f"model folder {src} does not exist")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise MissingDependencyError("huggingface_hub", "export", f"Downloading {src!r} from the hub") from e
    try:
        return Path(
            snapshot_download(repo_id=src, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
        )
    except Exception as e:  # noqa: BLE001 - network, auth, missing repo: all end the export
        raise ExportError(f"could not fetch {src!r} from the Hugging Face hub: {e}") from e


def _hf_text_job(src: Path, out: Path, lcpp: Path) -> tuple[list[str], str, None]:
    cmd = [sys.executable, str(lcpp / "convert_hf_to_gguf.py"), str(src), "--outfile", str(out), "--outtype", "f16"]
    return cmd, "convert_hf_to_gguf.py (language model)", None


def _hf_mmproj_job(src: Path, out: Path, lcpp: Path) -> tuple[list[str], str, None]:
    cmd = [
        sys.executable,
        str(lcpp / "convert_hf_to_gguf.py"),
        str(src),
        "--mmproj",
        "--outfile",
        str(out),
        "--outtype",
        "f16",
    ]
    return cmd, "convert_hf_to_gguf.py --mmproj", None


def _llava15_mmproj_job(src: Path, config: Mapping[str, Any], lcpp: Path, work: Path) -> tuple[list[str], str, Path]:
    """LLaVA-1.5 (transformers format): splits the CLIP tower and the projector out of the checkpoint and
    returns the legacy converter's command, which writes ``work/mm/mmproj-model-f16.gguf``."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    vcfg = dict(config.get("vision_config") or {})
    if vcfg.get("model_type") not in ("clip_vision_model", None):
        raise ExportError(f"LLaVA export supports a CLIP vision tower, not {vcfg.get('model_type')!r}")
    layer = config.get("vision_feature_layer", -2)
    if layer != -2:
        raise ExportError(f"LLaVA export supports vision_feature_layer -2 (LLaVA-1.5), not {layer}")
    tower = work / "vision_tower"
    tower.mkdir()
    vcfg.update({"model_type": "clip_vision_model", "architectures": ["CLIPVisionModel"]})
    (tower / "config.json").write_text(json.dumps(vcfg), encoding="utf-8")
    vision: dict[str, Any] = {}
    projector: dict[str, Any] = {}
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{src} has no .safetensors weights")
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                k = key[len("model.") :] if key.startswith("model.") else key
                if k.startswith("vision_tower."):
                    vision[k[len("vision_tower.") :]] = sf.get_tensor(key).float().contiguous()
                elif k.startswith("multi_modal_projector."):
                    projector[k] = sf.get_tensor(key).float().contiguous()
    if not vision or not projector:
        raise ExportError(f"{src}: found no vision_tower.* or multi_modal_projector.* weights")
    save_file(vision, str(tower / "model.safetensors"))
    torch.save(projector, str(work / "llava.projector"))
    cmd = [
        sys.executable,
        str(lcpp / "tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py"),
        "-m",
        str(tower),
        "--llava-projector",
        str(work / "llava.projector"),
        "--output-dir",
        str(work / "mm"),
        "--clip-model-is-vision",
    ]
    pre = src / "preprocessor_config.json"
    if pre.is_file():
        pc = json.loads(pre.read_text(encoding="utf-8"))
        if "image_mean" in pc and "image_std" in pc:
            cmd += ["--image-mean", *map(str, pc["image_mean"]), "--image-std", *map(str, pc["image_std"])]
    return cmd, "convert_image_encoder_to_gguf.py (LLaVA projector)", lcpp / "gguf-py"


def _place(src: Path, dst: Path, *, copy: bool) -> None:
    if copy:
        shutil.copyfile(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError as e:
        raise ExportError(f"cannot hard-link {src} into {dst.parent} ({e}); pass copy=True (--copy) to copy it") from e


def export_mllm(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    quant: str = "Q4_K_M",
    mmproj: str | os.PathLike | None = None,
    overwrite: bool = False,
    copy: bool = False,
    name: str | None = None,
    llama_cpp_src: str | os.PathLike | None = None,
    n_threads: int | None = None,
) -> Manifest:
    """Writes a ranker model folder (GGUF language model, optional mmproj GGUF, manifest).

    Args:
        src: a Hugging Face folder or hub id of a (vision-)language model, or a GGUF language model.
        out_dir: the model folder to write.
        quant: ``"Q4_K_M"``, ``"Q8_0"`` or ``"F16"`` for a converted language model. A GGUF ``src`` is
            kept as it is (its own quantization is recorded).
        mmproj: with a GGUF ``src``: its vision projector GGUF.
        overwrite: replace an existing non-empty ``out_dir``.
        copy: with a GGUF ``src``: copy the files instead of hard-linking them.
        name: the model name recorded in the manifest (default: from the source).
        llama_cpp_src: llama.cpp's converter folder; default: `llama_cpp_source()`.
        n_threads: threads for quantization (default: all).

    Returns:
        The written `Manifest` (kind ``"mllm"``).

    Raises:
        ExportError: unsupported model, a converter failed, or ``out_dir`` exists and not ``overwrite``.
    """
    if quant not in QUANTS:
        raise ExportError(f"quant must be one of {sorted(QUANTS)}, not {quant!r}")
    out = Path(out_dir)
    # a folder beside out_dir (umask permissions) that replaces it only once complete
    with atomic_output_dir(out, overwrite=overwrite) as work:
        src_str = str(src)
        if src_str.endswith(".gguf") and Path(src_str).is_file():
            data, files, default_name = _from_gguf(
                Path(src_str), None if mmproj is None else Path(mmproj), work, copy=copy
            )
            data["source"] = str(Path(src_str).resolve())
        else:
            if mmproj is not None:
                raise ExportError("mmproj= is only for a GGUF source; a Hugging Face model brings its own")
            folder = _resolve_hf(src_str)
            lcpp = Path(llama_cpp_src) if llama_cpp_src is not None else llama_cpp_source()
            data, files, default_name = _from_hf(folder, work, quant=quant, lcpp=lcpp, n_threads=n_threads)
            data["source"] = src_str
        data["name"] = name or default_name
        write_manifest(work, data, files=files)
    return load_manifest(out, verify=False)


def _manifest_data(lm: Mapping[str, Any], mm: Mapping[str, Any] | None, quant: str | None) -> dict[str, Any]:
    vision = None if mm is None else dict(mm["vision"])
    ctx_train = lm.get("context_length")
    n_ctx = 4096 if vision is not None else 2048
    if isinstance(ctx_train, int) and ctx_train > 0:
        n_ctx = min(n_ctx, ctx_train)
    return {
        "kind": "mllm",
        "exporter": exporter_id(),
        "architecture": lm["architecture"],
        "vision": vision,
        "chat_template": lm.get("chat_template"),
        "chat_handler": _handler_for(vision, lm.get("chat_template")),
        "quantization": quant,
        "n_ctx": n_ctx,
        "prompt_version": RANKING_PROMPT_V1.version,
        "llama_cpp_python": _installed_llama_cpp_version(),
    }


_FILE_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    32: "BF16",
}


def _from_gguf(
    lm_src: Path, mm_src: Path | None, work: Path, *, copy: bool
) -> tuple[dict[str, Any], dict[str, str], str]:
    lm = gguf_summary(lm_src)
    if lm["architecture"] == "clip":
        raise ExportError(f"{lm_src} is a vision projector (mmproj), not a language model")
    if not lm.get("chat_template"):
        logger.warning("%s has no tokenizer.chat_template: the ranker will use a plain-text prompt", lm_src)
    mm = None
    files = {"language_model": lm_src.name}
    _place(lm_src, work / lm_src.name, copy=copy)
    if mm_src is not None:
        mm = gguf_summary(mm_src)
        if mm["architecture"] != "clip" or not mm["vision"]["has_vision_encoder"]:
            raise ExportError(f"{mm_src} is not an mmproj GGUF with a vision encoder")
        mm_name = mm_src.name if mm_src.name != lm_src.name else "mmproj-" + mm_src.name
        _place(mm_src, work / mm_name, copy=copy)
        files["mmproj"] = mm_name
    ft = lm.get("file_type")
    quant = _FILE_TYPES.get(ft, str(ft) if ft is not None else None)
    return _manifest_data(lm, mm, quant), files, lm.get("name") or lm_src.stem


def _from_hf(
    folder: Path, work: Path, *, quant: str, lcpp: Path, n_threads: int | None
) -> tuple[dict[str, Any], dict[str, str], str]:
    config = _load_config(folder)
    model_type = config.get("model_type")
    if "vision_config" in config and model_type != "llava" and model_type not in _MMPROJ_FAMILIES:
        raise ExportError(
            f"model_type {model_type!r} has a vision tower this exporter does not know; supported: "
            f"llava (1.5), {', '.join(sorted(_MMPROJ_FAMILIES))}"
        )
    f16 = work / "model-F16.gguf"
    files: dict[str, str] = {}
    mm = None
    mm_path = None
    jobs = [_hf_text_job(folder, f16, lcpp)]
    scratch = work / "_llava"
    if model_type == "llava":
        mm_path = work / "mmproj-F16.gguf"
        scratch.mkdir()
        jobs.append(_llava15_mmproj_job(folder, config, lcpp, scratch))
    elif model_type in _MMPROJ_FAMILIES:
        mm_path = work / "mmproj-F16.gguf"
        jobs.append(_hf_mmproj_job(folder, mm_path, lcpp))
    _run(*jobs)
    if model_type == "llava":
        produced = list((scratch / "mm").glob("mmproj-*.gguf"))
        if len(produced) != 1:
            raise ExportError(f"the legacy converter wrote {produced}, expected one mmproj-*.gguf")
        shutil.move(str(produced[0]), str(mm_path))
        shutil.rmtree(scratch)
    if mm_path is not None:
        mm = gguf_summary(mm_path)
        files["mmproj"] = mm_path.name
    if quant == "F16":
        lm_path = f16
    else:
        lm_path = work / f"model-{quant}.gguf"
        _quantize(f16, lm_path, quant, n_threads)
        f16.unlink()
    files["language_model"] = lm_path.name
    lm = gguf_summary(lm_path)
    return _manifest_data(lm, mm, quant), files, config.get("_name_or_path") or folder.name


# ------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------


def add_subcommand(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers ``mllm SRC -o DIR [--quant Q] [--mmproj F] [--copy] [--overwrite]``."""
    p = subparsers.add_parser(
        "mllm",
        help="export a (vision-)language model to GGUF (+ mmproj) for the ranker",
        description="Convert a Hugging Face VLM (SmolVLM/Idefics3, Qwen2-VL, Qwen2.5-VL, Gemma 3, LLaVA-1.5) "
        "or take an existing GGUF (+ mmproj), and write a ranker model folder with a manifest.",
    )
    p.add_argument("src", help="Hugging Face folder or id, or a .gguf language model")
    p.add_argument("-o", "--out", required=True, help="output model folder")
    p.add_argument(
        "--quant",
        choices=sorted(QUANTS),
        default=None,
        help="language model quantization of a converted model (default Q4_K_M); a .gguf SRC keeps its own",
    )
    p.add_argument("--mmproj", default=None, help="mmproj GGUF, with a .gguf SRC")
    p.add_argument("--copy", action="store_true", help="copy a GGUF SRC instead of hard-linking it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--llama-cpp-src", default=None, help="llama.cpp folder with convert_hf_to_gguf.py")
    p.add_argument(
        "--sdist", default=None, help="llama-cpp-python source package (.tar.gz) to take the converters from"
    )
    p.set_defaults(func=_cli)
    return p


def _cli(args: argparse.Namespace) -> int:
    lcpp = args.llama_cpp_src
    # errors (ExportError, MissingDependencyError) go to the command's wrapper, as for clip and tflite
    if args.quant is not None and str(args.src).endswith(".gguf"):
        raise ExportError(
            "--quant applies to a converted Hugging Face model; a .gguf source keeps its own "
            "quantization (quantize it with llama.cpp's llama-quantize first)"
        )
    if lcpp is None and args.sdist is not None and not str(args.src).endswith(".gguf"):
        lcpp = llama_cpp_source(sdist=args.sdist)
    m = export_mllm(
        args.src,
        args.out,
        quant=args.quant or "Q4_K_M",
        mmproj=args.mmproj,
        overwrite=args.overwrite,
        copy=args.copy,
        llama_cpp_src=lcpp,
    )
    print(
        json.dumps(
            {
                "out": str(m.root),
                "files": {k: v["path"] for k, v in m.files.items()},
                "chat_handler": m.data.get("chat_handler"),
            }
        )
    )
    return 0
