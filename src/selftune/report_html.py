"""``report.html``: the tune a person would rather look at, with its plots as PNGs.

``write_report(result, markdown, out, client, run_id)`` writes ``report.html``, ``report.md`` and the PNGs
to ``out`` and, given a client, logs the PNGs as MLflow figures and ``report.html`` as an artifact of the
parent run. The page holds: the validation score per round with 95% bootstrap intervals and the
incumbent's line; per-criterion baseline vs best on validation and the held-out test; the search path
(every candidate's params, promoted ones marked); judge reliability per round; the instruction diff
baseline -> best; three held-out probes where the best beats the baseline and three where it loses,
with both answers, scores and contexts. Every text from documents, probes or models is HTML-escaped.
Plots use matplotlib's object API (``Figure``), never pyplot's global state.
"""

from __future__ import annotations

import base64
import difflib
import html
import io
from pathlib import Path
from typing import Any

import numpy as np

from .records import Evaluation, Judgment, Round

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222;line-height:1.4}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 7px;
vertical-align:top}th{background:#f3f3f3}tr.promoted{background:#e9f7e9}img{max-width:100%}
del{background:#fdd;text-decoration:line-through}ins{background:#dfd;text-decoration:none}
.probe{border:1px solid #ddd;border-radius:6px;padding:.6em 1em;margin:.8em 0}.ctx{font-size:.85em;color:#444;
white-space:pre-wrap}.win{color:#070}.loss{color:#a00}pre{white-space:pre-wrap;background:#f7f7f7;padding:.6em}"""


def write_report(result: Any, markdown: str, out: Path, client: Any = None, run_id: str | None = None) -> Path:
    """Write report.html, report.md and the PNGs to ``out``; log figures + report.html to ``run_id``."""
    out.mkdir(parents=True, exist_ok=True)
    figures = {"val_by_round.png": val_figure(result.rounds), "criteria.png": criteria_figure(result),
               "search_path.png": search_figure(result.rounds)}
    if (rel := reliability_figure(result.rounds)) is not None:
        figures["judge_reliability.png"] = rel
    pngs: dict[str, bytes] = {}
    for name, fig in figures.items():
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        pngs[name] = buf.getvalue()
        (out / name).write_bytes(pngs[name])
        if client is not None and run_id is not None:
            client.log_figure(run_id, fig, f"figures/{name}")
    page = render(result, markdown, pngs)
    (out / "report.html").write_text(page, encoding="utf-8")
    (out / "report.md").write_text(markdown, encoding="utf-8")
    if client is not None and run_id is not None:
        client.log_artifact(run_id, str(out / "report.html"))
    return out


def bootstrap_ci(values: list[float], level: float = 0.95, resamples: int = 2000, seed: int = 0) \
        -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean (seeded: the same tune draws the same report)."""
    if len(values) < 2:
        return None
    rng = np.random.default_rng(seed)
    arr = np.asarray(values, dtype=float)
    means = arr[rng.integers(0, len(arr), size=(resamples, len(arr)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def _overalls(ev: Evaluation) -> list[float]:
    return [j.overall for j in ev.judgments if j.overall is not None]


def _figure(w: float = 7.0, h: float = 3.4, ncols: int = 1) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    return fig, fig.subplots(1, ncols)


def val_figure(rounds: list[Round]) -> Any:
    fig, ax = _figure()
    xs = [r.index for r in rounds]
    ys = [r.val.overall() or 0.0 for r in rounds]
    cis = [bootstrap_ci(_overalls(r.val)) for r in rounds]
    err = np.array([[y - c[0], c[1] - y] if c else [0.0, 0.0] for y, c in zip(ys, cis)]).T
    ax.errorbar(xs, ys, yerr=err, fmt="none", ecolor="#888", capsize=4, label="95% bootstrap interval")
    for promoted in (True, False):
        pts = [(x, y) for x, y, r in zip(xs, ys, rounds) if r.gate.promote == promoted]
        if pts:
            ax.scatter(*zip(*pts), s=45, zorder=3, facecolors="tab:blue" if promoted else "white",
                       edgecolors="tab:blue", label="candidate (promoted)" if promoted else "candidate (rejected)")
    inc = {r.index: r.val.overall() or 0.0 for r in rounds}
    ax.step(xs, [inc[r.incumbent_index] for r in rounds], where="post", color="tab:green", label="incumbent")
    ax.set_xlabel("round")
    ax.set_ylabel("validation overall")
    ax.set_xticks(xs)
    ax.set_title("Validation score per round")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the plot: it hides no point
    return fig


def _criteria(*evs: Evaluation) -> list[str]:
    names: dict[str, None] = {}
    for ev in evs:
        for j in ev.judgments:
            names.update(dict.fromkeys(j.scores))
    return list(names)


def criteria_figure(result: Any) -> Any:
    fig, axes = _figure(10.0, 3.6, 2)
    base, best = result.rounds[0], result.best
    for ax, title, a, b in ((axes[0], "validation", base.val, best.val),
                            (axes[1], "held-out test", result.test_baseline, result.test_best)):
        names = _criteria(a, b)
        x = np.arange(len(names))
        ax.bar(x - 0.2, [a.criterion_mean(n) or 0.0 for n in names], 0.4, label="baseline", color="#bbb")
        ax.bar(x + 0.2, [b.criterion_mean(n) or 0.0 for n in names], 0.4, label=f"best (round {best.index})",
               color="tab:blue")
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"Per criterion, {title}")
    axes[0].legend(fontsize=8)
    return fig


def _numeric(rounds: list[Round]) -> list[str]:
    return sorted({k for r in rounds for k, v in r.params.items() if isinstance(v, (int, float))})


def search_figure(rounds: list[Round]) -> Any:
    names = _numeric(rounds) or ["(no numeric params)"]
    fig, axes = _figure(3.0 * len(names), 2.8, len(names))
    for ax, name in zip(np.atleast_1d(axes), names):
        xs = [r.index for r in rounds]
        ys = [r.params.get(name, np.nan) for r in rounds]
        ax.plot(xs, ys, color="#999", lw=1)
        ax.scatter(xs, ys, c=["tab:green" if r.gate.promote else "white" for r in rounds], edgecolors="k", zorder=3)
        ax.set_title(name, fontsize=9)
        ax.set_xticks(xs)
        ax.set_xlabel("round (filled: promoted)", fontsize=8)
    return fig


def plotted_stats(rounds: list[Round]) -> list[str]:
    """The reliability figures worth a line: rates and correlations (counts such as ``retest/n`` or
    ``swap/invalid`` stay in the table), overall rather than per criterion, except length bias."""
    keys = sorted({k for r in rounds for k in r.judge_stats})
    return [k for k in keys if k.split("/")[-1] not in ("n", "invalid") and
            (k.count("/") <= 1 or k.startswith("length_corr/"))
            and all(-1.0 <= r.judge_stats[k] <= 1.0 for r in rounds if k in r.judge_stats)]


def reliability_figure(rounds: list[Round]) -> Any | None:
    keys = plotted_stats(rounds)
    if not keys:
        return None
    fig, ax = _figure()
    xs = [r.index for r in rounds]
    for k in keys:
        ys = [r.judge_stats.get(k, np.nan) for r in rounds]
        ax.plot(xs, ys, marker="o", label=k)
    low = min((r.judge_stats[k] for r in rounds for k in keys if k in r.judge_stats), default=0.0)
    ax.set_ylim(-1.05 if low < 0 else -0.05, 1.05)
    ax.set_xticks(xs)
    ax.set_xlabel("round")
    ax.set_title("Judge reliability per round (counts in the table)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    return fig


def _f(v: Any) -> str:
    return "n/a" if v is None else (f"{v:.3f}" if isinstance(v, float) else html.escape(str(v)))


def _table(header: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(f"<tr class='{c}'>" + "".join(f"<td>{x}</td>" for x in row) + "</tr>"
                   for row, c in zip(rows, classes or [""] * len(rows)))
    return f"<div style='overflow-x:auto'><table><tr>{head}</tr>{body}</table></div>"


def word_diff(a: str, b: str) -> str:
    """Word-level diff as HTML: removed words in <del>, added in <ins>, all text escaped."""
    wa, wb = a.split(), b.split()
    out = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=wa, b=wb, autojunk=False).get_opcodes():
        if op == "equal":
            out.append(html.escape(" ".join(wa[i1:i2])))
            continue
        if i2 > i1:
            out.append(f"<del>{html.escape(' '.join(wa[i1:i2]))}</del>")
        if j2 > j1:
            out.append(f"<ins>{html.escape(' '.join(wb[j1:j2]))}</ins>")
    return " ".join(out)


def probe_pairs(base: Evaluation, best: Evaluation, k: int = 3) -> tuple[list[tuple], list[tuple]]:
    """The ``k`` items where best gains most over baseline and the ``k`` where it loses most
    (paired by probe id, both scored); each (delta, baseline judgment, best judgment)."""
    by_id = {j.answer.probe.id: j for j in base.judgments}
    pairs = [(jb.overall - ja.overall, ja, jb) for jb in best.judgments
             if (ja := by_id.get(jb.answer.probe.id)) is not None and ja.overall is not None
             and jb.overall is not None]
    pairs.sort(key=lambda t: t[0])
    return [p for p in reversed(pairs) if p[0] > 0][:k], [p for p in pairs if p[0] < 0][:k]


def _answer(label: str, j: Judgment) -> str:
    scores = ", ".join(f"{html.escape(n)} {_f(s.value) if s.status == 'ok' else s.status}" for n, s in j.scores.items())
    why = "".join(f"<li>{html.escape(n)}: {html.escape(s.rationale)}</li>" for n, s in j.scores.items() if s.rationale)
    ctx = "".join(f"<div class='ctx'>[{i}] ({html.escape(c.doc)}) {html.escape(c.text)}</div>"
                  for i, c in enumerate(j.answer.contexts, 1))
    caps = f" — capped by {html.escape(', '.join(j.capped_by))}" if j.capped_by else ""
    return (f"<p><b>{label}</b> (overall {_f(j.overall)}{caps}): {html.escape(j.answer.text or j.answer.error or '')}"
            f"</p><p style='font-size:.85em'>{scores}</p><details><summary>rationales and {len(j.answer.contexts)} "
            f"contexts</summary><ul>{why}</ul>{ctx}</details>")


def _probes(result: Any) -> str:
    if result.best.index == 0:
        return "<p>No candidate was promoted: the best is the baseline, so no held-out probe differs.</p>"
    wins, losses = probe_pairs(result.test_baseline, result.test_best)
    parts = []
    for title, items, cls in (("Where the best beats the baseline", wins, "win"),
                              ("Where the best loses to the baseline", losses, "loss")):
        parts.append(f"<h3>{title} ({len(items)} of 3)</h3>")
        if not items:
            parts.append("<p>none on the held-out test split</p>")
        for d, ja, jb in items:
            p = ja.answer.probe
            parts.append(f"<div class='probe'><p><b>Q:</b> {html.escape(p.question)} <span class='{cls}'>"
                         f"({d:+.3f})</span></p><p><b>Reference:</b> {html.escape(p.reference or 'none')}</p>"
                         f"{_answer('Baseline', ja)}{_answer(f'Best (round {result.best.index})', jb)}</div>")
    return "".join(parts)


def render(result: Any, markdown: str, pngs: dict[str, bytes]) -> str:
    def img(name: str) -> str:
        if name not in pngs:
            return "<p>(no model-scored criteria: nothing to measure the judge on)</p>"
        return f"<img alt='{name}' src='data:image/png;base64,{base64.b64encode(pngs[name]).decode()}'>"

    base, best = result.rounds[0], result.best
    summary = _table(["", "baseline", f"best (round {best.index})", "gain"], [
        ["validation (tuned on)", _f(base.val.overall()), _f(best.val.overall()), f"{result.val_gain:+.3f}"],
        ["held-out test (never seen)", _f(result.test_baseline.overall()), _f(result.test_best.overall()),
         f"{result.test_gain:+.3f}"]])
    names = _numeric(result.rounds)
    rows, classes = [], []
    for r in result.rounds:
        instr = str(r.params.get("instructions", ""))
        mark = "baseline" if r.index == 0 else ("★ promoted" if r.gate.promote else "")
        rows.append([str(r.index), mark,
                     str(r.incumbent_index), *[_f(r.params.get(n)) for n in names],
                     html.escape(instr[:140] + ("…" if len(instr) > 140 else "")), _f(r.train.overall()),
                     _f(r.val.overall()), html.escape(r.gate.reason)])
        classes.append("promoted" if r.gate.promote else "")
    search = _table(["round", "", "incumbent", *names, "instructions", "train", "val", "gate"], rows, classes)
    keys = sorted({k for r in result.rounds for k in r.judge_stats})
    rel = _table(["round", "trusted", *keys], [[str(r.index), "yes" if r.trusted else "NO",
                                                 *[_f(r.judge_stats.get(k)) for k in keys]] for r in result.rounds])
    a, b = str(base.params.get("instructions", "")), str(best.params.get("instructions", ""))
    diff = word_diff(a, b) if a != b else html.escape(a) + " <i>(unchanged)</i>"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>selftune report</title>
<style>{CSS}</style></head><body><h1>selftune report</h1>{summary}
<h2>Validation score per round</h2>{img("val_by_round.png")}
<h2>Per criterion: baseline vs best</h2>{img("criteria.png")}
<h2>Search path</h2><p>Every evaluated candidate; promoted rows are green.</p>{img("search_path.png")}{search}
<h2>Judge reliability per round</h2>{img("judge_reliability.png")}{rel}
<h2>Instructions: baseline → best</h2><p>{diff}</p>
<h2>Held-out probes</h2>{_probes(result)}
<h2>The markdown report</h2><pre>{html.escape(markdown)}</pre></body></html>
"""
