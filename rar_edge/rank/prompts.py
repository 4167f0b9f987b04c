"""Versioned prompt templates for the MLLM ranker, and the chat-template renderer.

The ranking instruction follows RAR (arXiv 2403.13805): the model acts as a classification expert and
orders the retrieved candidate categories from the one that best matches the image to the one that matches
it least, listing every category. The wording here is ours. The answer is a numbered list, one category a
line (``1. tulip\\n2. daffodil``), which the score mode, the generate mode's grammar, the in-context examples
and the fine-tuning data (`rar_edge.tools.finetune_data`) all share, so a model fine-tuned on those rows answers in
exactly the format the ranker scores.

A prompt is split in three parts so that the ranker can keep the fixed part in the KV cache:

* the *prefix* (system text, in-context examples, the instruction): identical for every query, evaluated
  once per loaded model;
* the *query* (the image, the candidate list, the opening of the answer ``1.``): evaluated once per query;
* the *continuation* (`` tulip\\n``): one per candidate in score mode, or generated in generate mode.

Templates are immutable and versioned: change the wording by adding ``RANKING_PROMPT_V2`` and keep V1, so a
manifest or a fine-tuned model that names ``"rar-rank-v1"`` keeps meaning the same text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from rar_edge.errors import InvalidInputError, RankerError
from rar_edge.labels import has_line_break

__all__ = [
    "PROMPTS",
    "RANKING_PROMPT_V1",
    "RankingExample",
    "RankingPrompt",
    "get_prompt",
    "render_chat",
    "validate_candidates",
]


@dataclass(frozen=True)
class RankingExample:
    """One solved ranking, used as an in-context example or as a fine-tuning row.

    Attributes:
        candidates: the categories in the order the prompt lists them.
        ranked: the same categories, best first (the true class first).
        image: an optional image path; shown to models that have a vision projector, ignored otherwise.
    """

    candidates: tuple[str, ...]
    ranked: tuple[str, ...]
    image: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "candidates", tuple(self.candidates))
        object.__setattr__(self, "ranked", tuple(self.ranked))
        validate_candidates(self.candidates)
        if sorted(self.ranked) != sorted(self.candidates):
            raise InvalidInputError("an example's 'ranked' must be a permutation of its 'candidates'")


def validate_candidates(candidates: Sequence[str]) -> tuple[str, ...]:
    """Checks a candidate list and returns it as a tuple.

    Raises:
        InvalidInputError: empty list, a non-string or empty name, a name with a line break (the answer
            format is one name a line), or a name given twice.
    """
    if isinstance(candidates, str):
        raise InvalidInputError("candidates must be a sequence of names, not one string")
    out = tuple(candidates)
    if not out:
        raise InvalidInputError("candidates is empty: the ranker needs at least one name")
    for c in out:
        if not isinstance(c, str):
            raise InvalidInputError(f"candidate names must be str, got {type(c).__name__}")
        if not c.strip():
            raise InvalidInputError("a candidate name is empty or only whitespace")
        if has_line_break(c):
            raise InvalidInputError(f"candidate name {c!r} contains a line break")
    if len(set(out)) != len(out):
        dups = sorted({c for c in out if out.count(c) > 1})
        raise InvalidInputError(f"candidate names must be distinct; repeated: {dups}")
    return out


@dataclass(frozen=True)
class RankingPrompt:
    """A versioned ranking prompt.

    Attributes:
        version: the identifier written into manifests and fine-tuning data.
        system: the system message (chat models) or the opening line (plain text).
        instruction: the fixed task description, placed in the cached prefix.
        image_line: the line introducing the image; ``{image}`` is replaced by the media marker.
        candidates_header: the line before the candidate list.
        answer_open: the start of the answer, evaluated with the query (the first list number).
        plain_user / plain_assistant: turn labels used when the model has no chat template.
    """

    version: str
    system: str
    instruction: str
    image_line: str
    no_image_line: str
    candidates_header: str
    answer_open: str = "1."
    plain_user: str = "### Question:\n"
    plain_assistant: str = "### Answer:\n"
    plain_turn_end: str = "\n\n"

    def query_head(self, *, vision: bool) -> str:
        """The start of `query_text` that is the same for every query of a ranker with or without vision.

        The ranker moves it into the cached prefix: for a text-only model everything up to the candidate
        list, for a vision model the text before the image (shared with the no-image line).
        """
        if not vision:
            return self.no_image_line + "\n" + self.candidates_header + "\n"
        before_image = self.image_line.split("{image}")[0]
        n = 0
        while n < min(len(before_image), len(self.no_image_line)) and before_image[n] == self.no_image_line[n]:
            n += 1
        return before_image[:n].rstrip()  # end on a word, so the query's first token is a natural one

    def query_text(self, candidates: Sequence[str], *, image_marker: str | None) -> str:
        """The part of the user turn after the instruction: image, then the candidate list."""
        lines = [self.image_line.format(image=image_marker) if image_marker is not None else self.no_image_line]
        lines.append(self.candidates_header)
        lines.extend(candidates)  # one a line, no bullets: every token here is evaluated per query
        return "\n".join(lines)

    def user_text(self, candidates: Sequence[str], *, image_marker: str | None) -> str:
        """The whole user turn: instruction, image, candidates (as in fine-tuning data)."""
        return self.instruction + "\n" + self.query_text(candidates, image_marker=image_marker)

    @staticmethod
    def answer(ranked: Sequence[str]) -> str:
        """The target answer for a ranking: ``1. a\\n2. b\\n...``."""
        return "\n".join(f"{i}. {name}" for i, name in enumerate(ranked, start=1))

    def continuation(self, name: str, *, last: bool) -> str:
        """What follows `answer_open` when ``name`` is ranked first.

        The name is followed by the line break that the answer format puts after it (or nothing when it is
        the only item), so that a name which is a prefix of another ("rose" / "rose hip") is not favoured.
        """
        return " " + name + ("" if last else "\n")


RANKING_PROMPT_V1 = RankingPrompt(
    version="rar-rank-v1",
    system="You are a careful visual recognition assistant.",
    instruction=(
        "You will see an image and a short list of candidate categories. Act as an expert in "
        "classification: order all of the candidate categories from the one that best matches what the "
        "image shows to the one that matches it least. Use every category exactly once, copy each name "
        "exactly as written, and answer only with the ordered list, numbered from 1, one category per line."
    ),
    image_line="Image: {image}",
    no_image_line="Image: (not shown; judge from the category names alone)",
    candidates_header="Candidate categories:",
)

PROMPTS: Mapping[str, RankingPrompt] = {RANKING_PROMPT_V1.version: RANKING_PROMPT_V1}


def get_prompt(version: str | RankingPrompt) -> RankingPrompt:
    """The prompt for a version string (``"rar-rank-v1"``), or the prompt itself."""
    if isinstance(version, RankingPrompt):
        return version
    try:
        return PROMPTS[version]
    except KeyError:
        raise InvalidInputError(f"unknown prompt version {version!r}; known: {sorted(PROMPTS)}") from None


def render_chat(
    template: str,
    messages: Sequence[Mapping[str, str]],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
) -> str:
    """Renders a Hugging Face / GGUF Jinja chat template (``tokenizer.chat_template``).

    Args:
        template: the Jinja source.
        messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.
        bos_token, eos_token: the strings the template may insert.
        add_generation_prompt: end with the assistant turn's header.

    Raises:
        RankerError: the template does not parse or raises while rendering.
    """
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - jinja2 comes with llama-cpp-python
        from rar_edge.errors import MissingDependencyError

        raise MissingDependencyError("jinja2", "llm", "rendering a chat template") from e

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def strftime_now(fmt: str) -> str:
        # A fixed date keeps prompts (and the cached prefix) reproducible.
        return "26 Nov 2026" if "%d" in fmt else ""

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, loader=jinja2.BaseLoader())
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        return env.from_string(template).render(
            messages=list(messages),
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
        )
    except jinja2.exceptions.TemplateError as e:
        raise RankerError(f"the model's chat template failed to render: {e}") from e


_NUMBERING = re.compile(r"^\s*(?:\d+\s*[.):\]-]|[-*\u2022])\s*")
_QUOTES = "\"'`\u2018\u2019\u201c\u201d\u00ab\u00bb"


def _clean_item(text: str) -> str:
    s = _NUMBERING.sub("", text).strip()
    s = s.strip(" \t,;.")
    s = s.strip("[]()")
    return s.strip()


def parse_ranking(text: str, candidates: Sequence[str]) -> tuple[list[str], bool]:
    """Reads a model's answer back into candidate names.

    Lines are matched first exactly, then without list numbering, bullets, surrounding quotes and case;
    a line that still matches no single name is scanned for every candidate it mentions (longest name
    first), which also reads one-line answers such as ``['tulip', "bird's-foot trefoil"]``.

    Args:
        text: the raw answer.
        candidates: the names offered, in retrieval order.

    Returns:
        (names, repaired): every candidate exactly once, the model's order first, then the names it left
        out in retrieval order; ``repaired`` is True when duplicates or missing names had to be fixed.
        An answer that names no candidate gives ``([], True)``.
    """
    cands = list(candidates)
    by_exact = {c: c for c in cands}
    by_fold = {}
    for c in cands:
        by_fold.setdefault(c.casefold(), c)
        by_fold.setdefault(c.strip(_QUOTES + " ").casefold(), c)

    def match_whole(item: str) -> str | None:
        for variant in (item, item.strip(_QUOTES), item.strip(_QUOTES + " .,;")):
            if variant in by_exact:
                return by_exact[variant]
            if variant.casefold() in by_fold:
                return by_fold[variant.casefold()]
        return None

    longest_first = sorted(cands, key=len, reverse=True)

    def scan(line: str) -> list[str]:
        low = line.casefold()
        taken = [False] * len(low)
        hits: list[tuple[int, str]] = []
        for c in longest_first:
            needle = c.casefold()
            start = 0
            while True:
                i = low.find(needle, start)
                if i < 0:
                    break
                j = i + len(needle)
                before = low[i - 1] if i > 0 else " "
                after = low[j] if j < len(low) else " "
                if not any(taken[i:j]) and not before.isalnum() and not after.isalnum():
                    for t in range(i, j):
                        taken[t] = True
                    hits.append((i, c))
                start = i + 1
        return [c for _, c in sorted(hits)]

    found: list[str] = []
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if not line:
            continue
        hit = match_whole(line) or match_whole(_clean_item(line))
        found.extend([hit] if hit is not None else scan(line))

    seen: set[str] = set()
    ordered = []
    for c in found:
        if c not in seen:
            seen.add(c)
            ordered.append(c)
    if not ordered:
        return [], True
    repaired = len(ordered) != len(found) or len(ordered) != len(cands)
    ordered.extend(c for c in cands if c not in seen)
    return ordered, repaired
