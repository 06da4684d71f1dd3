"""Airflow DAG: ecgtok nightly cohort scoring, once a night, through Beam's provider.

Copy this file into the DAGs folder of an Airflow with `apache-airflow-providers-apache-beam`
(and `apache-airflow-providers-google` for Dataflow). It runs

    python -m ecgtok.pipeline.nightly --cohort ... --store ... --date {{ ds }} [Beam options]

with `BeamRunPythonPipelineOperator`, so the night is the DAG run's logical date, and a
cleared or retried task reruns that same date (which replaces its outputs; the store's
lock refuses two runs at once). Settings come from environment variables:

    ECGTOK_COHORT   cohort CSV (local path or gs://)
    ECGTOK_STORE    the store (local folder or gs://)
    ECGTOK_RUNNER   DirectRunner (the default: ecgtok's local runner) or DataflowRunner
    ECGTOK_PROJECT, ECGTOK_REGION, ECGTOK_TEMP_LOCATION, ECGTOK_WORKER_IMAGE   for Dataflow
    ECGTOK_PY_REQUIREMENTS   e.g. "ecgtok==0.1.0": run in a fresh virtualenv with these
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow import DAG
from airflow.providers.apache.beam.operators.beam import BeamRunPythonPipelineOperator

COHORT = os.environ.get("ECGTOK_COHORT", "/data/cohorts/af_watch.csv")
STORE = os.environ.get("ECGTOK_STORE", "/data/ecgtok_store")
RUNNER = os.environ.get("ECGTOK_RUNNER", "DirectRunner")
PROJECT = os.environ.get("ECGTOK_PROJECT", "")
REGION = os.environ.get("ECGTOK_REGION", "europe-west1")
TEMP_LOCATION = os.environ.get("ECGTOK_TEMP_LOCATION", "")
WORKER_IMAGE = os.environ.get("ECGTOK_WORKER_IMAGE", "")
PY_REQUIREMENTS = [r for r in os.environ.get("ECGTOK_PY_REQUIREMENTS", "").split(",") if r]

pipeline_options = {
    "cohort": COHORT,
    "store": STORE,
    "date": "{{ ds }}",
}
dataflow_config = None
if RUNNER == "DataflowRunner":
    from airflow.providers.google.cloud.operators.dataflow import DataflowConfiguration

    pipeline_options.update(
        {
            k: v
            for k, v in {
                "temp_location": TEMP_LOCATION,
                "sdk_container_image": WORKER_IMAGE,
            }.items()
            if v
        }
    )
    dataflow_config = DataflowConfiguration(
        job_name="ecgtok-nightly-{{ ds_nodash }}",
        project_id=PROJECT or None,
        location=REGION,
        wait_until_finished=True,
    )

with DAG(
    dag_id="ecgtok_nightly",
    description="Score the cohort's ECGs every night (ecgtok nightly)",
    schedule="30 2 * * *",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=20)},
    tags=["ecgtok"],
) as dag:
    score_cohort = BeamRunPythonPipelineOperator(
        task_id="score_cohort",
        runner=RUNNER,
        py_file="ecgtok.pipeline.nightly",
        py_options=["-m"],
        pipeline_options=pipeline_options,
        py_requirements=PY_REQUIREMENTS or None,
        py_system_site_packages=not PY_REQUIREMENTS,
        dataflow_config=dataflow_config,
        execution_timeout=timedelta(hours=6),
    )
