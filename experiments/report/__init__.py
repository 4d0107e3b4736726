"""Reading run directories and reporting on them: the comparison report of a sweep
(``python -m experiments.report``) and our numbers beside the published ones
(``python -m experiments.report.published``). Nothing here trains or needs the network."""
