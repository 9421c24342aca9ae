"""`hinge eval`: align a prediction with its truth, score it, draw it and report it.

    align.py     read the prediction, match spots and genes (`Aligned`)
    score.py     every metric as typed results (`SlideMetrics`), and the table of reported metrics
    probabilistic.py  the predictive spread against the truth: coverage, PIT, CRPS, energy score (`Calibration`)
    pictures.py  the slide's maps, heatmaps and scatter (drawn by hinge_cli.core.figures)
    report.py    metrics.json (writer and reader) and report.md
    html_report.py  report.html: report.md's tables around the slide's viewer
    viewer.py    `hinge view`: a prediction over its tissue in one self-contained HTML page (assets/: its page and script)
    stage.py     the stage: `evaluate`
    metrics.py, proper_scores.py  the scores themselves, which model selection and the coupling also use
"""

from hinge_cli.eval.align import (
    Aligned,
    Prediction,
    align,
    match_coordinates,
    read_prediction,
)
from hinge_cli.eval.report import (
    Pictures,
    SlideResult,
    Spread,
    read_baseline_metrics,
    read_slide_metrics,
    write_json,
)
from hinge_cli.eval.score import (
    HEADLINE,
    METRICS,
    Calibration,
    Coexpression,
    Correlations,
    CorrelationSummary,
    Errors,
    GeneScores,
    Metric,
    SlideMetrics,
    SlideScore,
    SpatialScores,
    VarianceScores,
    ViewScores,
    metric_table,
    score_slide,
)
from hinge_cli.eval.stage import EvalSummary, evaluate

__all__ = [
    "HEADLINE", "METRICS", "Aligned", "Calibration", "Coexpression", "CorrelationSummary", "Correlations", "Errors",
    "EvalSummary", "GeneScores", "Metric", "Pictures", "Prediction", "SlideMetrics", "SlideResult", "SlideScore",
    "SpatialScores", "Spread", "VarianceScores", "ViewScores", "align", "evaluate", "match_coordinates", "metric_table",
    "read_baseline_metrics", "read_prediction", "read_slide_metrics", "score_slide", "write_json",
]
