from pathlib import Path

import pandas as pd

from health_mlops.data.diabetes import AGE_BAND_UPPER_EDGES, site_of_age, write_diabetes_sites
from health_mlops.data.hospital import load_hospitals
from health_mlops.spec import load_spec


def test_sites_follow_the_age_band_rule() -> None:
    assert site_of_age([19, 36, 37, 47, 48, 53, 54, 60, 61, 79]).tolist() == [
        "hospital-1", "hospital-1", "hospital-2", "hospital-2", "hospital-3", "hospital-3",
        "hospital-4", "hospital-4", "hospital-5", "hospital-5"]
    assert AGE_BAND_UPPER_EDGES == (36, 47, 53, 60)


def test_every_patient_lands_in_exactly_one_valid_site(tmp_path: Path) -> None:
    summaries = write_diabetes_sites(tmp_path)
    assert sum(s.rows for s in summaries) == 442
    hospitals = load_hospitals(tmp_path, load_spec(tmp_path / "spec.yaml"))
    assert list(hospitals) == [f"hospital-{i}" for i in range(1, 6)]
    assert all(h.rows_quarantined == 0 for h in hospitals.values())
    means = [h.frame["progression"].mean() for h in hospitals.values()]
    assert means == sorted(means)  # older sites progress further: the sites really differ


def test_a_single_file_with_a_site_column_is_split_by_site(tmp_path: Path) -> None:
    write_diabetes_sites(tmp_path / "sites")
    combined = pd.concat([pd.read_csv(p).assign(site=p.parent.name)
                          for p in sorted((tmp_path / "sites").glob("hospital-*/diabetes.csv"))])
    combined.to_csv(tmp_path / "all.csv", index=False)
    hospitals = load_hospitals(tmp_path / "all.csv", load_spec("diabetes"))
    assert {h: d.rows_valid for h, d in hospitals.items()} == {
        h: len(pd.read_csv(tmp_path / "sites" / h / "diabetes.csv")) for h in hospitals}
