"""A short soak (bench/soak.py): concurrent clients submit jobs while workers are SIGKILLed and SIGTERMed and the
private Redis and PostgreSQL are restarted and flushed at random. Every job ends, none is lost or duplicated,
and no 5xx appears outside the PostgreSQL outages. The full run (30 jobs, 10 clients, 12 events) is
`python bench/soak.py`; its figures are in docs/reliability.md."""

import json

import pytest

from bench.soak import print_table, run_soak

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_short_soak_loses_nothing(tmp_path):
    result = run_soak(
        jobs=15, clients=5, chaos=10, workers=2, seed=7, gap=(4.0, 8.0), timeout_s=420, folder=tmp_path
    )
    print_table(result)
    (tmp_path / "soak.json").write_text(json.dumps(result, indent=2, default=str))
    assert result["chaos"]["events"] == 10 and set(result["chaos"]["by_kind"].values()) == {2}, result[
        "chaos"
    ]
    assert result["jobs"]["lost"] == 0, result["jobs"]
    assert result["jobs"]["acknowledged"] == 15 and result["jobs"]["terminal"] == 15
    assert result["jobs"]["duplicated_jobs"] == 0
    assert result["artifacts"]["duplicated_rows"] == 0
    assert result["artifacts"]["jobs_with_more_than_one_set_in_store"] == 0
    assert result["http"]["5xx_outside_db_outage"] == 0, result["http"]["outside_examples"]
    assert result["post_chaos_job_s"] is not None
    assert result["passed"], result["checks"]
