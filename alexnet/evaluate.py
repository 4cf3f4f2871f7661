"""Ensembles of trained members on the validation set: the paper's Table 2 and Figure 4, in MLflow.

1. Members are finished `pipelines/train.py` runs (`alexnet.members`).
2. Each member's softmax over the validation set is computed once and stored with its run (`alexnet.inference`).
3. Ensembles average their members' softmax outputs (`alexnet.ensemble`).
4. MLflow: a summary run in the `ensembles` experiment (Markdown/HTML table next to Table 2, bar
   chart, Figure 4) with one nested run per (size, crops).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from alexnet.config import EvalConfig, Log, UsageError


def run_evaluation(cfg: EvalConfig, log: Log = print) -> dict:
    """Members -> stored per-member outputs -> ensembles -> MLflow runs; raises UsageError before any inference."""
    from alexnet.cluster import connect_ray
    from alexnet.ensemble import ensemble_rows, plan_rows, topk_errors
    from alexnet.inference import member_outputs, table_arrays
    from alexnet.members import find_members
    from alexnet.neighbours import figure4
    from alexnet.prepared import classes_digest, read_prepared
    from alexnet.table2 import bar_chart_png, html_table, markdown_table
    from alexnet.tracking import Runs, check_tracking_uri, resolve_tracking_uri

    prepared = read_prepared(cfg.data)
    if not prepared.val_files or not prepared.val_rows:
        raise UsageError(f"{prepared.path} has no validation images to evaluate on")
    uri = resolve_tracking_uri(cfg.tracking_uri)
    check_tracking_uri(uri)
    runs = Runs(uri)
    members = find_members(cfg, runs, prepared)
    log(f"{len(members)} member(s): " + ", ".join(f"{m.name} ({m.run_id[:8]})" for m in members))
    connect_ray(cfg.address, min_cpus=2, log=log)

    outputs = member_outputs(members, prepared, cfg, runs, log)
    first = next(iter(outputs.values()))
    _, labels, _ = table_arrays(next(iter(first.values())))
    probs = {run_id: {mode: table_arrays(t)[2] for mode, t in tables.items()} for run_id, tables in outputs.items()}
    plans = plan_rows([(m.run_id, m.pretrained) for m in members], cfg.sizes, cfg.seed)
    rows = ensemble_rows(probs, labels, plans, cfg.modes)
    table = markdown_table(rows, members)

    exp_id = runs.experiment_id(cfg.ensemble_experiment)
    name = cfg.run_name or time.strftime("ensembles-%Y%m%d-%H%M%S")
    common = {"data.path": str(prepared.path), "data.val_fingerprint": prepared.val_fingerprint(),
              "data.classes": classes_digest(prepared.wnids)}
    by_id = {m.run_id: m for m in members}
    parent_id = runs.create(exp_id, name, tags=common | {"stage": "evaluate", "members": ",".join(by_id)},
                            params={k: v for k, v in cfg.to_dict().items() if v not in (None, [])}
                            | {"member_count": len(members), "val_images": len(labels)})
    try:
        runs.log_metrics(parent_id, headline(rows))
        runs.set_tags(parent_id, {"mlflow.note.content": f"## Ensembles vs the paper's Table 2\n\n{table}\n"})
        for r in rows:
            r["mlflow_run_id"] = runs.create(exp_id, f"{r['label']} {r['crops']}", parent_id=parent_id,
                                             tags=common | row_tags(r, by_id), params=row_params(r, by_id))
            runs.log_metrics(r["mlflow_run_id"], row_metrics(r))
            runs.finish(r["mlflow_run_id"])
        log(links(uri, exp_id, parent_id, [r["mlflow_run_id"] for r in rows]))
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            (tmp / "ensembles.md").write_text(table + "\n")
            (tmp / "ensembles.html").write_text(html_table(rows, members))
            (tmp / "ensembles.json").write_text(json.dumps(rows, indent=1))
            bar_chart_png(rows, tmp / "ensembles.png")
            neighbours = None
            if cfg.figure4:
                best = min(members, key=lambda m: topk_errors(probs[m.run_id][cfg.modes[0]], labels)[0])
                log(f"Figure 4: nearest training images in fc7 of {best.name}")
                neighbours = figure4(best, prepared, cfg, tmp / "figure4_neighbours.png")
                (tmp / "figure4_neighbours.json").write_text(json.dumps(neighbours, indent=1))
                runs.set_tags(parent_id, {"figure4_member": best.run_id})
            runs.log_artifacts(parent_id, tmp, artifact_path="evaluate")
            model = register_ensemble(cfg, rows, by_id, prepared, runs, parent_id, tmp / "model", log)
    except BaseException:
        runs.finish(parent_id, "FAILED")
        raise
    runs.finish(parent_id)
    return {"mlflow_run_id": parent_id, "rows": rows, "table": table, "members": [m.run_id for m in members],
            "figure4": neighbours, "model": model}


def register_ensemble(cfg: EvalConfig, rows: list[dict], by_id: dict, prepared, runs, parent_id: str, folder: Path,
                      log: Log) -> dict | None:
    """--register-model: the largest evaluated ensemble (its crops: 10crop where both were evaluated) as one pyfunc
    model on the summary run, registered under the name given."""
    from alexnet.served import EnsembleModel, ensemble_artifacts
    from alexnet.tracking import logged_model_name

    if not cfg.register_model:
        return None
    crops = cfg.modes[-1]
    row = max((r for r in rows if r["crops"] == crops), key=lambda r: r["size"])
    members = [by_id[i] for i in row["members"]]
    uri, version = runs.log_pyfunc(parent_id, logged_model_name(row["label"], crops), EnsembleModel(),
                                   ensemble_artifacts(members, prepared, crops, folder), cfg.register_model)
    runs.set_tags(parent_id, {"registered_model": f"{cfg.register_model}/{version}"})
    log(f"registered the {row['label']} ensemble ({len(members)} members, {crops}) as models:/{cfg.register_model}/"
        f"{version} (logged model {uri}); serve it: mlflow models serve -m models:/{cfg.register_model}/{version} "
        "--env-manager local")
    return {"name": cfg.register_model, "version": version, "logged_model": uri, "row": row["label"], "crops": crops}


def row_params(r: dict, by_id: dict) -> dict:
    """What a nested run is (params: the Compare page's axes and group-by keys)."""
    return {"ensemble_size": r["size"], "crops": r["crops"],
            "pretrained_members": sum(by_id[i].pretrained for i in r["members"])}


def row_tags(r: dict, by_id: dict) -> dict:
    return {"table2_row": r["label"], "paper_row": r["paper"] or "none", "selection": r["selection"],
            "members": ",".join(r["members"]), "member_names": ",".join(by_id[i].name for i in r["members"])}


def row_metrics(r: dict) -> dict[str, float]:
    """Errors as fractions (the project's unit), the paper's where it has this row, the gain over the members
    alone."""
    from alexnet.table2 import paper_errors

    metrics = {"val/top1_err": r["top1"], "val/top5_err": r["top5"]}
    metrics |= {f"val/{k}_err_{s}": r[f"{k}_{s}"] for k in ("top1", "top5") for s in ("std", "best") if f"{k}_{s}" in r}
    metrics |= {f"val/{k}_gain_over_single": r[f"{k}_gain"] for k in ("top1", "top5") if f"{k}_gain" in r}
    if paper := paper_errors(r):
        metrics |= {"paper/top1_err": paper[0] / 100, "paper/top5_err": paper[1] / 100}
    return {k: round(v, 6) for k, v in metrics.items()}


def headline(rows: list[dict]) -> dict[str, float]:
    """The summary run's own metrics: the largest ensemble's errors in each crop mode."""
    out = {}
    for r in sorted(rows, key=lambda r: r["size"]):
        out |= {f"largest/{r['crops']}/top1_err": round(r["top1"], 6), f"largest/{r['crops']}/top5_err": round(r["top5"], 6)}
    return out


def links(uri: str, exp_id: str, parent_id: str, child_ids: list[str]) -> str:
    """Where to look in the MLflow UI: the summary run and a Compare page of its nested runs."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    how = "" if base == uri.rstrip("/") else f" (after: mlflow ui --backend-store-uri {uri})"
    ids = ",".join(f'"{i}"' for i in child_ids)
    return (f"MLflow{how}: summary {base}/#/experiments/{exp_id}/runs/{parent_id}\n"
            f"  compare the ensembles: {base}/#/compare-runs?runs=[{ids}]&experiments=[\"{exp_id}\"]")
