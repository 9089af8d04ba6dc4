"""The probe splits as MLflow evaluation datasets (``mlflow.genai.datasets``), on an explicit store.

A split becomes ``probes-<split>-<digest>``: one record per probe, the question as input, the reference
as ``expected_response``, the probe id and split as tags, and its source (``DOCUMENT`` for a sentence of
a document, ``HUMAN`` for your own probes). The same split (same digest) reuses its dataset. Records are
written through the store of ``uri`` (``EvaluationDataset.merge_records`` would write to the process-wide
default store instead).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .records import Probe


def log_probe_datasets(uri: str, experiment_id: str, probes: list[Probe], digest: Callable[[list[Probe]], str]) \
        -> dict[str, str]:
    """Each split as an MLflow evaluation dataset ``probes-<split>-<digest>`` (question as input, reference
    as ``expected_response``), reused when a dataset of that name exists; returns split -> dataset id."""
    from mlflow import MlflowClient
    from mlflow.tracing.client import TracingClient

    client, store = MlflowClient(uri), TracingClient(uri).store
    out: dict[str, str] = {}
    for split in ("train", "val", "test"):
        part = [p for p in probes if p.split == split]
        if not part:
            continue
        name = f"probes-{split}-{digest(part)[:12]}"
        found = client.search_datasets(experiment_ids=[experiment_id], filter_string=f"name = '{name}'")
        if found:
            out[split] = found[0].dataset_id
            continue
        ds = client.create_dataset(name=name, experiment_id=[experiment_id],
                                   tags={"selftune.split": split, "selftune.items": str(len(part))})
        store.upsert_dataset_records(ds.dataset_id, [_record(p) for p in part])
        out[split] = ds.dataset_id
    return out


def _record(p: Probe) -> dict[str, Any]:
    rec: dict[str, Any] = {"inputs": {"question": p.question},
                           "tags": {"probe_id": p.id, "split": p.split, "answerable": str(p.answerable).lower()}}
    if p.reference:
        rec["expectations"] = {"expected_response": p.reference}
    rec["source"] = {"source_type": "HUMAN", "source_data": {"origin": "probes.file"}} \
        if p.reference_origin == "human" or not p.source_doc else \
        {"source_type": "DOCUMENT", "source_data": {"doc_uri": p.source_doc}}
    return rec
