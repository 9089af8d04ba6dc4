"""Scoring items without a corpus, and agreement of the judge with human labels.

Items (``selftune judge``) and labels (``selftune calibrate``) are JSONL, one object per line::

    {"question": "...", "answer": "...", "contexts": ["...", "..."], "reference": "...",
     "labels": {"grounded": 4, "concise": "pass"}}

``contexts`` and ``reference`` are optional; ``labels`` (calibrate only) holds, per criterion, a level
on its scale (LLM criteria) or ``pass``/``fail`` (checks, and LLM criteria labelled that way: pass
means the upper half of the scale). Agreement per criterion: Cohen's kappa (quadratic weights on an
ordinal scale, unweighted for pass/fail; on rounded levels) and Spearman's rho (on the unrounded
score), each with a bootstrap 95% interval, and the confusion table (rows: human, columns: judge).

``--feedback`` also takes the (original, edited) answer pairs a person gave (``selftune feedback``):
both answers are judged, and the report says how often the judge prefers the edit (overall and per LLM
criterion; a tie is not agreement).

``--align`` splits the labels by seed: the disagreements of one part become calibration examples for
the LLM criteria; agreement is reported before and after on the other part only. The pairs are split
the same way: each pair of the fit part the judge got wrong on a criterion (the edit not scored above
the original) becomes two examples, the edit at the top of the scale and the original below it.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from .errors import InputError, read_jsonl
from .judge import Judge
from .records import Answer, Chunk, Judgment, Probe
from .reliability import bootstrap_ci, cohen_kappa, confusion, spearman
from .rubric import Example, LLMCriterion, Rubric

PASS = {"pass": 1, "fail": 0, True: 1, False: 0}


def read_items(path: Path, rubric: Rubric | None = None, need_labels: bool = False) -> list[dict[str, Any]]:
    """Validated rows; every problem names the file, the line and the key."""
    if not path.exists():
        raise InputError(path, "", "file not found")
    names = {c.name: c for c in rubric.criteria} if rubric else {}
    rows = []
    for n, row in read_jsonl(path):
        if not isinstance(row, dict):
            raise InputError(path, f"line {n}", "expected a JSON object")
        for key in ("question", "answer"):
            if not isinstance(row.get(key), str):
                raise InputError(path, f"line {n}.{key}", "expected a string")
        ctx = row.get("contexts", [])
        if not isinstance(ctx, list) or not all(isinstance(c, str) for c in ctx):
            raise InputError(path, f"line {n}.contexts", "expected a list of strings")
        if row.get("reference") is not None and not isinstance(row["reference"], str):
            raise InputError(path, f"line {n}.reference", "expected a string or no key")
        labels = row.get("labels")
        if need_labels:
            if not isinstance(labels, dict) or not labels:
                raise InputError(path, f"line {n}.labels", "expected a mapping of criterion name to label")
            for name, value in labels.items():
                c = names.get(name)
                if c is None:
                    raise InputError(path, f"line {n}.labels.{name}",
                                     f"unknown criterion; expected one of {sorted(names)}")
                ok_pass = value in ("pass", "fail") or isinstance(value, bool)
                ok_level = isinstance(c, LLMCriterion) and isinstance(value, int) and not isinstance(value, bool) \
                    and c.scale.min <= value <= c.scale.max
                if not (ok_pass or ok_level):
                    want = (f"an integer in [{c.scale.min}, {c.scale.max}] or pass/fail" if isinstance(c, LLMCriterion)
                            else "pass or fail")
                    raise InputError(path, f"line {n}.labels.{name}", f"expected {want}, got {value!r}")
        rows.append(row)
    if not rows:
        raise InputError(path, "", "no items")
    return rows


def to_answer(row: dict[str, Any], i: int) -> Answer:
    probe = Probe(id=f"item-{i}", question=row["question"], reference=row.get("reference"), reference_origin="human")
    contexts = tuple(Chunk(id=f"item-{i}-ctx-{k}", doc=f"item-{i}", start=k, end=k + 1, text=t)
                     for k, t in enumerate(row.get("contexts", [])))
    return Answer(probe=probe, text=row["answer"], contexts=contexts)


def judgment_row(row: dict[str, Any], j: Judgment) -> dict[str, Any]:
    return {**{k: v for k, v in row.items() if k != "labels"}, "overall": j.overall, "flags": list(j.flags),
            "scores": {n: {"score": s.value, "raw": s.raw, "status": s.status, "rationale": s.rationale,
                           **({"by_judge": s.by_judge} if s.by_judge else {})}
                       for n, s in j.scores.items()}}


def member_judgments(rubric: Rubric, judgments: list[Judgment], member: str) -> list[Judgment]:
    """The judgments as one member of a judge panel alone scored the LLM criteria (its raw score
    from ``Score.by_judge``; invalid where it gave none), to measure each judge against the labels."""
    from .records import Score

    llm = {c.name: c for c in rubric.llm_criteria()}
    out = []
    for j in judgments:
        scores = dict(j.scores)
        for name, c in llm.items():
            s = j.scores.get(name)
            if s is None or member not in s.by_judge:
                continue
            raw = s.by_judge[member]
            scores[name] = (Score(value=c.scale.normalize(raw), raw=raw, flags=s.flags) if raw is not None
                            else Score(status="invalid", rationale=f"{member} gave no score", flags=s.flags))
        out.append(j.model_copy(update={"scores": scores}))
    return out


def _pair(c: Any, label: Any, judged: Any) -> tuple[str, int, int] | None:
    """(kind, human, judge) on a common footing, or None if the judge gave no valid score."""
    if judged.status != "ok" or judged.value is None:
        return None
    if label in ("pass", "fail") or isinstance(label, bool):  # pass = the upper half of the scale
        return "binary", PASS[label], int(judged.value >= 0.5)
    lo, hi = c.scale.min, c.scale.max
    return "ordinal", int(label), min(hi, max(lo, round(judged.raw if judged.raw is not None else lo)))


def agreement(rubric: Rubric, rows: list[dict[str, Any]], judgments: list[Judgment], seed: int = 0,
              resamples: int = 1000) -> dict[str, dict[str, Any]]:
    """Per labelled criterion: n, kappa, rho (with bootstrap 95% intervals), confusion table, invalid count."""
    out: dict[str, dict[str, Any]] = {}
    for c in rubric.criteria:
        pairs, invalid, raw = [], 0, []
        for row, j in zip(rows, judgments):
            if c.name not in (row.get("labels") or {}):
                continue
            p = _pair(c, row["labels"][c.name], j.scores[c.name])
            if p is None:
                invalid += 1
            else:
                pairs.append(p)
                raw.append(float(j.scores[c.name].value or 0.0))  # the unrounded score, for rho
        if not pairs and not invalid:
            continue
        kinds = {k for k, _, _ in pairs}
        if len(kinds) > 1:  # mixed pass/fail and levels on one criterion: compare as pass/fail
            mid = (c.scale.min + c.scale.max) / 2 if isinstance(c, LLMCriterion) else 0.5
            pairs = [("binary", h if k == "binary" else int(h >= mid), g if k == "binary" else int(g >= mid))
                     for k, h, g in pairs]
        kind = pairs[0][0] if pairs else "binary"
        human = [h for _, h, _ in pairs]
        judge = [g for _, _, g in pairs]
        levels = list(range(c.scale.min, c.scale.max + 1)) if kind == "ordinal" else [0, 1]
        weights = "quadratic" if kind == "ordinal" else "none"

        def kappa(idx: list[int]) -> float | None:
            return cohen_kappa([human[i] for i in idx], [judge[i] for i in idx], levels, weights)  # type: ignore[arg-type]

        def rho(idx: list[int]) -> float | None:
            # on the judge's unrounded score: a G-Eval expectation ranks items even when it rounds to one level
            return spearman([human[i] for i in idx], [raw[i] for i in idx])

        all_idx = list(range(len(pairs)))
        out[c.name] = {
            "n": len(pairs), "invalid": invalid, "kind": kind, "weights": weights, "levels": levels,
            "kappa": kappa(all_idx), "kappa_ci95": bootstrap_ci(kappa, len(pairs), 0.95, resamples, seed),
            "spearman": rho(all_idx), "spearman_ci95": bootstrap_ci(rho, len(pairs), 0.95, resamples, seed + 1),
            "exact_agreement": sum(h == g for h, g in zip(human, judge)) / len(pairs) if pairs else None,
            "confusion": confusion(human, judge, levels),
        }
    return out


def align_examples(rubric: Rubric, rows: list[dict[str, Any]], judgments: list[Judgment],
                   per_criterion: int = 3) -> Rubric:
    """A rubric whose LLM criteria carry, as calibration examples, the labelled items the judge got
    most wrong (human level, with the human's note if any)."""
    criteria = []
    for c in rubric.criteria:
        if not isinstance(c, LLMCriterion):
            criteria.append(c)
            continue
        misses = []
        for row, j in zip(rows, judgments):
            label = (row.get("labels") or {}).get(c.name)
            if label is None:
                continue
            level = label if isinstance(label, int) and not isinstance(label, bool) else (
                c.scale.max if PASS.get(label) == 1 else c.scale.min)
            s = j.scores[c.name]
            gap = abs((s.raw if s.status == "ok" and s.raw is not None else (c.scale.min + c.scale.max) / 2) - level)
            if gap > 0:  # agreements teach nothing
                misses.append((gap, row, level))
        misses.sort(key=lambda t: -t[0])
        shots = [Example(answer=row["answer"][:300], score=level,
                         why=str(row.get("note") or f"a human rated this {level}"))
                 for _, row, level in misses[:per_criterion]]
        criteria.append(c.model_copy(update={"examples": [*c.examples, *shots]}))
    return rubric.model_copy(update={"criteria": criteria})


# ---------------------------------------------------------------- a person's edits as pairwise examples


def pair_answers(pair: dict[str, Any], i: int) -> tuple[Answer, Answer]:
    """(original, edited) as two answers to the same question, contexts and reference."""
    row = {"question": pair["question"], "contexts": pair.get("contexts", []),
           "reference": pair.get("reference") or None}
    original, edited = {**row, "answer": pair["original"]}, {**row, "answer": pair["edited"]}
    return to_answer(original, 2 * i), to_answer(edited, 2 * i + 1)


def judge_pairs(judge: Judge, pairs: list[dict[str, Any]], progress: Any,
                offset: int = 20_000) -> list[tuple[Judgment, Judgment]]:
    out = []
    for i, pair in enumerate(progress(pairs, desc="pairs")):
        original, edited = pair_answers(pair, offset + i)
        out.append((judge.judge(original), judge.judge(edited)))
    return out


def _pair_values(rubric: Rubric, judged: tuple[Judgment, Judgment]) -> dict[str, tuple[float, float] | None]:
    """Per target (``overall`` and each LLM criterion): (original, edited) as the judge scored them, or
    None where either has no valid score. LLM criteria on the raw level (what an example sets)."""
    o, e = judged
    out: dict[str, tuple[float, float] | None] = {
        "overall": (o.overall, e.overall) if o.overall is not None and e.overall is not None else None}
    for c in rubric.llm_criteria():
        so, se = o.scores[c.name], e.scores[c.name]
        ok = all(x.status == "ok" and x.raw is not None for x in (so, se))
        out[c.name] = (float(so.raw), float(se.raw)) if ok else None  # type: ignore[arg-type]
    return out


def pair_agreement(rubric: Rubric, judged: list[tuple[Judgment, Judgment]]) -> dict[str, dict[str, Any]]:
    """How often the judge prefers a person's edit to the answer it corrected, on the overall score and
    on each LLM criterion: n (pairs with both scored), invalid, prefers_edit, ties, prefers_original and
    agreement (prefers_edit / n; a tie is not agreement)."""
    out: dict[str, dict[str, Any]] = {}
    rows = [_pair_values(rubric, j) for j in judged]
    for target in ["overall", *(c.name for c in rubric.llm_criteria())]:
        vals = [r[target] for r in rows]
        ok = [v for v in vals if v is not None]
        edit = sum(e > o for o, e in ok)
        tie = sum(e == o for o, e in ok)
        out[target] = {"n": len(ok), "invalid": len(vals) - len(ok), "prefers_edit": edit, "ties": tie,
                       "prefers_original": len(ok) - edit - tie, "agreement": edit / len(ok) if ok else None}
    return out


def pair_examples(rubric: Rubric, pairs: list[dict[str, Any]], judged: list[tuple[Judgment, Judgment]],
                  per_criterion: int = 2) -> Rubric:
    """A rubric whose LLM criteria carry, as calibration examples, the pairs the judge got wrong on that
    criterion (the edit not scored above the original), biggest miss first: the edited answer at the top
    of the scale, the original at the judge's own level for it, below the top."""
    criteria = []
    for c in rubric.criteria:
        if not isinstance(c, LLMCriterion):
            criteria.append(c)
            continue
        wrong = []
        for pair, j in zip(pairs, judged):
            v = _pair_values(rubric, j)[c.name]
            if v is not None and v[1] <= v[0]:
                wrong.append((v[0] - v[1], pair, v[0]))
        wrong.sort(key=lambda t: -t[0])
        shots = []
        for _, pair, original in wrong[:per_criterion]:
            shots += [Example(answer=pair["edited"][:300], score=c.scale.max,
                              why=f"a person's correction of an answer to {pair['question'][:80]!r}"),
                      Example(answer=pair["original"][:300],
                              score=min(c.scale.max - 1, max(c.scale.min, round(original))),
                              why="the answer a person corrected: worse than the correction")]
        criteria.append(c.model_copy(update={"examples": [*c.examples, *shots]}))
    return rubric.model_copy(update={"criteria": criteria})


def pair_rows(pairs: list[dict[str, Any]], judged: list[tuple[Judgment, Judgment]]) -> list[dict[str, Any]]:
    return [{**{k: p[k] for k in ("probe_id", "question", "original", "edited") if k in p},
             "overall": {"original": o.overall, "edited": e.overall},
             "scores": {n: {"original": o.scores[n].raw, "edited": e.scores[n].raw} for n in o.scores}}
            for p, (o, e) in zip(pairs, judged)]


def split_for_alignment(n: int, seed: int, fraction: float = 0.5) -> tuple[list[int], list[int]]:
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    k = max(1, int(n * fraction))
    return sorted(idx[:k]), sorted(idx[k:])


def judge_all(judge: Judge, rows: list[dict[str, Any]], progress: Any, offset: int = 0) -> list[Judgment]:
    return [judge.judge(to_answer(r, offset + i)) for i, r in enumerate(progress(rows, desc="judge"))]


def run(judge: Judge, rows: list[dict[str, Any]], align: bool, seed: int, progress: Any,
        pairs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The whole calibration: every item judged and compared with its labels; with a panel, each
    member against the labels and the members against each other; each (original, edited) pair of
    ``pairs`` judged, and how often the judge prefers the edit; with ``align``, agreement on the
    held-out half (of the labels, and of the pairs) before and after the fit half's misses (labels the
    judge missed, pairs it got wrong) become calibration examples."""
    from .config import JudgeSpec
    from .records import Evaluation
    from .trust import Monitor

    rub = judge.rubric
    judgments = judge_all(judge, rows, progress)
    result: dict[str, Any] = {"n": len(rows), "all": agreement(rub, rows, judgments, seed),
                              "items": [{**judgment_row(r, j), "labels": r.get("labels")}
                                        for r, j in zip(rows, judgments)]}
    panel = judge.panel
    if panel is not None and len(panel.roles) > 1:
        result["members"] = {name: agreement(rub, rows, member_judgments(rub, judgments, name), seed)
                             for name in panel.names}
        monitor = Monitor(rub, judge, JudgeSpec())
        monitor.observe([Evaluation(params={}, split="test", judgments=tuple(judgments))])
        result["panel_agreement"] = {k.split("/", 1)[1]: v for k, v in monitor.stats.items()
                                     if k.startswith("agreement/")}
    pairs = pairs or []
    judged_pairs = judge_pairs(judge, pairs, progress) if pairs else []
    if pairs:
        result["pairs"] = pair_agreement(rub, judged_pairs)
        result["pair_items"] = pair_rows(pairs, judged_pairs)
    if align:
        fit, held = split_for_alignment(len(rows), seed)
        aligned_rubric = align_examples(rub, [rows[i] for i in fit], [judgments[i] for i in fit])
        pfit, pheld = split_for_alignment(len(pairs), seed + 1) if pairs else ([], [])
        aligned_rubric = pair_examples(aligned_rubric, [pairs[i] for i in pfit], [judged_pairs[i] for i in pfit])
        aligned = judge.variant(rubric=aligned_rubric, seed=seed)
        held_rows = [rows[i] for i in held]
        after = judge_all(aligned, held_rows, progress, offset=10_000)
        result["align"] = {"fit_items": len(fit), "held_out_items": len(held),
                           "before": agreement(rub, held_rows, [judgments[i] for i in held], seed),
                           "after": agreement(aligned_rubric, held_rows, after, seed),
                           "examples": {c.name: [e.model_dump() for e in c.examples]
                                        for c in aligned_rubric.llm_criteria()}}
        if pairs:
            after_pairs = judge_pairs(aligned, [pairs[i] for i in pheld], progress, offset=30_000)
            result["align"].update({
                "pairs_fit": len(pfit), "pairs_held_out": len(pheld),
                "pairs_wrong_in_fit": {t: a["n"] - a["prefers_edit"] for t, a in
                                       pair_agreement(rub, [judged_pairs[i] for i in pfit]).items()},
                "pairs_before": pair_agreement(rub, [judged_pairs[i] for i in pheld]),
                "pairs_after": pair_agreement(aligned_rubric, after_pairs)})
    return result


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:+.2f}"


def calibration_text(result: dict[str, Any]) -> str:
    lines = []
    sections = [("all items", result["all"])]
    sections += [(f"all items, judge {name} alone", agg) for name, agg in result.get("members", {}).items()]
    if "align" in result:
        held = result["align"]["held_out_items"]
        sections += [(f"held-out {held} items, before alignment", result["align"]["before"]),
                     ("same items, after alignment", result["align"]["after"])]
    for title, agg in sections:
        lines.append(f"# {title}")
        for name, a in agg.items():
            k_lo, k_hi = a["kappa_ci95"]
            r_lo, r_hi = a["spearman_ci95"]
            lines.append(f"{name:16s} n={a['n']:3d} invalid={a['invalid']}  kappa({a['weights']}) {_fmt(a['kappa'])} "
                         f"[{_fmt(k_lo)}, {_fmt(k_hi)}]  rho {_fmt(a['spearman'])} [{_fmt(r_lo)}, {_fmt(r_hi)}]  "
                         f"exact {_fmt(a['exact_agreement'])}")
            lines.append(f"{'':16s} confusion (rows human, cols judge; levels {a['levels']}): {a['confusion']}")
    pair_sections = [("all pairs", result["pairs"])] if "pairs" in result else []
    if "pairs_before" in result.get("align", {}):
        held = result["align"]["pairs_held_out"]
        pair_sections += [(f"held-out {held} pairs, before alignment", result["align"]["pairs_before"]),
                          ("same pairs, after alignment", result["align"]["pairs_after"])]
    for title, agg in pair_sections:
        lines.append(f"# a person's edits against the answers they corrected, {title} (does the judge prefer the "
                     "edit?)")
        for name, a in agg.items():
            lines.append(f"{name:16s} n={a['n']:3d} invalid={a['invalid']}  prefers the edit {a['prefers_edit']}, "
                         f"ties {a['ties']}, prefers the original {a['prefers_original']}  "
                         f"agreement {_fmt(a['agreement'])}")
    if result.get("panel_agreement"):
        lines.append("# judges against each other (pass/fail agreement; normalized scores)")
        lines += [f"{k:28s} {v:.3f}" for k, v in sorted(result["panel_agreement"].items())]
    return "\n".join(lines)
