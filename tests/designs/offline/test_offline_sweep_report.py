"""The Offline sweep's report reads the cached points of one task: two tasks sharing a cache folder never mix."""

from __future__ import annotations

import json
import os

from benchmarks.bench_offline_sweep import load_points


def test_load_points_keeps_the_newest_point_of_the_asked_task(tmp_path):
    pts = tmp_path / "points"
    pts.mkdir()

    def write(name, point, task, mtime):
        rec = {"point": point, "v": name} | ({"task": task} if task else {})
        path = pts / f"{name}.json"
        path.write_text(json.dumps(rec))
        os.utime(path, (mtime, mtime))

    write("old-demo", "k96", None, 100)  # cached before points recorded their task: the demo's
    write("hr", "k96", "hidden_rules", 200)
    write("demo2", "mid2", "demo", 150)
    assert [r["v"] for r in load_points(tmp_path, "demo")] == ["old-demo", "demo2"]
    assert [r["v"] for r in load_points(tmp_path, "hidden_rules")] == ["hr"]
    assert {r["v"] for r in load_points(tmp_path)} == {"hr", "demo2"}  # no task: the newest of each point
