"""``replicas=R`` end to end: the builder seeds each replica as its own run, the job writes one
``replica_<r>/`` job directory per replica, the report reads them as R seeds, unsupported
settings stop with one line, and a replica trains as the single run of its seed."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from experiments.report.runs import load_sweeps
from experiments.training.builder import build
from experiments.training.errors import ConfigurationError
from experiments.training.job import run
from experiments.training.replicas import build_replicated
from tests.experiments.training.test_sweep import TINY_RUN

RUN = [*TINY_RUN, "logger=csv_only", "~callbacks.progress_bar", "trainer.max_steps=8",
       "trainer.log_every_n_steps=2"]


def save_hydra_dir(cfg: DictConfig, overrides: list[str]) -> None:
    """What Hydra writes in ``<run>/.hydra/`` (``compose`` does not write it)."""
    directory = Path(cfg.hydra.runtime.output_dir) / ".hydra"
    directory.mkdir(parents=True, exist_ok=True)
    plain = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(plain, dict)
    choices = plain["hydra"]["runtime"]["choices"]
    plain.pop("hydra")
    OmegaConf.save(OmegaConf.create(plain), directory / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": {"runtime": {"choices": choices}}}),
                   directory / "hydra.yaml")
    OmegaConf.save(OmegaConf.create(overrides), directory / "overrides.yaml")


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_replica_r_is_built_as_the_run_with_seed_plus_r(compose_config) -> None:
    cfg = compose_config([*RUN, "replicas=3", "seed=4"])
    replicated, datamodule = build_replicated(cfg)
    assert replicated.num_replicas == 3 and datamodule.seed == 4
    for replica in range(3):
        single, _ = build(compose_config([*RUN, f"seed={4 + replica}"]))
        for name, tensor in single.state_dict().items():
            assert torch.equal(replicated.model.state_dict()[name][replica], tensor), name


def test_replicated_run_writes_one_job_per_replica_that_the_report_reads_as_seeds(
    compose_config, tmp_path: Path
) -> None:
    overrides = [*RUN, "replicas=3", "seed=7", "estimator=score_function",
                 "estimator/baseline=moving_average"]
    cfg = compose_config(overrides, run_dir=tmp_path)
    save_hydra_dir(cfg, overrides)
    results = run(cfg)
    jobs = load_sweeps([tmp_path])
    assert [(job.status, job.seed, job.variant) for job in jobs] == [
        ("ok", seed, "score_function/moving_average") for seed in (7, 8, 9)
    ]
    assert [job.name for job in jobs] == [f"{tmp_path.name}/replica_{r}" for r in range(3)]
    for replica, job in enumerate(jobs):
        assert job.results["test/neg_elbo"] == results[f"replica_{replica}/test/neg_elbo"]
        assert job.results["replicas"] == 3 and job.results["replica"] == replica
        assert job.results["global_step"] == 8
        assert job.select("seed") == 7 + replica and job.select("datamodule.seed") == 7
        assert {"train/value", "train/baseline", "val/neg_elbo", "test/nll_iwae"} <= set(
            job.curves)
    # Each replica's columns come from its own logged values, not a neighbour's.
    shared = read_rows(tmp_path / "csv" / "metrics.csv")
    own = read_rows(tmp_path / "replica_2" / "csv" / "metrics.csv")
    values = [row["replica_2/val/neg_elbo"] for row in shared if row["replica_2/val/neg_elbo"]]
    assert values and values == [row["val/neg_elbo"] for row in own if row["val/neg_elbo"]]
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "completed"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["replicas=0"], r"^replicas=0 is invalid: use an integer >= 1$"),
        (["replicas=2", "model.compile=true"], r"^replicas=2 with model.compile=true is not"),
        (["replicas=2", "trainer.gradient_clip_val=1.0"], r"clips by the norm over all replicas"),
    ],
)
def test_unsupported_settings_stop_before_any_work(compose_config, tmp_path, overrides,
                                                   message) -> None:
    cfg = compose_config([*RUN, *overrides], run_dir=tmp_path)
    with pytest.raises(ConfigurationError, match=message) as raised:
        run(cfg)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("estimator", ["relax", "arsm"])
def test_looped_estimators_train_each_replica_through_lightning(compose_config, tmp_path,
                                                                estimator) -> None:
    """RELAX and ARSM (trained by a loop over the replicas) run end to end: every replica ends
    with finite test metrics of its own, and RELAX's control variate is trained per replica."""
    overrides = [*RUN, "replicas=3", f"estimator={estimator}"]
    cfg = compose_config(overrides, run_dir=tmp_path)
    save_hydra_dir(cfg, overrides)
    results = run(cfg)
    values = [results[f"replica_{r}/test/neg_elbo"] for r in range(3)]
    assert all(torch.isfinite(torch.tensor(values))) and len(set(values)) == 3
    assert [job.status for job in load_sweeps([tmp_path])] == ["ok"] * 3
    if estimator == "relax":  # each replica's eta moved from its start (1.0) its own way
        etas = [[float(row["train/eta"]) for row in read_rows(
            tmp_path / f"replica_{r}" / "csv" / "metrics.csv") if row["train/eta"]][-1]
            for r in range(3)]  # the last logged value of each replica
        assert len(etas) == 3 and len(set(etas)) == 3 and 1.0 not in etas


PROBE = ["callbacks=probe", "callbacks.gradient_probe.every_n_steps=4",
         "callbacks.gradient_probe.num_samples=4", "callbacks.gradient_probe.chunk_size=4"]


def probe_rows(path: Path) -> list[dict[str, object]]:
    """The rows of a ``probe.jsonl`` without their timing (``seconds``), in file order."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


@pytest.mark.parametrize("estimator", ["marginalization", "score_function"])
def test_probe_of_replica_r_is_the_probe_of_the_run_with_seed_plus_r(
    compose_config, tmp_path: Path, estimator: str
) -> None:
    """replicas=2 with the probe at steps 0 and 4: replica 1's ``probe.jsonl`` is the one of a
    single run with seed 1 on the data of seed 0. At step 0 (same weights, same probe seed) every
    value is equal; with marginalization (no estimator noise) also at step 4, to 1e-4 relative
    (float32 rounding of batched against unbatched products carried by Adam, as in
    test_marginalization_replica_trains_as_the_single_run_of_its_seed). With the score function
    the replicas' training noise differs from the single run's by design: step 0 only."""
    common = [*RUN, f"estimator={estimator}", *PROBE]
    replicated = compose_config([*common, "replicas=2", "seed=0"], run_dir=tmp_path / "r")
    run(replicated)
    single = compose_config([*common, "seed=1"], run_dir=tmp_path / "s")
    with open_dict(single):
        single.datamodule.seed = 0
    run(single)
    reference = probe_rows(tmp_path / "s" / "probe.jsonl")
    replica = probe_rows(tmp_path / "r" / "replica_1" / "probe.jsonl")
    other = probe_rows(tmp_path / "r" / "replica_0" / "probe.jsonl")
    assert not (tmp_path / "r" / "probe.jsonl").exists()
    assert [(r["step"], r["group"]) for r in replica] == [(r["step"], r["group"]) for r in
                                                          reference]
    assert {r["step"] for r in replica} == {0, 4}
    for mine, theirs, neighbour in zip(replica, reference, other, strict=True):
        if mine["step"] == 0:
            assert mine == theirs
            assert mine["trace_cov"] != neighbour["trace_cov"] or estimator == "marginalization"
        elif estimator == "marginalization":
            numbers = {k for k, v in theirs.items() if isinstance(v, float)}
            assert {k: v for k, v in mine.items() if k not in numbers} == {
                k: v for k, v in theirs.items() if k not in numbers}
            assert {k: mine[k] for k in numbers} == pytest.approx(
                {k: theirs[k] for k in numbers}, rel=1e-4, abs=1e-9)
    # The report reads each replica's probe as one seed's.
    jobs = load_sweeps([tmp_path / "r"])
    assert [len(job.probe) for job in jobs] == [len(other), len(replica)]


def test_the_toy_model_is_refused_with_one_line(compose_config, tmp_path) -> None:
    cfg = compose_config(["model=toy", "datamodule=toy", "replicas=2"], run_dir=tmp_path)
    with pytest.raises(ConfigurationError, match=r"^replicas=2 with model models.toy.\w+ is not"):
        run(cfg)


M2 = ["experiment=m2_digits", "model.latent_dim=4", "model.classifier_hidden=[16]",
      "model.encoder_hidden=[16]", "model.decoder_hidden=[16]", "datamodule.base.batch_size=20",
      "datamodule.labelled_batch_size=10"]


@pytest.mark.parametrize("estimator", [
    ["estimator=marginalization"],
    ["estimator=score_function", "estimator/baseline=moving_average", "estimator.num_samples=2"],
    ["estimator=relax"],  # looped over the replicas
])
def test_m2_replicas_give_each_replica_its_single_run_gradient_and_state(
    compose_config, monkeypatch, estimator
) -> None:
    """M2 (labelled and unlabelled parts, Gaussian z noise from torch.randn): with matched noise
    replica r's loss, gradients and estimator state equal the single run of seed r (tolerance as
    in tests/models/test_replicas.py)."""
    from tests.models.test_replicas import check_replicas_against_singles

    replicated, datamodule = build_replicated(compose_config([*M2, *estimator, "replicas=3"]))
    singles = [build(compose_config([*M2, *estimator, f"seed={r}"]))[0] for r in range(3)]
    batch = next(iter(datamodule.train_dataloader()))
    batch = batch[0] if isinstance(batch, tuple) else batch  # CombinedLoader: (batch, idx, ...)
    assert set(batch) == {"labelled", "unlabelled"}
    noise = check_replicas_against_singles(replicated, singles, batch, monkeypatch)
    assert any(name == "randn" for name, _ in noise.shapes)  # M2 drew its z noise


def test_m2_replicated_run_writes_accuracies_per_replica(compose_config, tmp_path) -> None:
    overrides = [*M2, "replicas=2", "logger=csv_only", "~callbacks.progress_bar",
                 "trainer.max_epochs=-1", "trainer.max_steps=6",
                 "trainer.check_val_every_n_epoch=1"]
    cfg = compose_config(overrides, run_dir=tmp_path)
    save_hydra_dir(cfg, overrides)
    run(cfg)
    jobs = load_sweeps([tmp_path])
    assert [(job.status, job.seed) for job in jobs] == [("ok", 0), ("ok", 1)]
    for job in jobs:  # the data (labelled subset, order) of seed 0 for both replicas
        assert job.select("datamodule.seed") == job.select("datamodule.base.seed") == 0
        assert 0.0 <= job.results["test/accuracy"] <= 1.0
        assert {"test/accuracy", "test/generative_accuracy", "test/neg_elbo"} <= set(job.results)


def test_clipping_by_value_is_elementwise_and_allowed(compose_config) -> None:
    cfg = compose_config([*RUN, "replicas=2", "trainer.gradient_clip_val=1.0",
                          "+trainer.gradient_clip_algorithm=value"])
    assert build_replicated(cfg)[0].num_replicas == 2


@pytest.mark.slow
def test_marginalization_replica_trains_as_the_single_run_of_its_seed(
    compose_config, tmp_path: Path
) -> None:
    """Through Lightning: replica 1 of a seed-0 run and a single run with seed 1 on the data of
    seed 0 (no estimator noise) agree in every validation and test value to 1e-4 relative:
    float32 rounding of batched against unbatched products, carried by Adam (see
    tests/models/test_replicas.py; observed below 1e-5)."""
    common = [*RUN, "estimator=marginalization", "trainer.max_steps=40"]
    replicated = compose_config([*common, "replicas=2", "seed=0"], run_dir=tmp_path / "r")
    run(replicated)
    single = compose_config([*common, "seed=1", "datamodule.seed=0"], run_dir=tmp_path / "s")
    with open_dict(single):
        single.datamodule.seed = 0
    single_results = run(single)
    replica = json.loads((tmp_path / "r" / "replica_1" / "results.json").read_text())
    # test/neg_elbo is exact (enumerated); test/nll_iwae samples with the run's test noise,
    # which differs between the runs by design (seed 0's stream, row 1, against seed 1's).
    assert replica["test/neg_elbo"] == pytest.approx(single_results["test/neg_elbo"], rel=1e-4)
    curve = [float(r["val/neg_elbo"]) for r in read_rows(tmp_path / "r" / "replica_1" / "csv" /
                                                         "metrics.csv") if r["val/neg_elbo"]]
    reference = [float(r["val/neg_elbo"]) for r in read_rows(tmp_path / "s" / "csv" /
                                                             "metrics.csv") if r["val/neg_elbo"]]
    assert len(curve) == len(reference) > 1
    assert curve == pytest.approx(reference, rel=1e-4)


@pytest.mark.slow
def test_sigkilled_replicated_run_resumes_to_bitwise_identical_replicas(tmp_path: Path) -> None:
    """One checkpoint holds every replica (weights, Adam state, moving-average baselines, best
    weights): killed mid-epoch and resumed, each replica ends bitwise equal to the uninterrupted
    run (same setting as test_resume.py: score function with a moving-average baseline)."""
    from tests.experiments.training.test_resume import final_state, train

    replicas = ["replicas=2", "estimator/baseline=moving_average"]
    reference_dir = tmp_path / "uninterrupted"
    code, stderr = train(reference_dir, *replicas)
    assert code == 0, stderr[-2000:]
    run_dir = tmp_path / "killed"
    killer = ["+callbacks.killer._target_=tests.fault_injection.KillAtStep",
              "+callbacks.killer.step=13",
              f"+callbacks.killer.once_marker={tmp_path / 'kill_marker'}"]
    code, _ = train(run_dir, *replicas, *killer)
    assert code != 0 and not (run_dir / "replica_0").exists()
    code, stderr = train(run_dir, *replicas, *killer)  # the same command resumes the job
    assert code == 0, stderr[-2000:]
    for replica in range(2):
        reference = json.loads((reference_dir / f"replica_{replica}" / "results.json")
                               .read_text())
        resumed = json.loads((run_dir / f"replica_{replica}" / "results.json").read_text())
        for key in ("test/neg_elbo", "test/nll_iwae", "global_step", "seed"):
            assert resumed[key] == reference[key], (replica, key)
    for name, tensor in final_state(reference_dir).items():
        assert torch.equal(final_state(run_dir)[name], tensor), name


@pytest.mark.slow
def test_each_replica_gets_its_own_wandb_run_in_the_group(compose_config, tmp_path,
                                                           monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    overrides = [*RUN, "replicas=2", "logger=default", "sweep_name=replica-group-test"]
    cfg = compose_config(overrides, run_dir=tmp_path)
    save_hydra_dir(cfg, overrides)
    run(cfg)
    run_ids = set()
    for replica in range(2):
        [offline] = (tmp_path / f"replica_{replica}" / "wandb").glob("offline-run-*")
        run_ids.add(offline.name.rsplit("-", 1)[-1])
        record = next(offline.glob("run-*.wandb")).read_bytes()
        assert b"replica-group-test" in record and b"train/value" in record
        assert b"replica_0/" not in record  # its own columns, under single-run names
    assert len(run_ids) == 2
