"""A person's corrections, in and out: ``selftune review`` and ``selftune feedback``.

``review`` writes the worst-scored answers of the last tune's round (question, retrieved contexts,
answer, every score with its rationale) with empty fields for a person: ``edited_answer``, a
``rating`` per LLM criterion, ``comment``; as JSONL and as a CSV a spreadsheet opens (UTF-8 with a
byte-order mark, every field quoted).

``feedback --file`` takes such a file back (JSONL or CSV), ``feedback --from-mlflow`` takes what
people added in the MLflow UI on the items' traces (MLflow 3 assessments from a ``HUMAN`` source: an
``expected_response`` expectation, or feedback named after an LLM criterion). What comes in is kept
in the workdir (``feedback/ingested.jsonl``; the file as given under ``feedback/raw/``) and logged
to MLflow on the run each item came from:

- an edited answer becomes that probe's human reference (``reference_origin: human``) for every later
  tune (``apply_human_references``; it outranks the extractive one in the reference check) and for
  ``calibrate``;
- ratings become labels for ``selftune calibrate --feedback`` (``calibration_rows``);
- the (original, edited) pairs are kept (``feedback/pairs.jsonl``): pairwise examples for ``calibrate
  --feedback`` (how often the judge prefers the person's edit) and ``--align`` (``feedback_pairs``).

A malformed row is an error naming the file and line; the good rows of the same file are kept first.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import time
from pathlib import Path
from typing import Any

from .errors import InputError, read_text
from .records import Probe
from .rubric import LLMCriterion, Rubric

OURS = {"probes.file", "source sentence", "selftune.feedback"}  # human-source ids selftune writes itself


def _dir(workdir: Path) -> Path:
    d = workdir / "feedback"
    d.mkdir(parents=True, exist_ok=True)
    return d


# ---------------------------------------------------------------- review


def last_tune(client: Any, experiment: str) -> Any:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`selftune.kind` = 'tune'",
                              order_by=["attribute.start_time DESC"], max_results=1) if exp else []
    if not runs:
        raise InputError(experiment, "", "no tune in this MLflow experiment; run `selftune tune CONFIG` first")
    return runs[0]


def review_rows(uri: str, experiment: str, rubric: Rubric, round_: int | None, worst: int) -> list[dict[str, Any]]:
    """The ``worst`` lowest-scored items (train and validation) of one round of the last tune (default:
    its best round), worst first, each with its scores and empty fields for a person."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    parent = last_tune(client, experiment)
    want = int(parent.data.metrics.get("best_round", 0)) if round_ is None else round_
    children = client.search_runs([parent.info.experiment_id], filter_string=(
        f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.`selftune.round` = '{want}'"))
    if not children:
        raise InputError(f"run {parent.info.run_id}", "--round", f"no round {want} in the last tune")
    run = children[0]
    llm = [c.name for c in rubric.llm_criteria()]
    rows = []
    for split in ("train", "val"):
        try:
            path = client.download_artifacts(run.info.run_id, f"tables/{split}.json")
        except Exception:  # noqa: BLE001 -- a round that did not answer train (not promoted) has no rows
            continue
        table = json.loads(Path(path).read_text(encoding="utf-8"))
        cols = table["columns"]
        for data in table["data"]:
            r = dict(zip(cols, data))
            if not r.get("question"):
                continue
            names = sorted({c.rsplit("/", 1)[0] for c in cols if c.endswith("/score")})
            rows.append({
                "probe_id": r["probe_id"], "run_id": run.info.run_id, "round": want, "split": r.get("split", split),
                "kind": r.get("kind", ""), "question": r["question"], "reference": r.get("reference", ""),
                "contexts": json.loads(r.get("contexts") or "[]"), "answer": r.get("answer", ""),
                "overall": r.get("overall"),
                "scores": {n: {"score": r.get(f"{n}/score"), "status": r.get(f"{n}/status"),
                               "rationale": r.get(f"{n}/rationale", "")} for n in names},
                "edited_answer": "", "ratings": dict.fromkeys(llm), "comment": ""})
    rows.sort(key=lambda r: (r["overall"] is not None and r["overall"] == r["overall"], r["overall"] or 0.0))
    return rows[:worst]


def write_review(rows: list[dict[str, Any]], out: Path, rubric: Rubric) -> tuple[Path, Path]:
    """``out`` as JSONL and its ``.csv`` sibling (or ``out`` as CSV and its ``.jsonl`` sibling)."""
    jsonl, csv_path = (out.with_suffix(".jsonl"), out) if out.suffix.lower() == ".csv" else (out, out.with_suffix(
        ".csv"))
    out.parent.mkdir(parents=True, exist_ok=True)
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    llm = [c.name for c in rubric.llm_criteria()]
    names = sorted({n for r in rows for n in r["scores"]})
    header = ["probe_id", "run_id", "round", "split", "kind", "question", "answer", "reference", "contexts", "overall"]
    header += [f"{n}_{k}" for n in names for k in ("score", "rationale")]
    header += ["edited_answer", *[f"rating_{n}" for n in llm], "comment"]
    buf = io.StringIO()
    w = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\r\n")
    w.writerow(header)
    for r in rows:
        w.writerow([r["probe_id"], r["run_id"], r["round"], r["split"], r["kind"], r["question"], r["answer"],
                    r["reference"], "\n---\n".join(r["contexts"]), "" if r["overall"] is None else r["overall"],
                    *[x for n in names for x in (_blank(r["scores"].get(n, {}).get("score")),
                                                 r["scores"].get(n, {}).get("rationale", ""))],
                    r["edited_answer"], *["" for _ in llm], r["comment"]])
    csv_path.write_text(buf.getvalue(), encoding="utf-8-sig")
    return jsonl, csv_path


def _blank(v: Any) -> Any:
    return "" if v is None or v != v else v


# ---------------------------------------------------------------- feedback in


def _rating(c: LLMCriterion, v: Any) -> int | None:
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    if isinstance(v, bool):
        raise ValueError(f"expected an integer in [{c.scale.min}, {c.scale.max}] or blank, got {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"expected an integer in [{c.scale.min}, {c.scale.max}] or blank, got {v!r}") from None
    if not f.is_integer() or not c.scale.min <= f <= c.scale.max:
        raise ValueError(f"expected an integer in [{c.scale.min}, {c.scale.max}] or blank, got {v!r}")
    return int(f)


def parse_row(row: Any, rubric: Rubric) -> dict[str, Any]:
    """One feedback row, checked; raises ValueError("<key>: <what was expected>")."""
    if not isinstance(row, dict):
        raise ValueError("row: expected a JSON object")
    pid = row.get("probe_id")
    if not isinstance(pid, str) or not pid.strip():
        raise ValueError("probe_id: expected the probe id the review file gave (non-empty)")
    llm = {c.name: c for c in rubric.llm_criteria()}
    ratings_in = row.get("ratings")
    if ratings_in is None:  # CSV: rating_<criterion> columns
        ratings_in = {k[len("rating_"):]: v for k, v in row.items() if k.startswith("rating_")}
    if not isinstance(ratings_in, dict):
        raise ValueError("ratings: expected a mapping of criterion to level")
    ratings = {}
    for name, v in ratings_in.items():
        if name not in llm:
            raise ValueError(f"ratings.{name}: unknown LLM criterion; expected one of {sorted(llm)}")
        try:
            level = _rating(llm[name], v)
        except ValueError as err:
            raise ValueError(f"ratings.{name}: {err}") from None
        if level is not None:
            ratings[name] = level
    for key in ("edited_answer", "comment", "answer", "question", "reference", "run_id"):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise ValueError(f"{key}: expected text")
    ctx = row.get("contexts", [])
    if isinstance(ctx, str):
        ctx = [c for c in ctx.split("\n---\n") if c] if ctx else []
    if not isinstance(ctx, list) or not all(isinstance(c, str) for c in ctx):
        raise ValueError("contexts: expected a list of strings")
    return {"probe_id": pid.strip(), "run_id": (row.get("run_id") or "").strip(), "question": row.get("question") or "",
            "answer": row.get("answer") or "", "reference": row.get("reference") or "", "contexts": ctx,
            "edited_answer": (row.get("edited_answer") or "").strip(), "ratings": ratings,
            "comment": (row.get("comment") or "").strip()}


def read_feedback(path: Path, rubric: Rubric) -> tuple[list[dict[str, Any]], list[InputError]]:
    """(good rows that carry something, one InputError per malformed row naming its line)."""
    text = read_text(path, "a review file (JSONL or CSV)")
    raw: list[tuple[int, Any]] = []
    errors: list[InputError] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        for row in reader:
            raw.append((reader.line_num, {k: v for k, v in row.items() if k is not None}))
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                raw.append((n, json.loads(line)))
            except json.JSONDecodeError as err:
                errors.append(InputError(path, f"line {n}", f"expected a JSON object ({err.msg})"))
    good = []
    for n, row in raw:
        try:
            r = parse_row(row, rubric)
        except ValueError as err:
            key, _, what = str(err).partition(": ")
            errors.append(InputError(path, f"line {n}.{key}", what))
            continue
        if r["edited_answer"] or r["ratings"] or r["comment"]:
            good.append({**r, "source": f"file:{path.name}", "line": n})
    return good, errors


def ingest(uri: str, experiment: str, workdir: Path, rows: list[dict[str, Any]], origin: Path | None = None,
           rejected: int = 0) -> dict[str, Any]:
    """Keep ``rows`` in the workdir (and the file they came from), log them to MLflow on the runs they
    came from and on a ``feedback`` run; returns the counts."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    d = _dir(workdir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    at = time.time()
    if origin is not None:
        (d / "raw").mkdir(exist_ok=True)
        shutil.copyfile(origin, d / "raw" / f"{stamp}-{origin.name}")
    with (d / "ingested.jsonl").open("a", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps({**r, "at": at}, ensure_ascii=False) + "\n")
    pairs = [{"probe_id": r["probe_id"], "question": r["question"], "original": r["answer"],
              "edited": r["edited_answer"], "contexts": r.get("contexts", []), "reference": r.get("reference", ""),
              "run_id": r.get("run_id", "")} for r in rows if r["edited_answer"] and r["answer"]]
    if pairs:
        with (d / "pairs.jsonl").open("a", encoding="utf-8") as fh:
            fh.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
    counts = {"feedback/rows": len(rows), "feedback/edits": sum(bool(r["edited_answer"]) for r in rows),
              "feedback/ratings": sum(bool(r["ratings"]) for r in rows),
              "feedback/comments": sum(bool(r["comment"]) for r in rows), "feedback/rejected": rejected}
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run = client.create_run(exp_id, run_name=f"feedback-{stamp}", tags={"selftune.kind": "feedback"})
    now = int(at * 1000)
    client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in counts.items()])
    client.log_dict(run.info.run_id, rows, "feedback/rows.json")
    if origin is not None:
        client.log_artifact(run.info.run_id, str(origin), "feedback/raw")
    client.set_terminated(run.info.run_id, "FINISHED")
    by_run: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("run_id"):
            by_run.setdefault(r["run_id"], []).append(r)
    for rid, part in by_run.items():  # also on the run each item came from
        try:
            client.log_dict(rid, part, f"feedback/{stamp}.json")
            client.set_tag(rid, "selftune.feedback", str(len(part)))
        except Exception as err:  # noqa: BLE001 -- a run deleted since: the rows are kept on the feedback run
            counts.setdefault("feedback/runs_missing", 0)
            counts["feedback/runs_missing"] += 1
            import logging

            logging.getLogger(__name__).warning("feedback not logged on run %s: %s", rid, err)
    counts["feedback_run"] = run.info.run_id
    return counts


def ingested(workdir: Path) -> list[dict[str, Any]]:
    f = workdir / "feedback" / "ingested.jsonl"
    if not f.is_file():
        return []
    return [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]


def human_references(workdir: Path) -> dict[str, str]:
    """Probe id -> the latest edited answer a person gave for it."""
    out: dict[str, str] = {}
    for r in ingested(workdir):
        if r.get("edited_answer"):
            out[r["probe_id"]] = r["edited_answer"]
    return out


def apply_human_references(probes: list[Probe], workdir: Path) -> tuple[list[Probe], int]:
    """Each probe a person gave an edited answer for carries it as its reference (``human``); the
    extractive reference is kept in ``extractive_reference``. Returns (probes, how many changed)."""
    refs = human_references(workdir)
    out, n = [], 0
    for p in probes:
        ref = refs.get(p.id)
        if ref is not None:
            n += 1
            extractive = p.extractive_reference if p.extractive_reference is not None else (
                p.reference if p.reference_origin == "source" else None)
            p = p.model_copy(update={"reference": ref, "reference_origin": "human", "extractive_reference": extractive})
        out.append(p)
    return out, n


def calibration_rows(workdir: Path) -> list[dict[str, Any]]:
    """Rows for ``calibrate``: each rated answer with its labels (the latest rating per probe and answer),
    the reference a human gave if any, the comment as its note."""
    refs = human_references(workdir)
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for r in ingested(workdir):
        if r.get("ratings") and r.get("answer") and r.get("question"):
            latest[(r["probe_id"], r["answer"])] = r
    return [{"question": r["question"], "answer": r["answer"], "contexts": r.get("contexts", []),
             **({"reference": refs.get(r["probe_id"]) or r.get("reference")}
                if refs.get(r["probe_id"]) or r.get("reference") else {}),
             "labels": r["ratings"], **({"note": r["comment"]} if r.get("comment") else {})}
            for r in latest.values()]


def feedback_pairs(workdir: Path) -> list[dict[str, Any]]:
    """The (original, edited) answer pairs kept by ``feedback`` (``feedback/pairs.jsonl``), the latest edit
    per probe and original answer, for ``calibrate``: the edited answer is the one a person prefers. Each
    carries the question, the retrieved contexts and the reference the original was judged with (taken
    from ``ingested.jsonl`` for pairs kept before pairs carried them)."""
    f = workdir / "feedback" / "pairs.jsonl"
    if not f.is_file():
        return []
    seen = {(r["probe_id"], r.get("answer", "")): r for r in ingested(workdir)}
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for line in f.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        p = json.loads(line)
        row = seen.get((p["probe_id"], p["original"]), {})
        latest[(p["probe_id"], p["original"])] = {
            "probe_id": p["probe_id"], "question": p.get("question") or row.get("question", ""),
            "original": p["original"], "edited": p["edited"],
            "contexts": p["contexts"] if "contexts" in p else row.get("contexts", []),
            "reference": p["reference"] if "reference" in p else row.get("reference", "")}
    return [p for p in latest.values() if p["question"] and p["original"] != p["edited"]]


# ---------------------------------------------------------------- from the MLflow UI


def from_mlflow(uri: str, experiment: str, workdir: Path, rubric: Rubric) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows from what people added on the items' traces: HUMAN-source assessments not written by selftune
    and not ingested before (by assessment id). ``expected_response`` -> edited answer; feedback named
    after an LLM criterion -> rating; other human feedback with a rationale -> comment. Returns (rows,
    problems: assessments that could not be read, each naming its trace)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise InputError(experiment, "", "no such MLflow experiment; run `selftune tune CONFIG` first")
    seen = {a for r in ingested(workdir) for a in r.get("assessment_ids", [])}
    llm = {c.name: c for c in rubric.llm_criteria()}
    rows, problems = [], []
    token = None
    while True:
        page = client.search_traces(locations=[exp.experiment_id], max_results=200, page_token=token,
                                    include_spans=True)
        for t in page:
            human = [a for a in (t.info.assessments or []) if a.source.source_type == "HUMAN" and a.valid is not False
                     and a.source.source_id not in OURS and a.assessment_id not in seen]
            pid = t.info.tags.get("selftune.probe_id")
            if not human or not pid:
                continue
            row: dict[str, Any] = {"probe_id": pid, "run_id": t.info.trace_metadata.get("mlflow.sourceRun", ""),
                                   "question": t.info.request_preview or "", "answer": "", "reference": "",
                                   "contexts": [], "edited_answer": "", "ratings": {}, "comment": "",
                                   "source": f"mlflow:{t.info.trace_id}",
                                   "assessment_ids": [a.assessment_id for a in human]}
            for s in t.data.spans if t.data else []:
                if s.name == "item" and isinstance(s.outputs, dict):
                    row["answer"] = str(s.outputs.get("answer", ""))
                if s.name == "retrieve" and isinstance(s.outputs, list):
                    row["contexts"] = [str(d.get("page_content", "")) for d in s.outputs if isinstance(d, dict)]
                if s.name == "judge" and isinstance(s.inputs, dict):
                    row["reference"] = str(s.inputs.get("reference") or "")
            for a in human:
                who = f"trace {t.info.trace_id}: assessment {a.name!r} by {a.source.source_id}"
                if a.expectation is not None and a.name == "expected_response":
                    row["edited_answer"] = str(a.expectation.value).strip()
                elif a.feedback is not None and a.name in llm:
                    try:
                        level = _rating(llm[a.name], a.feedback.value)
                    except ValueError as err:
                        problems.append(f"{who}: {err}")
                        continue
                    if level is not None:
                        row["ratings"][a.name] = level
                    if a.rationale:
                        row["comment"] = (row["comment"] + " " + a.rationale).strip()
                elif a.rationale or (a.feedback is not None and isinstance(a.feedback.value, str)):
                    row["comment"] = (row["comment"] + " " + (a.rationale or str(a.feedback.value))).strip()
                else:
                    problems.append(f"{who}: not an expected_response nor a rating of {sorted(llm)}; kept as seen")
            if row["edited_answer"] or row["ratings"] or row["comment"]:
                rows.append(row)
        token = page.token
        if not token:
            break
    return rows, problems
