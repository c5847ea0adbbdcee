"""Soak run on a live deployment (issue: load on the deployment). About 5 minutes on 2 busy
cores, so it runs on request: FEDDIFRC_SOAK=1 pytest tests/test_deploy_soak.py (or make
deploy-soak)."""

from __future__ import annotations

import json
import os

import pytest

from scripts.deploy import soak
from tests.deploy_helpers import free_ports

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("FEDDIFRC_SOAK") != "1",
                       reason="~5 min soak; run with FEDDIFRC_SOAK=1 or `make deploy-soak`"),
]


@pytest.mark.timeout(1500)
def test_20_rounds_4_nodes_one_killed_and_restarted(tmp_path, capsys):
    fleet, control, node = free_ports(3)
    code = soak.main(["--nodes", "4", "--rounds", "20", "--kill-node", "2", "--kill-at-round", "5",
                      "--work-dir", str(tmp_path), "--fleet-port", str(fleet),
                      "--control-port", str(control), "--node-port", str(node)])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    summary = json.loads(out)
    assert summary["rounds-completed"] == 20
    assert summary["restarted-node-trained"] >= 1
    assert len(set(summary["node-id-before-and-after"])) == 1
