"""`rayalign report`: PNG plots and a Markdown summary (report.md) of a run or a study directory.

The numbers behind each plot come from small pure functions over polars frames (run.py, study.py); the figures
(plots.py) only draw them. matplotlib is imported when a figure is drawn, so importing this package stays cheap.
"""

from __future__ import annotations

from pathlib import Path

from rayalign.report.document import Document, ReportError
from rayalign.report.run import run_report
from rayalign.report.study import study_report


def report(path: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write plots and report.md for a run or study directory into `out_dir` (default: <path>/report/);
    returns the path of report.md."""
    path = Path(path)
    out = Path(out_dir) if out_dir is not None else path / "report"
    if (path / "study.json").is_file():
        build = study_report
    elif (path / "metrics.jsonl").is_file() or (path / "state.json").is_file():
        build = run_report
    else:
        raise ReportError(f"{path}: not a run directory (no metrics.jsonl or state.json) nor a study directory "
                          "(no study.json)")
    from rayalign.data.store import enclosing_dataset, is_dataset_dir

    dataset = out if is_dataset_dir(out) else enclosing_dataset(out)
    if dataset is not None:
        raise ReportError(f"{out}: inside the dataset {dataset}; the report's files would load as part of it: choose "
                          "another --out")
    out.mkdir(parents=True, exist_ok=True)
    doc = Document(out)
    build(path, doc)
    md = out / "report.md"
    md.write_text(doc.markdown(), encoding="utf-8")
    return md
