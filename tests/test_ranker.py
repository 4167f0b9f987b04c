"""The MLLM ranker on a tiny random llama GGUF (default run) and on the real Qwen2.5-Coder GGUF (slow)."""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rar_edge.errors import InvalidInputError, ManifestError, MissingDependencyError, RankerError
from rar_edge.rank.prompts import RANKING_PROMPT_V1, RankingExample, parse_ranking, render_chat

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'rar-edge[llm]')")

from rar_edge.rank.ranker import Ranker  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QWEN = Path(os.environ.get("RAR_EDGE_QWEN_GGUF", REPO / ".cache/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"))
FLOWERS = ["bluebell", "buttercup", "colts foot", "cowslip", "crocus", "daffodil", "daisy", "dandelion"]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    from rar_edge_export.tiny_models import write_tiny_text_gguf

    return write_tiny_text_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", seed=0)


@pytest.fixture(scope="module")
def ranker(tiny_gguf):
    with Ranker.load(tiny_gguf, n_threads=2, n_ctx=2048) as r:
        yield r


# --- answers are always a permutation of the candidates ---------------------------------------------------

_name = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\n\r\x85\u2028\u2029"),
    min_size=1,
    max_size=12,
).filter(lambda s: s.strip() != "")
_names = st.lists(_name, min_size=1, max_size=6, unique=True)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cands=_names, mode=st.sampled_from(["score", "generate"]))
def test_answer_is_always_a_permutation_of_the_candidates(ranker, cands, mode):
    r = ranker.rank(None, cands, mode=mode)
    assert sorted(r.labels) == sorted(cands)
    assert len(r.scores) == len(cands)
    assert math.isclose(sum(r.scores), 1.0, rel_tol=1e-6)
    assert list(r.scores) == sorted(r.scores, reverse=True)


@pytest.mark.parametrize("mode", ["score", "generate"])
def test_quotes_apostrophes_and_unicode_names(ranker, mode):
    cands = ["bird's-foot trefoil", 'the "best" rose', "lily \\ of the valley", "\u00e9t\u00e9 \u82b1", "'quoted'"]
    r = ranker.rank(None, cands, mode=mode)
    assert sorted(r.labels) == sorted(cands)
    assert not r.fallback
    if mode == "generate":
        assert parse_ranking(r.raw, cands)[0] == list(r.labels)


def test_single_candidate_needs_no_model(ranker):
    before = ranker.stats
    r = ranker.rank(None, ["tulip"])
    assert r.labels == ("tulip",) and r.scores == (1.0,)
    assert r.fallback is False and r.raw == ""  # nothing to fall back from: the one name is the answer
    assert ranker.stats == before


@pytest.mark.parametrize(
    "cands, match",
    [
        (["rose", "tulip", "rose"], "distinct"),
        ([], "empty"),
        (["rose", "two\nlines"], "line break"),
        (["rose", "  "], "empty"),
        (["rose", 3], "str"),
        ("rose", "sequence"),
    ],
)
def test_bad_candidates_raise(ranker, cands, match):
    with pytest.raises(InvalidInputError, match=match):
        ranker.rank(None, cands)


def test_bad_images_and_modes_raise(ranker):
    with pytest.raises(InvalidInputError, match="uint8"):
        ranker.rank(np.zeros((4, 4, 3), np.float32), ["a", "b"])
    with pytest.raises(InvalidInputError, match="shape"):
        ranker.rank(np.zeros((4, 4), np.uint8), ["a", "b"])
    with pytest.raises(InvalidInputError, match="PIL"):
        ranker.rank("photo.jpg", ["a", "b"])
    with pytest.raises(InvalidInputError, match="mode"):
        ranker.rank(None, ["a", "b"], mode="vote")


def test_text_only_model_ignores_an_image_with_one_warning(tiny_gguf, caplog):
    from PIL import Image

    with Ranker.load(tiny_gguf, n_threads=1, n_ctx=1024) as r, caplog.at_level(logging.WARNING, "rar_edge"):
        a = r.rank(Image.new("RGB", (8, 8)), ["a", "b"])
        b = r.rank(np.zeros((3, 5, 3), np.uint8)[:, ::2], ["a", "b"])  # non-contiguous is fine
        c = r.rank(None, ["a", "b"])
        assert not r.has_vision and r.image_size_px == 0  # no vision tower: no larger decode for it
    assert a == b == c
    assert sum("no vision projector" in m for m in caplog.messages) == 1


# --- score mode: batched continuations agree with a plain per-candidate computation ------------------------


def _reference_scores(model_path: Path, ranker: Ranker, cands: list[str]) -> dict[str, float]:
    """Per candidate: evaluate the whole prompt + continuation from scratch in llama-cpp-python's Llama."""
    prefix, query, conts = ranker._prompt_tokens(cands)
    ref = llama_cpp.Llama(str(model_path), n_ctx=2048, logits_all=True, n_threads=2, verbose=False)
    try:
        means = []
        for cont in conts:
            ref.reset()
            toks = prefix + query + cont
            ref.eval(toks)
            logits = np.asarray(ref.scores[: len(toks)], dtype=np.float64)
            start = len(prefix) + len(query)
            lp = 0.0
            for j, t in enumerate(cont):
                row = logits[start + j - 1]
                m = row.max()
                lp += row[t] - (m + math.log(np.exp(row - m).sum()))
            means.append(lp / len(cont))
    finally:
        ref.close()
    means = np.array(means)
    p = np.exp(means - means.max())
    p /= p.sum()
    return dict(zip(cands, p.tolist()))


@pytest.mark.parametrize("max_candidates", [32, 2])
def test_batched_scores_match_per_candidate_reference(tiny_gguf, max_candidates):
    cands = ["tulip", "rose hip", "rose", "bird's-foot trefoil", "sun flower"]
    with Ranker.load(tiny_gguf, n_threads=2, n_ctx=2048, max_candidates=max_candidates) as r:
        got = r.rank(None, cands)
        got_again = r.rank(None, cands)  # the second query reuses the cached prefix
        ref = _reference_scores(tiny_gguf, r, cands)
    assert got == got_again
    # Differences come only from rounding: the F16 KV cache filled in other batch splits (prefix, query,
    # then all continuations together, versus one sequence at a time).
    for label, score in zip(got.labels, got.scores):
        assert score == pytest.approx(ref[label], abs=1e-3), label
    for better, worse in zip(got.labels, got.labels[1:]):
        assert ref[better] > ref[worse] - 2e-3


def test_prefix_is_evaluated_once_and_each_query_in_one_batch(tiny_gguf):
    lists = [["tulip", "rose", "daisy"], ["a", "b", "c", "d", "e"], FLOWERS]
    with Ranker.load(tiny_gguf, n_threads=2, n_ctx=2048) as r:
        n_query = n_cont = 0
        for cands in lists:
            r.rank(None, cands, mode="score")
            _, q, conts = r._prompt_tokens(cands)
            n_query += len(q)
            n_cont += sum(len(c) - 1 for c in conts)  # a continuation's last token is never evaluated
        s = r.stats
        prefix, _, _ = r._prompt_tokens(lists[0])
    assert s.prefix_evals == 1
    assert s.prefix_tokens == len(prefix)
    assert s.queries == 3
    assert s.query_tokens == n_query  # only the per-query part is evaluated per query
    assert s.continuation_tokens == n_cont
    assert s.decode_calls == 1 + 3  # prefix once; per query one call: its tokens and all continuations
    assert s.image_encodes == 0


def test_in_context_examples_live_in_the_cached_prefix(tiny_gguf):
    ex = [
        RankingExample(candidates=("a", "b", "c"), ranked=("b", "a", "c")),
        RankingExample(candidates=("x y", "z"), ranked=("z", "x y")),
    ]
    with (
        Ranker.load(tiny_gguf, n_threads=2) as plain,
        Ranker.load(tiny_gguf, n_threads=2, in_context_examples=ex) as icl,
    ):
        p0 = plain._prompt_tokens(["rose", "tulip"])[0]
        p1 = icl._prompt_tokens(["rose", "tulip"])[0]
        for _ in range(2):
            r = icl.rank(None, ["rose", "tulip", "daisy"], mode="generate")
            assert sorted(r.labels) == ["daisy", "rose", "tulip"]
        assert icl.stats.prefix_evals == 1
        assert icl.stats.prefix_tokens == len(p1) > len(p0)
        assert plain._prompt_tokens(["rose", "tulip"])[1] == icl._prompt_tokens(["rose", "tulip"])[1]


def test_prompt_follows_the_chat_template(tiny_gguf):
    with Ranker.load(tiny_gguf, n_threads=1) as r:
        text = r._prefix_text + r._query_text(["rose", "tulip"], False)
    assert text.startswith("<|im_start|>system\n" + RANKING_PROMPT_V1.system + "<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("Candidate categories:\nrose\ntulip<|im_end|>\n<|im_start|>assistant\n1.")


def test_plain_prompt_without_chat_template(tmp_path):
    from rar_edge_export.tiny_models import write_tiny_text_gguf

    path = write_tiny_text_gguf(tmp_path / "base.gguf", chat_template=None)
    with Ranker.load(path, n_threads=1) as r:
        assert "### Question:" in r._prefix_text and "<|im_start|>" not in r._prefix_text
        assert sorted(r.rank(None, ["a", "b", "c"]).labels) == ["a", "b", "c"]


_ICL = [
    RankingExample(candidates=("a", "b", "c"), ranked=("b", "c", "a")),
    RankingExample(candidates=("x y", "z"), ranked=("z", "x y")),
]


def _icl_user(candidates: str) -> str:
    p = RANKING_PROMPT_V1
    return f"{p.instruction}\n{p.no_image_line}\n{p.candidates_header}\n{candidates}"


@pytest.mark.parametrize("chat", [True, False], ids=["chat-template", "plain"])
def test_in_context_examples_are_rendered_with_their_answers(tmp_path, tiny_gguf, chat):
    """Each example is a user turn listing its candidates in the order shown and an assistant turn holding its
    answer: the ranked order (b, c, a), not the order shown (a, b, c)."""
    from rar_edge_export.tiny_models import write_tiny_text_gguf

    p = RANKING_PROMPT_V1
    path = tiny_gguf if chat else write_tiny_text_gguf(tmp_path / "base.gguf", chat_template=None)
    with Ranker.load(path, n_threads=1, in_context_examples=_ICL) as r:
        text = r._prefix_text + r._query_text(["rose", "tulip"], False)
    ex1, ex2, query = _icl_user("a\nb\nc"), _icl_user("x y\nz"), _icl_user("rose\ntulip")
    if chat:
        want = (
            f"<|im_start|>system\n{p.system}<|im_end|>\n"
            f"<|im_start|>user\n{ex1}<|im_end|>\n<|im_start|>assistant\n1. b\n2. c\n3. a<|im_end|>\n"
            f"<|im_start|>user\n{ex2}<|im_end|>\n<|im_start|>assistant\n1. z\n2. x y<|im_end|>\n"
            f"<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n1."
        )
    else:
        want = (
            f"{p.system}\n\n"
            f"### Question:\n{ex1}\n### Answer:\n1. b\n2. c\n3. a\n\n"
            f"### Question:\n{ex2}\n### Answer:\n1. z\n2. x y\n\n"
            f"### Question:\n{query}\n### Answer:\n1."
        )
    assert text == want


# --- generate mode: constrained greedy lines, repair, fallback ------------------------------------------


def _reference_generate(r: Ranker, cands: list[str]) -> list[str]:
    """Generate mode the slow, obvious way: one token evaluated per llama_decode, the whole logit row read,
    the argmax taken over the next tokens of the lines still possible."""
    n = r._live()
    n_past = r._eval_query(None, cands)
    remaining, order = list(cands), []
    for number in range(1, len(cands)):
        live, pos = r._line_tokens(remaining, number), 0
        while True:
            nexts = sorted({t[pos] for t in live.values()})
            row = n._logit_row(-1)
            tok = max(nexts, key=lambda t: row[t])
            n.decode([(tok, n_past, 0, True)])
            n_past += 1
            live = {c: t for c, t in live.items() if t[pos] == tok}
            pos += 1
            done = [c for c, t in live.items() if len(t) == pos]
            if done:
                break
        order.append(done[0])
        remaining.remove(done[0])
    return order + remaining


@pytest.mark.parametrize(
    "cands",
    [["rose", "rose hip", "primrose", "tulip"], FLOWERS, ["common daisy", "common tansy", "common poppy", "daisy"]],
)
def test_generate_equals_token_by_token_reference_in_fewer_decodes(tiny_gguf, cands):
    with Ranker.load(tiny_gguf, n_threads=1) as r:
        r.rank(None, cands, mode="score")  # evaluates the cached prefix
        calls0, toks0 = r.stats.decode_calls, r.stats.generated_tokens
        out = r.rank(None, cands, mode="generate")
        calls, toks = r.stats.decode_calls - calls0, r.stats.generated_tokens - toks0
        assert list(out.labels) == _reference_generate(r, cands) and not out.fallback
        # Decodes: the query, then one at each point where the remaining lines differ (the tokens that
        # no choice separates ride along); the first choice, if it is the very first token, reads the
        # query's logits. The token-by-token reference needs one decode per token.
        remaining, choices, first_free = list(cands), 0, False
        for number, name in enumerate(out.labels[:-1], start=1):
            live = r._line_tokens(remaining, number)
            for pos, tok in enumerate(live[name]):
                if len({t[pos] for t in live.values() if len(t) > pos}) > 1:
                    choices += 1
                    first_free = first_free or (choices == 1 and number == 1 and pos == 0)
                live = {c: t for c, t in live.items() if len(t) > pos and t[pos] == tok}
            remaining.remove(name)
    assert calls == 1 + choices - first_free
    assert calls - 1 < toks / 2  # the reference: one decode per token
    lines = out.raw.splitlines()
    assert [ln.split(". ", 1)[1] for ln in lines] == list(out.labels)  # no repair was needed
    assert [ln.split(". ", 1)[0] for ln in lines] == [str(i) for i in range(1, len(cands) + 1)]


def test_generate_falls_back_to_retrieval_order(tiny_gguf, monkeypatch):
    cands = ["tulip", "rose", "daisy"]
    with Ranker.load(tiny_gguf, n_threads=1) as r:
        # Lines that cannot be told apart (a tokenizer that maps two names to one sequence)
        monkeypatch.setattr(Ranker, "_line_tokens", lambda self, names, number: {c: [5, 6] for c in names})
        out = r.rank(None, cands, mode="generate")
        assert out.fallback and out.labels == tuple(cands)
        assert out.scores == pytest.approx((6 / 11, 3 / 11, 2 / 11)) and isinstance(out.raw, str)  # 1/rank, normalised
        monkeypatch.undo()
        assert not r.rank(None, cands, mode="generate").fallback


@pytest.mark.parametrize(
    "raw, want, repaired",
    [
        ("1. b\n2. a\n3. c", ["b", "a", "c"], False),
        ("1. 'b'\n2. \"a\"\n3. C.", ["b", "a", "c"], False),
        ("1. b\n2. b\n3. a", ["b", "a", "c"], True),  # duplicate dropped, missing appended in retrieval order
        ("1. c", ["c", "a", "b"], True),
        ("['c', \"bird's eye\", 'a']", ["c", "bird's eye", "a", "b"], True),
        ("The answer is bird's eye, then a.", ["bird's eye", "a", "b", "c"], True),
        ("nothing useful", [], True),
    ],
)
def test_parse_ranking_repairs(raw, want, repaired):
    cands = ["a", "b", "c"] + (["bird's eye"] if "bird" in raw else [])
    got, rep = parse_ranking(raw, cands)
    assert got == want and rep == repaired


def test_parse_prefers_longest_name_and_word_boundaries():
    got, _ = parse_ranking("rose hip, rose, primrose", ["rose", "rose hip", "primrose"])
    assert got == ["rose hip", "rose", "primrose"]


# --- lifecycle and loading -----------------------------------------------------------------------------


def test_close_is_idempotent_and_closed_ranker_raises(tiny_gguf):
    r = Ranker.load(tiny_gguf, n_threads=1)
    r.close()
    r.close()
    with pytest.raises(RankerError, match="closed"):
        r.rank(None, ["a", "b"])


def test_load_errors(tmp_path, tiny_gguf):
    with pytest.raises(InvalidInputError, match="no model"):
        Ranker.load(tmp_path / "missing.gguf")
    with pytest.raises(ManifestError):
        Ranker.load(tmp_path)  # a folder without manifest.json
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(RankerError, match="not a GGUF file"):
        Ranker.load(bad)
    with pytest.raises(InvalidInputError, match="mode"):
        Ranker.load(tiny_gguf, mode="vote")
    with pytest.raises(RankerError, match="KV cache is full|n_ctx"):
        with Ranker.load(tiny_gguf, n_ctx=64) as r:
            r.rank(None, ["a", "b"])


def test_missing_llama_cpp_names_the_extra(monkeypatch):
    import rar_edge.rank._llama as rk

    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(MissingDependencyError, match=r"rar-edge\[llm\]"):
        rk._import_llama_cpp()


def test_loads_from_an_exported_model_folder(tmp_path, tiny_gguf):
    from rar_edge_export.mllm import export_mllm

    m = export_mllm(tiny_gguf, tmp_path / "model")
    with Ranker.load(m.root, verify=True) as r:
        assert r.prompt_version == "rar-rank-v1" and not r.has_vision
        assert sorted(r.rank(None, ["a", "b"]).labels) == ["a", "b"]


def test_render_chat_reports_template_errors():
    with pytest.raises(RankerError, match="chat template"):
        render_chat("{{ raise_exception('no system role') }}", [{"role": "user", "content": "x"}])


# --- the real model -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_qwen_ranks_sensibly_in_both_modes():
    if not QWEN.is_file():
        pytest.skip(f"{QWEN} is absent: run tools/fetch_llm.sh --model")
    cands = ["bus", "sunflower", "daffodil", "tiger lily", "keyboard"]
    with Ranker.load(QWEN, n_ctx=2048) as r:
        for mode in ("score", "generate"):
            out = r.rank(None, cands, mode=mode)
            assert sorted(out.labels) == sorted(cands) and not out.fallback
        assert r.stats.prefix_evals == 1


# --- found in review: limits, threads, names that differ only in spaces or punctuation ----------------------


def test_a_small_context_caps_the_batch_instead_of_aborting(tiny_gguf):
    """n_ctx=384: llama.cpp pads the context to 512 cells but caps its batch at 384 tokens, and every decode
    call must stay within that (a 400-token prompt chunk used to abort the whole process on a GGML_ASSERT,
    hence the subprocess)."""
    import subprocess

    code = (
        f"from rar_edge.rank.ranker import Ranker\n"
        f"with Ranker.load({str(tiny_gguf)!r}, n_threads=2, n_ctx=384) as r:\n"
        f"    for mode in ('score', 'generate'):\n"
        f"        print(sorted(r.rank(None, ['a', 'b', 'c'], mode=mode).labels))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["['a', 'b', 'c']"] * 2


def test_names_that_differ_in_spaces_or_punctuation_are_ranked_in_generate_mode(ranker):
    for cands in (["rose", "rose "], ["rose", "rose."], ["rose", "(rose)"], ["1", "1."], ["rose", "rose\u00a0"]):
        out = ranker.rank(None, cands, mode="generate")
        assert not out.fallback and sorted(out.labels) == sorted(cands), cands


def test_threads_sharing_one_ranker_take_turns(ranker):
    import threading

    lists = [["tulip", "rose", "daisy", "iris"], ["a b", "c", "d e f"], ["red", "green", "blue", "cyan", "pink"]]
    want = [ranker.rank(None, c) for c in lists]
    got: list = [None] * 12
    errors: list = []

    def work(i):
        try:
            got[i] = ranker.rank(None, lists[i % 3])
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and [g.labels for g in got] == [want[i % 3].labels for i in range(12)]


def test_more_candidates_than_slots_reuse_them_cleanly(tiny_gguf):
    """Groups of candidates share the slots: a larger earlier group's cells must not stay behind and fill the
    KV cache for a later, longer name."""
    cands = ["a1", "a2", "a3", "a4", "s"] + ["m%d " % i + "word " * 12 for i in range(3)] + ["long " * 36]
    with Ranker.load(tiny_gguf, n_threads=1, n_ctx=1024, max_candidates=4) as r:  # fits; was "KV cache is full"
        assert sorted(r.rank(None, cands).labels) == sorted(cands)


def test_clear_slots_leaves_no_cell_in_any_slot(tiny_gguf):
    """Only the slots noted as written are cleared: after a ranking (several groups) and after a decode that
    stopped part-way, every sequence above 0 must be empty once `clear_slots` has run."""
    cands = ["a1", "a2", "a3", "a4", "s"] + ["m%d " % i + "word " * 12 for i in range(3)]

    def slots_in_use(n) -> list[int]:
        return [s for s in range(1, n.n_seq_max) if n.lc.llama_memory_seq_pos_max(n.mem, s) >= 0]

    with Ranker.load(tiny_gguf, n_threads=1, n_ctx=2048, max_candidates=4) as r:
        r.rank(None, cands, mode="score")
        n = r._live()
        assert slots_in_use(n)  # the last group's continuations are still there
        n.clear_slots()
        assert slots_in_use(n) == [] and not n._slots_used
        lc = n.lc

        class FailSecondDecode:  # the first chunk lands in slots 1-3, the second fails
            calls = 0

            def __getattr__(self, name):
                return getattr(lc, name)

            def llama_decode(self, ctx, batch):
                FailSecondDecode.calls += 1
                return lc.llama_decode(ctx, batch) if FailSecondDecode.calls == 1 else -1

        n.lc = FailSecondDecode()
        try:
            with pytest.raises(RankerError):
                n.decode([(1, i, (1, 2, 3), False) for i in range(n.n_batch + 1)])
        finally:
            n.lc = lc
        assert slots_in_use(n) == [1, 2, 3]
        n.clear_slots()
        assert slots_in_use(n) == []
        assert sorted(r.rank(None, cands[:4]).labels) == sorted(cands[:4])


def test_load_refuses_impossible_settings(tiny_gguf):
    with pytest.raises(InvalidInputError, match=r"\[1, 255\]"):
        Ranker.load(tiny_gguf, max_candidates=256)
    with pytest.raises(InvalidInputError, match="n_ctx must be"):
        Ranker.load(tiny_gguf, n_ctx=-5)
    with pytest.raises(InvalidInputError, match="RankingExample"):
        Ranker.load(tiny_gguf, in_context_examples=[{"candidates": ["a", "b"], "ranked": ["b", "a"]}])


def test_line_breaks_of_every_kind_are_refused_in_names():
    from rar_edge.rank.prompts import validate_candidates

    for bad in ("tulip\n", "a\u2028b", "x\x0by", "end\x85"):
        with pytest.raises(InvalidInputError, match="line break"):
            validate_candidates(["rose", bad])
