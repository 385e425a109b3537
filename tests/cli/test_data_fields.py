"""``guardedp2p data fields``: finds the categorical fields of a file, says which ones frequency analysis would read
back after pseudonymisation, and writes a schema `client tune --pseudonymize` accepts."""

from __future__ import annotations

import json
import random

from typer.testing import CliRunner

from guardedp2p.cli.main import app
from guardedp2p.privacy.pseudonym import load_schema


def test_data_fields_suggests_a_schema_and_flags_skewed_fields(tmp_path):
    rng = random.Random(0)
    rows = []
    for i in range(400):
        diag = rng.choice(["asthma", "gout", "migraine", "eczema"])  # flat
        allergy = rng.choices(["none", "latex", "pollen"], [0.8, 0.15, 0.05])[0]  # skewed
        rows.append({"text": f"Patient P{i}, born 19{i % 90:02d}; diagnosis: {diag}; allergy: {allergy}; note: id{i}."})
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    schema = tmp_path / "schema.json"
    res = CliRunner().invoke(app, ["data", "fields", str(data), "--out", str(schema), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    by = {f["field"]: f for f in report["fields"]}
    assert set(by) == {"diagnosis", "allergy"}  # 'note' has 400 values: free text, not a closed vocabulary
    assert by["allergy"]["exposed"] and by["allergy"]["frequency_exposure"] > 0.95
    assert not by["diagnosis"]["exposed"] and by["diagnosis"]["frequency_exposure"] < 0.5
    assert set(load_schema(schema).as_dict()) == {"diagnosis", "allergy"}
    res = CliRunner().invoke(app, ["data", "fields", str(tmp_path / "missing.jsonl")])
    assert res.exit_code != 0 and "missing.jsonl" in res.output
