"""The run-directory reader sees a run trained with ``replicas=R`` as its R replica jobs."""

from __future__ import annotations

import json
from pathlib import Path

from experiments.report.runs import find_jobs, load_sweeps


def job_dir(directory: Path, seed: int, value: float | None) -> None:
    """A job directory: ``.hydra/`` and, when ``value`` is given, a completed results.json."""
    (directory / ".hydra").mkdir(parents=True)
    (directory / ".hydra" / "config.yaml").write_text(json.dumps({"seed": seed}))
    (directory / ".hydra" / "overrides.yaml").write_text(json.dumps([f"seed={seed}"]))
    if value is not None:
        results = {"status": "completed", "test/neg_elbo": value, "seed": seed,
                   "estimator": "gumbel_softmax"}
        (directory / "results.json").write_text(json.dumps(results))


def test_a_sweep_job_with_replicas_is_read_as_its_replicas(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    job_dir(sweep / "0", 0, None)  # the replicated run: its own results are not a job's
    for replica in range(11):  # replica_10 sorts after replica_9, not after replica_1
        job_dir(sweep / "0" / f"replica_{replica}", replica, 90.0 + replica)
    job_dir(sweep / "1", 5, 80.0)  # a plain job beside it
    jobs = load_sweeps([sweep])
    assert [(job.number, job.seed, job.status) for job in jobs] == [
        *[(0, replica, "ok") for replica in range(11)], (1, 5, "ok")
    ]
    assert jobs[10].name == "sweep/0/replica_10" and jobs[11].name == "sweep/1"
    assert {job.variant for job in jobs} == {"gumbel_softmax"}
    found = sorted(job.directory.relative_to(sweep).as_posix() for job in find_jobs([sweep]))
    assert found == sorted(["1", *[f"0/replica_{replica}" for replica in range(11)]])


def test_replicas_of_one_process_count_once_in_the_timing(tmp_path: Path) -> None:
    """Three replicas of one run share its wall time (no spread over them); a second run's replicas
    make two processes: the timing mean and std are over the two runs."""
    from experiments.report.statistics import summarize

    sweep = tmp_path / "sweep"
    for number, wall in ((0, 10.0), (1, 14.0)):
        job_dir(sweep / str(number), 0, None)
        for replica in range(3):
            job_dir(sweep / str(number) / f"replica_{replica}", replica, 90.0 + replica)
            path = sweep / str(number) / f"replica_{replica}" / "results.json"
            results = json.loads(path.read_text())
            path.write_text(json.dumps({**results, "wall_time_s": wall, "global_step": 100}))
    (summary,) = summarize(load_sweeps([sweep]), "test/neg_elbo")
    assert summary.stats["test/neg_elbo"].count == 6  # every replica is a seed
    wall = summary.stats["wall_time_s"]
    assert wall.count == 2 and wall.mean == 12.0 and abs(wall.std - 2 ** 0.5 * 2) < 1e-12
    (first,) = summarize(load_sweeps([sweep / "0"]), "test/neg_elbo")
    assert first.stats["wall_time_s"].count == 1 and first.stats["wall_time_s"].text() == "10.00"


def test_a_failed_replicated_run_without_replica_folders_is_one_failed_job(tmp_path) -> None:
    run = tmp_path / "run"
    job_dir(run, 3, None)
    (run / "results.json").write_text(json.dumps({"status": "failed", "failure": "non-finite"}))
    [job] = load_sweeps([run])
    assert (job.status, job.reason) == ("failed", "non-finite")
